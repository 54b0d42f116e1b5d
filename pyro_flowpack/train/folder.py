r"""The run folder: one object that owns every file of a training run and the rules for
starting, resuming and finishing it, so that nothing is lost or misreported whatever
instant a run is killed at.

A run folder holds::

    config.json            the settings (written by the flowpack command)
    checkpoints/last.pt    the latest state: model, optimiser, scheduler, random states,
                           the loop's state (step, epoch, best validation loss and its
                           step, non-finite counters), the config and the metadata
    checkpoints/best.pt    the model with the best validation loss so far
    metrics.jsonl          one JSON record per line: running losses, epochs, skipped steps
    summary.json           the final test metrics
    run.lock               held (``flock``) by the one process writing the folder

The rules, each kept here once:

* **One writer.** :meth:`RunFolder.lock` takes an exclusive lock; a second writer gets
  :class:`RunLockedError` naming the holder's process id. The operating system drops the
  lock when its process dies (even by ``kill -9``), so the lock of a dead process is
  taken over without a word.
* **Best and last agree.** ``last.pt`` is written first and records the step of the best
  model; ``best.pt`` follows. A kill between the two leaves ``best.pt`` one epoch behind,
  and then the best model *is* the one in ``last.pt`` (it was best at that very step):
  :meth:`RunFolder.repair`, run on every start and every read, copies it over.
* **Metrics follow the checkpoint.** On every start the log is cut back to the
  checkpoint's step (to nothing for a fresh run, which drops the records of a run killed
  before its first checkpoint), so that no step is recorded twice; unreadable lines are
  dropped and counted.
* **Resuming keeps the trajectory.** Only the settings in :data:`RESUMABLE` (how long and
  where a run goes, not what it computes) may change when a run is resumed.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint, save_checkpoint, write_atomically

__all__ = ["RunFolder", "RunLockedError", "RESUMABLE", "changed_settings", "FILES"]

#: The files of a run folder, relative to it.
FILES = {
    "config": "config.json",
    "last": "checkpoints/last.pt",
    "best": "checkpoints/best.pt",
    "metrics": "metrics.jsonl",
    "summary": "summary.json",
    "lock": "run.lock",
}

#: Settings that a resumed run may change: how long it runs, where, and what it reports,
#: never what it computes. Every other setting (of :class:`~pyro_flowpack.train.TrainConfig`
#: or of the ``flowpack`` command) must be the one the run was started with.
RESUMABLE = frozenset({
    "epochs", "max_steps", "device", "threads", "progress", "epoch_lines", "patience", "checkpoint_every",
    "eval_batch_size", "log_every", "max_nonfinite", "k", "temperature", "root", "download",
})


class RunLockedError(RuntimeError):
    r"""Raised when another live process holds a run folder's lock."""


