"""Result objects shared by every analysis, and how their files reach the disk.

A result knows how to become a table (``to_frame``), a picture (``plot``), a JSON
document (``to_dict``/``to_json``) and shows itself in a notebook (``_repr_html_``).
``save(out_dir)`` writes ``<name>.json``, ``<name>.csv`` and ``<name>.png``, which is what
every CLI subcommand does.

Provenance: every result carries ``provenance``, a dict saying what it was computed on
(package version, image source and split, images requested and used, skipped files with
the reason, seed, image size, device, command line). ``to_dict()`` (hence every JSON)
includes it under ``"provenance"``; :meth:`AnalysisResult.provenance_line` is the one-line
summary the command line prints.

Files as a set: :func:`write_output_set` writes a command's files into a hidden staging
folder inside ``out_dir``, marks the set complete, then renames the files into place. A run
killed before the mark leaves the previous results untouched (the staging folder is deleted
by the next write into ``out_dir``); a run killed between the renames is completed by the
next write. Either way a reader never ends up with files from two runs. The staging folder's
name carries the writer's process id (``.asg-probe-staging.PID-XXXX.tmp``): a later run
finishes or discards only the folders of writers that are gone, never those of a run still
writing, and nothing that is not named so. A name that exists in ``out_dir`` as a folder
(or anything but a file) is refused before the first file is written.

Examples
--------
>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> [p.name for p in write_output_set(folder, {"a.json": "{}", "a.png": b"PNG"})]
['a.json', 'a.png']
>>> sorted(p.name for p in folder.iterdir())
['a.json', 'a.png']
"""
from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError
from .files import atomic_write_bytes, atomic_write_text, is_stale, remove_stale_temporaries

__all__ = ["AnalysisResult", "write_output_set", "recover_output_set", "check_output_names"]

_STAGING_PREFIX = ".asg-probe-staging."
_STAGING_SUFFIX = ".tmp"
_COMPLETE = "COMPLETE"  # inside a staging folder: the file names of a fully written set, one per line
_REMOVE = "REMOVE"  # inside a staging folder: files of the previous set that the new set retires
# no pid part: a folder written by an earlier version, whose writer is long gone
_STAGING = re.compile(r"^\.asg-probe-staging\.(?:(?P<pid>\d+)-)?[A-Za-z0-9_]+\.tmp$")


def jsonable(obj):
    """Plain Python for ``json.dumps``: numpy/torch scalars and arrays become lists and numbers,
    NaN and ±inf become ``None`` (JSON has neither; Python's ``json`` would write ``NaN``, which
    strict parsers reject).

    >>> import json, numpy as np
    >>> json.dumps(jsonable({"r2": np.float32(0.5), "p": float("nan"), 1: (2, 3)}), allow_nan=False)
    '{"r2": 0.5, "p": null, "1": [2, 3]}'
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- files as a set

def check_output_names(out_dir, names) -> None:
    """Raise :class:`~asg_probe.errors.UsageError` if any of ``names`` exists in ``out_dir`` as
    something other than a file (a folder, a pipe): renaming a result over it would fail halfway
    through a set, so it is refused before anything is written."""
    out = Path(out_dir)
    for name in names:
        target = out / name
        if (target.exists() or target.is_symlink()) and not (target.is_file() and not target.is_symlink()):
            what = "a folder" if target.is_dir() else "not a regular file"
            raise UsageError(f"{target} is {what}, where a result file would go; move it away "
                             "or choose another --out")


def _publish(stage: Path, out: Path) -> None:
    """Rename every file listed in ``stage``'s COMPLETE mark into ``out``; idempotent."""
    names = [n for n in (stage / _COMPLETE).read_text(encoding="utf-8").splitlines() if n]
    check_output_names(out, [n for n in names if (stage / n).exists()])  # all or nothing
    for name in names:
        if (stage / name).exists():
            os.replace(stage / name, out / name)
    if (stage / _REMOVE).exists():
        for name in (stage / _REMOVE).read_text(encoding="utf-8").splitlines():
            target = out / name
            if name and Path(name).name == name and target.is_file() and not target.is_symlink():
                target.unlink()
    shutil.rmtree(stage, ignore_errors=True)


def _staging_owner_gone(stage: Path) -> bool:
    m = _STAGING.match(stage.name)
    if m is None or stage.is_symlink() or not stage.is_dir():
        return False  # not ours
    return m.group("pid") is None or is_stale(int(m.group("pid")))


def recover_output_set(out_dir) -> list:
    """Finish or discard what a killed :func:`write_output_set` left in ``out_dir``.

    Only staging folders of writers that are gone are handled: one whose set was complete
    is published (the new results win); an incomplete one is deleted (the previous results
    stay), as are the temporary files of killed single writes
    (:func:`asg_probe.files.remove_stale_temporaries`). Returns the staging folders handled.
    """
    out = Path(out_dir)
    if not out.is_dir():
        return []
    handled = []
    for stage in sorted(out.glob(f"{_STAGING_PREFIX}*{_STAGING_SUFFIX}")):
        if not _staging_owner_gone(stage):
            continue
        if (stage / _COMPLETE).exists():
            _publish(stage, out)
        else:
            shutil.rmtree(stage, ignore_errors=True)
        handled.append(stage)
    remove_stale_temporaries(out)
    return handled


