r"""Writing files so that nothing is lost: a reader never sees a partly written file, and a
checkpoint holds everything a run needs to continue exactly where it stopped."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["write_atomically", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


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


CHECKPOINT_FORMAT = 1


def rng_state() -> dict[str, Any]:
    r"""The states of every random number generator a training run draws from: torch's
    CPU generator, each CUDA device's (if CUDA is initialised), Python's and NumPy's.

    Example:
        >>> state = rng_state()
        >>> a = torch.rand(3)
        >>> set_rng_state(state)
        >>> torch.equal(a, torch.rand(3))
        True
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        pass
    else:
        state["numpy"] = numpy.random.get_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    r"""Restores the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    r"""Writes a checkpoint (a dictionary of tensors, ``state_dict`` s and plain values)
    atomically with :func:`torch.save`, adding a ``"format"`` entry.

    Arguments:
        path: The file to write; its folder is created if needed.
        state: What to save.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, **state}
    write_atomically(path, lambda p: torch.save(state, p))
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    r"""Reads a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file is not a pyro-flowpack checkpoint.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "last.pt"
        >>> _ = save_checkpoint(path, {"step": 3})
        >>> load_checkpoint(path)["step"]
        3
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # Checkpoints hold RNG states and configs as well as tensors: only load files you trust.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise ValueError(f"{path} is not a readable checkpoint: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a pyro-flowpack checkpoint (format {CHECKPOINT_FORMAT})")
    return state
