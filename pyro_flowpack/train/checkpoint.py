r"""Writing files so that nothing is lost: a reader never sees a partly written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["write_atomically"]


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    r"""Calls ``write`` on a temporary file beside ``path``, then renames it to ``path``.

    The rename is atomic on POSIX file systems, so ``path`` holds either its old content
    or the complete new one, never a partly written file, even if the process is killed.

    Arguments:
        path: The file to write.
        write: A function that writes the content to the path it is given.

    Example:
        >>> import json, pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "metrics.json"
        >>> write_atomically(target, lambda p: p.write_text(json.dumps({"nll": 1.8})))
        >>> json.loads(target.read_text())
        {'nll': 1.8}
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp creates files readable by the owner only
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
