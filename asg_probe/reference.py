"""Bundled reference models: tiny ViTs trained on CPU (see RESULTS.md for how each was made).

Each is a self-describing checkpoint in ``asg_probe/reference/<name>.safetensors``,
so it loads like any other file and needs no download.
"""
from __future__ import annotations

from pathlib import Path

REFERENCE_DIR = Path(__file__).parent / "reference"


def list_reference_models() -> list[str]:
    """Names of the bundled reference models (empty if none are installed).

    Examples
    --------
    >>> isinstance(list_reference_models(), list)
    True
    """
    if not REFERENCE_DIR.is_dir():
        return []
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.safetensors"))


def reference_path(name: str) -> Path:
    path = REFERENCE_DIR / f"{name}.safetensors"
    if not path.exists():
        available = ", ".join(list_reference_models()) or "none installed"
        raise FileNotFoundError(f"no reference model {name!r} (available: {available})")
    return path


def load_reference_model(name: str):
    """Load a bundled reference model by name, e.g. ``load_reference_model("guidance")``."""
    from .checkpoint import load_checkpoint

    return load_checkpoint(reference_path(name))