def write_output_set(out_dir, contents: dict, remove=()) -> list:
    """Write ``{file name: str or bytes}`` into ``out_dir`` so that the files appear together.

    Every file is first written (fsynced) into a hidden staging folder in ``out_dir``; once
    all are there, a COMPLETE mark is written and the files are renamed into place. An
    exception (or Ctrl-C) before the mark leaves ``out_dir`` as it was; after the mark, the
    renames are finished before the exception propagates. ``remove``: names of files of an
    earlier set (that the caller knows it wrote) to delete once the new set is in place, as
    part of the set. Returns the final paths, in the order of ``contents``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recover_output_set(out)
    names = list(contents)
    bad = [n for n in [*names, *remove] if Path(n).name != n or n in ("", ".", "..", _COMPLETE, _REMOVE)]
    if bad:
        raise ValueError(f"output names must be plain file names, got {bad}")
    check_output_names(out, names)
    stage = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", suffix=_STAGING_SUFFIX, dir=out))
    try:
        for name, data in contents.items():
            if isinstance(data, str):
                atomic_write_text(stage / name, data)
            else:
                atomic_write_bytes(stage / name, bytes(data))
        retired = [n for n in remove if n not in contents]
        if retired:
            atomic_write_text(stage / _REMOVE, "\n".join(retired) + "\n")
        atomic_write_text(stage / _COMPLETE, "\n".join(names) + "\n")
    finally:
        # complete: publish even while an exception unwinds; incomplete: drop the partial set
        if (stage / _COMPLETE).exists():
            try:
                _publish(stage, out)
            except KeyboardInterrupt:
                _publish(stage, out)  # Ctrl-C between two renames: finish the set (microseconds), then stop
                raise
        else:
            shutil.rmtree(stage, ignore_errors=True)
    return [out / name for name in names]


# --------------------------------------------------------------------------- provenance

def _package_version() -> str:
    from . import __version__

    return __version__


def _with_provenance(to_dict):
    """Wrap a subclass's ``to_dict`` so that the document also carries ``"provenance"``."""

    @functools.wraps(to_dict)
    def wrapper(self):
        doc = to_dict(self)
        if isinstance(doc, dict):
            doc = {**doc, "provenance": dict(self.provenance)}
        return doc

    wrapper._adds_provenance = True
    return wrapper


def _skip_entry(entry):
    """``(path, reason)`` from ``{"path", "reason"}`` or a pair."""
    if isinstance(entry, dict):
        return entry.get("path", "?"), entry.get("reason", "?")
    return tuple(entry)[:2]


def _images_part(prov) -> dict:
    images = prov.get("images")
    return images if isinstance(images, dict) else {}


