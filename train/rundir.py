"""Who may write a run directory, and what in it belongs to a run.

Three rules keep a user's runs from being lost or mixed:

- **A run's files** are the names in :data:`RUN_FILES` and the snapshots in ``snapshots/``
  (:func:`run_files`). Nothing else in the folder is ever removed.
- **A new run refuses a folder that holds a run** (:func:`claim`): continuing it needs
  ``--resume``; replacing it needs ``--overwrite``, and then the old run's files are removed
  *before* training starts, so a run killed midway never leaves the two runs' files mixed.
- **One writer per run directory**: :class:`RunLock` holds ``.asg-train.lock`` (the writer's
  pid) while a run trains; a second ``asg-train`` into the same folder is refused with one
  line. A lock whose process is gone (a killed run) is taken over.

Examples
--------
>>> import tempfile, pathlib
>>> run = pathlib.Path(tempfile.mkdtemp())
>>> run_files(run)
[]
>>> _ = (run / "config.yaml").write_text("seed: 0\\n")
>>> [p.name for p in run_files(run)]
['config.yaml']
>>> with RunLock(run):
...     (run / LOCK_FILE).is_file()
True
>>> (run / LOCK_FILE).exists()
False
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from asg_probe.files import is_stale

from .config import ConfigError
from .snapshots import SNAPSHOT_DIR, list_snapshots
from .state import STATE_FILE

__all__ = ["RUN_FILES", "LOCK_FILE", "run_files", "claim", "RunLock"]

#: the files ``asg-train`` writes into a run directory (besides ``snapshots/``)
RUN_FILES = ("config.yaml", "command.txt", STATE_FILE, "model.safetensors", "summary.json", "metrics.jsonl",
             "metrics.csv", "eval.json", "eval.csv", "dense_head.safetensors")
LOCK_FILE = ".asg-train.lock"


def run_files(run_dir) -> list:
    """The files of a run in ``run_dir`` (:data:`RUN_FILES`, then the snapshots), those that exist."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    return found + [path for _, path in list_snapshots(run_dir)]


def claim(run_dir, *, resume: bool, overwrite: bool, remove: bool = False) -> None:
    """Refuse (``ConfigError``) to start a new run in a folder that holds one, unless told.

    With ``resume`` the folder's run is continued (checked elsewhere against its config).
    With ``overwrite`` and ``remove``, the old run's files are deleted now (only those,
    see :func:`run_files`), so that nothing of it can mix with the new run.
    """
    if resume:
        return
    found = run_files(run_dir)
    if not found:
        return
    if not overwrite:
        names = ", ".join(p.relative_to(run_dir).as_posix() for p in found[:3])
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise ConfigError(f"out={run_dir} already holds a training run ({names}{more}); continue it with "
                          "--resume, replace it with --overwrite, or choose another out=")
    if remove:
        for path in found:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(OSError):  # only if nothing of the user's is left in it
            (Path(run_dir) / SNAPSHOT_DIR).rmdir()


class RunLock:
    """``.asg-train.lock`` in ``run_dir`` while this process writes the run; a context manager.

    Entering raises :class:`~asg_train.config.ConfigError` if another live process holds
    the lock; a lock left by a process that is gone is taken over.
    """

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def _holder(self):
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None  # unreadable or half-written: its writer died between create and write

    def acquire(self) -> "RunLock":
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not is_stale(holder):
                    raise ConfigError(f"out={self.path.parent} is being written by another asg-train (pid {holder}); "
                                      "wait for it to finish, or choose another out=") from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise ConfigError(f"out={self.path.parent}: could not take {LOCK_FILE}; another asg-train is starting "
                          "there; choose another out=")

    def release(self) -> None:
        if self.held and self._holder() == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
