"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every file the project writes (results, reports, figures, checkpoints, training state,
summaries) goes through :func:`atomic_write`: the content is written to a hidden
temporary file in the destination folder (same filesystem, so the rename is atomic),
flushed to disk, given the usual file mode and renamed into place. A process killed
mid-write leaves only a ``.NAME.*.tmp`` file, which :func:`remove_stale_temporaries`
clears on the next run.

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
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_path", "atomic_write_text", "atomic_write_bytes",
           "remove_stale_temporaries"]

_TMP_SUFFIX = ".tmp"


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
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
    """Delete ``.NAME.*.tmp`` leftovers of killed writes in ``folder``; return what was removed.

    With ``name``, only leftovers of that file are removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{name}.*{_TMP_SUFFIX}" if name else f".*{_TMP_SUFFIX}"
    removed = []
    for p in folder.glob(pattern):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed
