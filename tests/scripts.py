"""Loading a benchmark or example script as a module, as the tests of scripts do."""

from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

from torch.distributions import Distribution


@contextmanager
def loaded_script(path: Path, name: str) -> Iterator[ModuleType]:
    """The script at ``path`` as the module ``name``, registered in ``sys.modules`` (where
    dataclasses look their module up) while in use; importing zuko there switches off
    torch's distribution validation, so the setting is restored afterwards."""
    saved = Distribution._validate_args
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]
        Distribution.set_default_validate_args(saved)