class AnalysisResult:
    """Base class: subclasses set ``name`` and implement ``to_dict``, ``to_frame`` and ``plot``.

    Every subclass's ``to_dict()`` output gains a ``"provenance"`` entry (added here, so
    that no analysis can forget it). ``provenance`` is a dict with, where known:

    - ``package_version`` (always),
    - ``images``: :meth:`asg_probe.inputs.ImageBatches.provenance` of the images the entry
      point prepared: ``{"source", "split", "num_images_requested", "num_images" (used),
      "skipped": [{"path", "reason"}], "seed", "img_size": [h, w]}``,
    - ``device``, ``command`` (the command line, when run from ``asg-probe``).

    Entry points fill it with :meth:`record_inputs`.

    Examples
    --------
    >>> class Tiny(AnalysisResult):
    ...     name = "tiny"
    ...     def to_dict(self):
    ...         return {"value": 1}
    >>> r = Tiny()
    >>> r = r.record_inputs(device="cpu", images={"source": "scenes", "num_images_requested": 8,
    ...                                           "num_images": 6, "img_size": [32, 32], "seed": 0})
    >>> sorted(r.to_dict()), r.to_dict()["provenance"]["images"]["num_images"]
    (['provenance', 'value'], 6)
    >>> r.provenance_line()  # doctest: +ELLIPSIS
    'computed on: 6 images (8 requested) from scenes, 32x32 px, seed 0, device cpu, asg_probe ...'
    """

    name = "result"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("to_dict")
        if own is not None and not getattr(own, "_adds_provenance", False):
            cls.to_dict = _with_provenance(own)

    @property
    def provenance(self) -> dict:
        """What the result was computed on (see the class docstring); always has the version."""
        prov = self.__dict__.get("_provenance")
        if prov is None:
            prov = self.__dict__["_provenance"] = {"package_version": _package_version()}
        return prov

    @provenance.setter
    def provenance(self, value):
        self.__dict__["_provenance"] = {"package_version": _package_version(), **dict(value or {})}

    def record_inputs(self, data=None, *, device=None, **extra):
        """Record what the result was computed on; returns ``self``.

        ``data``: the :class:`~asg_probe.inputs.ImageBatches` the entry point ran on (its
        ``provenance()`` becomes ``provenance["images"]``); ``device``; any other entries.
        """
        if data is not None:
            self.provenance["images"] = data.provenance()
        if device is not None:
            self.provenance["device"] = str(device)
        self.provenance.update(extra)
        return self

    def provenance_line(self) -> str:
        """One line saying what the result was computed on, for printed summaries."""
        prov = self.provenance
        images = _images_part(prov)
        parts = []
        if images:
            used, asked = images.get("num_images"), images.get("num_images_requested")
            what = f"{used} images" if used is not None else "images"
            if asked is not None and used is not None and asked != used:
                what += f" ({asked} requested)"
            source = images.get("source") or "?"
            split = images.get("split")
            parts.append(f"{what} from {source}" + (f" ({split} split)" if split and split not in source else ""))
            skipped = images.get("skipped") or []
            if skipped:
                parts.append(f"{len(skipped)} unreadable file{'s' if len(skipped) > 1 else ''} skipped")
            if images.get("img_size"):
                h, w = images["img_size"]
                parts.append(f"{h}x{w} px")
            if images.get("seed") is not None:
                parts.append(f"seed {images['seed']}")
        if prov.get("device"):
            parts.append(f"device {prov['device']}")
        parts.append(f"asg_probe {prov.get('package_version', '?')}")
        return "computed on: " + ", ".join(parts)

    def provenance_warnings(self) -> list:
        """Lines worth a warning: fewer images than requested, skipped files."""
        images = _images_part(self.provenance)
        out = []
        used, asked = images.get("num_images"), images.get("num_images_requested")
        if used is not None and asked is not None and used < asked:
            out.append(f"asked for {asked} images, {images.get('source') or 'the source'} gave {used}; "
                       f"used {used} (recorded in the results' provenance)")
        skipped = images.get("skipped") or []
        if skipped:
            path, reason = _skip_entry(skipped[0])
            more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
            out.append(f"skipped {len(skipped)} unreadable image file(s): {path} ({reason}){more}")
        return out

    # -- the contract subclasses implement ------------------------------------
    def to_dict(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_frame(self):
        """One table row per entry of ``self.rows`` (most results keep a list of per-layer dicts);
        results shaped otherwise override this."""
        import pandas as pd

        rows = getattr(self, "rows", None)
        if rows is None:  # pragma: no cover - abstract for results without rows
            raise NotImplementedError(f"{type(self).__name__} must implement to_frame()")
        return pd.DataFrame(rows)

    def plot(self, ax=None):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- derived ------------------------------------------------------------------
    def to_json(self, path=None, indent=2) -> str:
        """The JSON document (``to_dict()`` plus provenance); written atomically to ``path`` if given."""
        text = json.dumps(jsonable(self.to_dict()), indent=indent)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def figure_png(self, dpi=110) -> bytes:
        """Render ``plot()`` to PNG bytes (used by the notebook display and the HTML report)."""
        # no matplotlib.use() here: switching backends would silence plt.show() in notebooks
        import matplotlib.pyplot as plt

        out = self.plot()
        fig = out if hasattr(out, "savefig") else out.figure
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        finally:
            plt.close(fig)
        return buf.getvalue()

    def output_names(self) -> list:
        """The file names :meth:`save` writes."""
        return [f"{self.name}.json", f"{self.name}.csv", f"{self.name}.png"]

    def existing_outputs(self, out_dir) -> list:
        """Paths in ``out_dir`` that :meth:`save` would replace."""
        return [Path(out_dir) / n for n in self.output_names() if (Path(out_dir) / n).exists()]

    def save(self, out_dir, dpi=130) -> list:
        """Write ``<name>.json``, ``<name>.csv`` and ``<name>.png`` into ``out_dir``, as a set.

        Everything is rendered in memory first (a failing plot leaves ``out_dir`` as it was),
        then written with :func:`write_output_set`.
        """
        json_name, csv_name, png_name = self.output_names()
        contents = {json_name: self.to_json(), csv_name: self.to_frame().to_csv(index=False),
                    png_name: self.figure_png(dpi=dpi)}
        return write_output_set(out_dir, contents)

    def _repr_html_(self) -> str:
        png = base64.b64encode(self.figure_png()).decode()
        table = self.to_frame().to_html(index=False, float_format=lambda v: f"{v:.3f}")
        return (f"<div><b>{type(self).__name__}</b>{table}"
                f"<img src='data:image/png;base64,{png}'/></div>")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n{self.to_frame().to_string(index=False)}\n)"

