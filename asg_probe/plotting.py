"""Shared plotting conventions: one colour per positional mechanism, labelled axes.

Only imported by ``plot()`` methods and figure scripts, so matplotlib stays out of
``import asg_probe``.
"""
from __future__ import annotations

# Consistent across every figure of the project (tab10-based, colour-blind friendly order).
MECHANISM_COLORS = {
    "none": "#7f7f7f",
    "none+guidance": "#d62728",
    "none+guidance-random": "#ff9896",
    "none+guidance-shuffled": "#ffbb78",
    "ape": "#1f77b4",
    "sincos": "#aec7e8",
    "rope-axial": "#2ca02c",
    "rope-mixed": "#98df8a",
    "rope-dinov3": "#17becf",
    "alibi2d": "#9467bd",
    "relpos": "#c5b0d5",
    "rmt-decay": "#8c564b",
    "sdt-decay": "#e377c2",
}


def mechanism_color(label: str, fallback_index: int = 0) -> str:
    """Colour of a mechanism label (exact match, else the longest matching prefix)."""
    if label in MECHANISM_COLORS:
        return MECHANISM_COLORS[label]
    for key in sorted(MECHANISM_COLORS, key=len, reverse=True):
        if label.startswith(key):
            return MECHANISM_COLORS[key]
    import matplotlib

    return matplotlib.colormaps["tab10"](fallback_index % 10)


def position_colors(grid):
    """A 2D colour map over the patch grid, ``(N, 3)`` RGB: rows go dark→light, columns
    go blue→orange, so both coordinates can be read from one colour."""
    import numpy as np

    gh, gw = grid
    r = np.repeat(np.linspace(0, 1, gh), gw)
    c = np.tile(np.linspace(0, 1, gw), gh)
    rgb = np.stack([0.15 + 0.8 * c, 0.15 + 0.7 * r, 0.95 - 0.8 * c], axis=1)
    return np.clip(rgb, 0, 1)


def new_figure(width=5.0, height=3.4, ncols=1, nrows=1):
    import matplotlib

    matplotlib.use("Agg", force=False) if not _interactive() else None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


def _interactive() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None
    except ImportError:
        return False