def changed_settings(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    r"""The names of the settings in ``given`` that differ from ``saved`` and that a
    resumed run may not change (not in :data:`RESUMABLE`), in ``given``'s order.

    Example:
        >>> changed_settings({"lr": 1e-3, "epochs": 10}, {"lr": 1e-2, "epochs": 20})
        ['lr']
    """
    return [k for k, v in given.items() if k not in RESUMABLE and saved.get(k) != v]


class RunFolder:
    r"""The files of one training run and the rules to start, resume and read it.

    Arguments:
        path: The folder (made absolute once, here, so that a run started in one working
            directory is found from any other).

    Example:
        >>> import tempfile
        >>> folder = RunFolder(tempfile.mkdtemp())
        >>> folder.holds_run()
        False
        >>> with folder.lock():
        ...     folder.save({"model": {}, "state": {"step": 1, "best_step": 1}}, best=True)
        >>> folder.load("best")["state"]["step"]
        1
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        self._lock_file: Any = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """The path of one of :data:`FILES`."""
        return self.path / FILES[name]

    def holds_run(self) -> bool:
        """Whether the folder holds a run (a ``last.pt`` checkpoint)."""
        return self.file("last").exists()

    # Writing -------------------------------------------------------------------------
    def check_writable(self) -> None:
        r"""Creates the folder and checks that files can be written there, raising a
        :class:`PermissionError` (or :class:`OSError`) with a one-line message if not."""
        try:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.path / "checkpoints", prefix=".probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise type(error)(error.errno, f"cannot write the run folder {self.path}: {reason}") from None

    def lock(self) -> "RunFolder":
        r"""Takes the folder's exclusive lock, as a context manager (``with folder.lock():``);
        raises :class:`RunLockedError` if another live process holds it."""
        import fcntl

        self.check_writable()
        handle = open(self.file("lock"), "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLockedError(
                    f"{self.path} is being written by another process (pid {holder}); wait for it to end "
                    "or choose another folder"
                ) from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle
        return self

    @property
    def locked(self) -> bool:
        """Whether this object holds the folder's lock."""
        return self._lock_file is not None

    def unlock(self) -> None:
        """Releases the lock (the lock file stays, for the next writer)."""
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None

    def __enter__(self) -> "RunFolder":
        if self._lock_file is None:
            self.lock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unlock()

    def save(self, content: dict[str, Any], best: bool) -> None:
        r"""Writes ``last.pt`` and, if ``best``, then ``best.pt``, each atomically. The
        content's ``state`` must hold ``step`` and ``best_step`` (``None`` without one)."""
        save_checkpoint(self.file("last"), content)
        if best:
            save_checkpoint(self.file("best"), content)

    def write_json(self, name: str, value: Any) -> Path:
        """Writes ``config.json`` or ``summary.json`` atomically."""
        text = json.dumps(value, indent=2) + "\n"
        path = self.file(name)
        write_atomically(path, lambda p: p.write_text(text))
        return path

    # Reading -------------------------------------------------------------------------
    def load(self, which: str = "last", map_location: Any = "cpu") -> dict[str, Any]:
        r"""Reads the ``last`` or ``best`` checkpoint (``best`` falls back to ``last`` for
        a run without validation data) after :meth:`repair`.

        Raises:
            FileNotFoundError: If the folder or the checkpoint is missing.
            ValueError: If a checkpoint is corrupt or not a pyro-flowpack checkpoint.
        """
        if which not in ("last", "best"):
            raise ValueError(f"which must be 'best' or 'last', got {which!r}")
        if not self.path.is_dir():
            raise FileNotFoundError(f"no run folder at {self.path}")
        last = self.repair(map_location)
        path = self.file(which)
        if which == "best" and not path.exists():
            path = self.file("last")
        if path == self.file("last") and last is not None:
            return last  # read once, by repair
        return load_checkpoint(path, map_location=map_location)

    def repair(self, map_location: Any = "cpu") -> dict[str, Any] | None:
        r"""Makes ``best.pt`` agree with ``last.pt``: if ``last.pt`` says the best model was
        reached at its own step and ``best.pt`` is missing or older (a kill between the two
        writes), ``last.pt`` is copied over. Returns ``last.pt``'s content (``None`` for a
        folder without a run)."""
        if not self.holds_run():
            return None
        last = load_checkpoint(self.file("last"), map_location=map_location)
        state = last.get("state", {})
        best_step = state.get("best_step")
        if best_step is None:
            return last
        best_path = self.file("best")
        if best_path.exists():
            try:
                current = load_checkpoint(best_path).get("state", {}).get("step")
            except ValueError:
                current = None  # a corrupt best.pt: rewritten below if last.pt holds the best model
            if current == best_step:
                return last
        if state.get("step") == best_step:
            save_checkpoint(best_path, {k: v for k, v in last.items() if k != "format"})
        elif not best_path.exists():
            raise ValueError(f"{best_path} is missing and {self.file('last')} does not hold the best model "
                             f"(best at step {best_step}, last at step {state.get('step')})")
        return last

    # Metrics -------------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        r"""The records of ``metrics.jsonl`` in order; lines that are not JSON objects (a
        line cut short by a kill, or garbage) are skipped."""
        path = self.file("metrics")
        if not path.exists():
            return []
        records = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def truncate_metrics(self, step: int) -> None:
        r"""Keeps only the records up to ``step`` (all of a fresh run's are dropped at 0)."""
        path = self.file("metrics")
        if not path.exists():
            return
        kept = [r for r in self.read_metrics() if isinstance(r.get("step"), int) and r["step"] <= step]
        if step == 0:
            kept = []
        text = "".join(json.dumps(record) + "\n" for record in kept)
        write_atomically(path, lambda p: p.write_text(text))

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Appends one record (a line of JSON) and flushes it."""
        with open(self.file("metrics"), "a") as file:
            file.write(json.dumps(record) + "\n")
            file.flush()
