"""Inference-only snapshots of the backbone during training: how a run got where it ended.

With ``snapshot_every=N`` and/or ``snapshot_schedule=log`` a run writes
``RUN_DIR/snapshots/step_XXXXXXX.safetensors`` (the step zero-padded to 7 digits) at

* step 0 (the initialisation; always kept),
* steps 1, 2, 4, 8, ... (``snapshot_schedule=log``),
* every multiple of ``N`` (``snapshot_every``),
* the last step of the run.

Each file is a self-describing checkpoint of :func:`asg_probe.save_checkpoint` (so
:func:`asg_probe.load_checkpoint` reads it) without the guidance or dense heads, with the
step in its metadata (``model.asg_meta["step"]``), the run's config and normalisation, and
optionally cast to ``snapshot_dtype`` (fp16/bf16) to save space. Only process 0 writes, each
file atomically. The schedule is a pure function of the step, so a resumed run continues it:
snapshots newer than the checkpoint it resumes from (the lost part of a killed run) are
removed and written again when training reaches them.

``snapshot_max`` caps the number of files: past it, the snapshot whose neighbours are
closest on a log scale (smallest ratio ``(next + 1) / (previous + 1)``; the later one on a
tie) is removed, never step 0 nor the newest, which keeps the set roughly log-spaced.

Examples
--------
>>> [s for s in range(20) if is_snapshot_step(s, every=5, schedule="log", total_steps=19)]
[0, 1, 2, 4, 5, 8, 10, 15, 16, 19]
>>> snapshot_name(1200)
'step_0001200.safetensors'
"""
from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import torch

from asg_probe.files import remove_stale_temporaries

SNAPSHOT_DIR = "snapshots"
_NAME = re.compile(r"^step_(\d{7,})\.safetensors$")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def snapshot_name(step: int) -> str:
    return f"step_{step:07d}.safetensors"


def list_snapshots(run_dir) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of a run's snapshots, by step."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def is_snapshot_step(step: int, *, every: int, schedule: str | None, total_steps: int) -> bool:
    """Whether the schedule writes a snapshot after ``step`` optimiser steps."""
    if not (every or schedule):
        return False
    return (step == 0 or step == total_steps or bool(every and step % every == 0)
            or (schedule == "log" and step & (step - 1) == 0))


def thin(steps: list[int], cap: int) -> list[int]:
    """The steps to remove so that ``cap`` remain (see the module docstring).

    Examples
    --------
    >>> thin([0, 1, 2, 3, 4], 4)
    [3]
    >>> thin([0, 1, 2, 7, 8], 4)               # tie between 1 and 7: the later goes
    [7]
    """
    steps = sorted(steps)
    removed = []
    while len(steps) > max(cap, 2):
        ratios = [(Fraction(steps[i + 1] + 1, steps[i - 1] + 1), -i) for i in range(1, len(steps) - 1)]
        _, neg_i = min(ratios)
        removed.append(steps.pop(-neg_i))
    return removed


class _Cast:
    """``model`` as :func:`asg_probe.save_checkpoint` sees it, its floating-point weights in ``dtype``."""

    def __init__(self, model, dtype):
        self._model, self._dtype = model, dtype

    def __getattr__(self, name):
        return getattr(self._model, name)

    def state_dict(self):
        return {k: v.to(self._dtype) if v.is_floating_point() else v for k, v in self._model.state_dict().items()}


class Snapshots:
    """The snapshot schedule of one run; ``enabled`` only on process 0 with a schedule set.

    Parameters
    ----------
    run_dir : Path
    cfg : dict
        The resolved config (``snapshot_every``, ``snapshot_schedule``, ``snapshot_max``,
        ``snapshot_dtype``); stored in every snapshot.
    is_main : bool
        Process 0.
    total_steps : int
    meta : dict
        Further metadata for every snapshot (e.g. ``data_config``).
    """

    def __init__(self, run_dir, cfg: dict, is_main: bool, total_steps: int, meta: dict | None = None):
        self.folder = Path(run_dir) / SNAPSHOT_DIR
        self.cfg = cfg
        self.every, self.schedule = cfg["snapshot_every"], cfg["snapshot_schedule"]
        self.cap = cfg["snapshot_max"]
        self.dtype = DTYPES.get(cfg["snapshot_dtype"])
        self.total_steps = total_steps
        self.meta = meta or {}
        self.enabled = is_main and bool(self.every or self.schedule)

    def start(self, step: int, model):
        """Before training from ``step``: clear killed writes and snapshots past ``step``; save step 0."""
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.folder)
        for s, path in list_snapshots(self.folder.parent):
            if s > step:  # written after the checkpoint this run resumes from: trained again
                path.unlink()
        if step == 0:
            self.save(0, model)

    def maybe_save(self, step: int, model):
        if self.enabled and is_snapshot_step(step, every=self.every, schedule=self.schedule,
                                             total_steps=self.total_steps):
            self.save(step, model)

    def save(self, step: int, model):
        """Write the snapshot of ``step`` (atomically), then apply ``snapshot_max``."""
        from asg_probe import save_checkpoint

        view = _Cast(model, self.dtype) if self.dtype is not None else model
        with torch.no_grad():
            save_checkpoint(self.folder / snapshot_name(step), view, step=int(step), config=self.cfg,
                            snapshot={"dtype": self.cfg["snapshot_dtype"] or "fp32"}, **self.meta)
        if self.cap:
            by_step = dict(list_snapshots(self.folder.parent))
            for s in thin(list(by_step), self.cap):
                by_step[s].unlink()
