"""The resumable training state: one ``train_state.pt`` per run, written atomically.

Everything in it is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``: no pickled objects, nothing executed on load.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from asg_probe.errors import InputError
from asg_probe.files import atomic_write_path

STATE_FILE = "train_state.pt"


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) RNG states as tensors and plain lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path):
    """``torch.save`` through a temporary file beside ``path``: the old file or the new, never half.

    A process killed mid-write leaves a ``.train_state.pt.asg-PID-*.tmp`` file, which the next run
    removes once that process is gone (:func:`asg_probe.files.remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(path) as tmp:
        torch.save(obj, tmp)


def save_train_state(run_dir, *, model, head, optimizer, scaler, step: int, epoch: int, batch_in_epoch: int,
                     total_steps: int, config: dict, extra: dict | None = None, rng: list | None = None) -> Path:
    """Write everything ``--resume`` needs; returns the path.

    ``rng``: the RNG states of every process in rank order (default: this process's only).
    """
    state = {
        "format": "asg_train_state",
        "version": 1,
        "model": model.state_dict(),
        "guidance_head": head.state_dict() if head is not None else None,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        # The schedules are pure functions of the step; the horizon pins them down.
        "scheduler": {"step": int(step), "total_steps": int(total_steps)},
        "sampler": {"epoch": int(epoch), "batch_in_epoch": int(batch_in_epoch)},
        "step": int(step),
        "rng": rng if rng is not None else [rng_state()],
        "config": config,
        "extra": extra or {},
    }
    path = Path(run_dir) / STATE_FILE
    atomic_torch_save(state, path)
    return path


def load_train_state(run_dir, map_location="cpu") -> dict | None:
    """The saved state of a run directory, or None when it has none yet.

    A file that cannot be read (empty, truncated, not a training state) is an
    :class:`~asg_probe.errors.InputError` naming it (exit code 1), not a crash.
    """
    import pickle

    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    what = f"{path}: cannot resume from it"
    fix = "restore it from a copy, or start the run again with --overwrite"
    if path.stat().st_size == 0:
        raise InputError(f"{what}: the file is empty; {fix}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{what}: truncated or corrupt ({first}); {fix}") from None
    if not isinstance(state, dict) or state.get("format") != "asg_train_state":
        raise InputError(f"{what}: not an asg-train state file; {fix}")
    return state
