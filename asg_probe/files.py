"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every file the project writes (results, reports, figures, checkpoints, training state,
summaries) goes through :func:`atomic_write`: the content is written to a hidden
temporary file in the destination folder (same filesystem, so the rename is atomic),
flushed to disk, given the usual file mode and renamed into place. A process killed
mid-write leaves only a temporary file.

Files we own: every temporary name carries the writer's process id,
``.NAME.asg-PID-XXXXXXXX.tmp`` (:func:`owned_temporary_name`), so a later run can tell its
own leftovers from anything else. :func:`remove_stale_temporaries` removes only names of that
pattern whose writer is no longer running; a user's hidden ``*.tmp`` file, or the temporary
file of a run still writing, is never touched.

Examples
--------
>>> import json, tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> with atomic_write(folder / "result.json", "w") as f:
...     json.dump({"r2": 0.9}, f)
>>> json.loads((folder / "result.json").read_text())
{'r2': 0.9}
>>> atomic_write_text(folder / "note.txt", "hello")
>>> sorted(p.name for p in folder.iterdir())
['note.txt', 'result.json']
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_path", "atomic_write_text", "atomic_write_bytes",
           "remove_stale_temporaries", "owned_temporary_name", "owner_of", "is_stale"]

_TMP_SUFFIX = ".tmp"
_OWNER_TAG = ".asg-"  # then the writer's pid, "-", a random part
# mkstemp/mkdtemp random parts are letters, digits and "_"
_OWNED = re.compile(r"^\.(?P<name>.+)\.asg-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


def owned_temporary_name(name: str) -> str:
    """The prefix of this process's temporary names for ``name`` (``mkstemp`` adds the random part).

    >>> import os
    >>> owned_temporary_name("a.json") == f".a.json.asg-{os.getpid()}-"
    True
    """
    return f".{name}{_OWNER_TAG}{os.getpid()}-"


def owner_of(path):
    """``(name, pid)`` if ``path`` is a temporary name this project made, else ``None``.

    >>> owner_of(".layerwise.json.asg-4242-k2j_9x.tmp")
    ('layerwise.json', 4242)
    >>> owner_of(".notes.tmp") is None  # a user's hidden file: not ours
    True
    """
    m = _OWNED.match(Path(path).name)
    return (m.group("name"), int(m.group("pid"))) if m else None


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return False
    except (PermissionError, OSError):  # exists, owned by someone else (or cannot tell): keep
        return True
    return True


def is_stale(pid: int) -> bool:
    """Whether the writer ``pid`` is gone (a leftover of a killed write), on this machine."""
    return not _process_alive(pid)


def _umask() -> int:
    # os.umask can only be read by setting it; restore at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write_path(path, *, fsync: bool = True):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    For writers that want a file name (``safetensors.torch.save_file``,
    ``Figure.savefig``, ``torch.save``). On any exception the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=owned_temporary_name(path.name), suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", *, fsync: bool = True, **open_kwargs):
    """Open a temporary file beside ``path`` for writing; rename it into place on success.

    ``mode`` is ``"w"`` (text, UTF-8 by default) or ``"wb"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports mode 'w' or 'wb', got {mode!r}")
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    with atomic_write_path(path, fsync=False) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def atomic_write_text(path, text: str, *, fsync: bool = True) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path, "w", fsync=fsync) as f:
        f.write(text)


def atomic_write_bytes(path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb", fsync=fsync) as f:
        f.write(data)


def remove_stale_temporaries(folder, name: str | None = None) -> list:
    """Delete leftovers of killed writes in ``folder``; return what was removed.

    Only regular files named by :func:`atomic_write_path` (``.NAME.asg-PID-XXXX.tmp``) whose
    writer process is gone; with ``name``, only leftovers of that file. Anything else, a
    user's hidden ``*.tmp`` included, stays.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(f".*{_TMP_SUFFIX}"):
        owner = owner_of(p)
        if owner is None or (name is not None and owner[0] != name) or not is_stale(owner[1]):
            continue
        if p.is_symlink() or not p.is_file():
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed
