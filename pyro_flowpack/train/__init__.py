r"""Maximum-likelihood training: file handling that never loses a run."""

from .checkpoint import write_atomically

__all__ = ["write_atomically"]
