"""The resumable training state: one ``train_state.pt`` per run, written atomically.

Everything in it is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``: no pickled objects, nothing executed on load.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

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


def _default_mode(path):
    """mkstemp creates 0600 files; give the final file the usual umask-based mode instead."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_torch_save(obj, path: Path):
    """Temp file in the same folder + fsync + ``os.replace``: old or new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _default_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_safetensors_save(tensors: dict, path: Path, metadata: dict | None = None):
    """A safetensors file written through a temp file + ``os.replace``."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        _default_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    """The saved state of a run directory, or None when it has none yet."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)
