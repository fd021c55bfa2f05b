"""Shared plotting conventions: one colour and one display name per model, labelled axes.

Only imported by ``plot()`` methods and figure scripts, so matplotlib stays out of
``import asg_probe``.
"""
from __future__ import annotations

# One colour per model, the same in every figure, widget and report. Keys are display names
# (see :func:`display_name`): the bundled reference models and every positional mechanism.
# tab20-based, saturated for the headline models; row/column colours below are not in it.
MODEL_COLORS = {
    "none": "#7f7f7f",
    "guidance": "#d62728",
    "guidance-random": "#ff9896",
    "guidance-shuffled": "#ffbb78",
    "ape": "#1f77b4",
    "sincos": "#aec7e8",
    "rope-axial": "#2ca02c",
    "rope-mixed": "#98df8a",
    "rope-dinov3": "#17becf",
    "alibi2d": "#9467bd",
    "relpos": "#c5b0d5",
    "rmt-decay": "#8c564b",
    "sdt-decay": "#e377c2",
    "sdt-hybrid": "#f7b6d2",  # the reference recipe of sdt-decay in the SDT paper's hybrid form
}
# Kept for code written against the first release (keys were "none+guidance", ...).
MECHANISM_COLORS = dict(MODEL_COLORS, **{f"none+{k}": v for k, v in MODEL_COLORS.items()
                                         if k.startswith("guidance")})

# Row and column have their own colours, never a model's: a per-model plot that draws
# row in blue would read as "ape" next to a comparison figure.
ROW_COLOR = "#000000"
COL_COLOR = "#b8860b"
AXIS_COLORS = {"row": ROW_COLOR, "col": COL_COLOR}

# Names outside the table get a colour from this list, picked by a hash of the name, so a
# model keeps its colour whatever else is plotted beside it or in which order.
_EXTRA_COLORS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#bcbd22", "#c49c94",
                 "#9edae5", "#dbdb8d", "#5254a3", "#ad494a", "#3182bd", "#31a354",
                 "#756bb1", "#636363")

_ALIASES = {
    "none+guidance": "guidance",
    "none+guidance-random": "guidance-random",
    "none+guidance-shuffled": "guidance-shuffled",
    "guidance_random": "guidance-random",
    "guidance_shuffled": "guidance-shuffled",
    "asg": "guidance",
}


def display_name(label) -> str:
    """The one name a model is shown under in figures, tables, widgets and reports.

    Aliases of the bundled models collapse to their reference name (``none+guidance`` and
    ``guidance`` are one model); a checkpoint path shows as its file stem; any other label
    is kept as given.

    Examples
    --------
    >>> display_name("none+guidance"), display_name("guidance_random"), display_name("ape")
    ('guidance', 'guidance-random', 'ape')
    >>> display_name("runs/exp1/final.safetensors")
    'exp1/final'
    """
    label = str(label).strip()
    if label.endswith((".safetensors", ".pt", ".pth", ".bin")) and ("/" in label or "\\" in label):
        parts = label.replace("\\", "/").rstrip("/").split("/")
        stem = parts[-1].rsplit(".", 1)[0]
        label = f"{parts[-2]}/{stem}" if len(parts) > 1 and parts[-2] else stem
    elif label.endswith((".safetensors", ".pt", ".pth", ".bin")):
        label = label.rsplit(".", 1)[0]
    return _ALIASES.get(label, _ALIASES.get(label.lower(), label))


def _stable_index(name: str, n: int) -> int:
    import hashlib

    return int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16) % n


def model_color(label, fallback_index=None) -> str:
    """Colour of a model, fixed for every bundled name and mechanism, stable for any other.

    Exact display name first, then the longest table key the name starts with
    (``ape-seed1`` is drawn as ``ape``), then a colour chosen by a hash of the name (never
    by list position, so it does not change between figures). ``fallback_index`` is
    accepted for old callers and ignored.

    Examples
    --------
    >>> model_color("guidance") == model_color("none+guidance") == MODEL_COLORS["guidance"]
    True
    >>> model_color("my-model") == model_color("my-model")
    True
    >>> ROW_COLOR in MODEL_COLORS.values() or COL_COLOR in MODEL_COLORS.values()
    False
    """
    name = display_name(label)
    if name in MODEL_COLORS:
        return MODEL_COLORS[name]
    for key in sorted(MODEL_COLORS, key=len, reverse=True):
        if name.startswith(key + "-") or name.startswith(key + " ") or name.startswith(key + "_"):
            return MODEL_COLORS[key]
    return _EXTRA_COLORS[_stable_index(name, len(_EXTRA_COLORS))]


def mechanism_color(label: str, fallback_index: int = 0) -> str:
    """Alias of :func:`model_color` (kept for existing callers)."""
    return model_color(label)


def integer_ticks(ax, layers, axis="x", max_ticks=13):
    """Ticks at whole layer numbers only (at most ``max_ticks``, every k-th layer beyond that).

    A layer axis left to matplotlib gets half-layer ticks (0.5, 1.5) on short models.

    Examples
    --------
    >>> fig, axes = new_figure()
    >>> integer_ticks(axes[0][0], range(25))
    [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]
    """
    values = sorted({int(v) for v in layers})
    step = -(-len(values) // max_ticks) if values else 1
    ticks = values[::step]
    if values and ticks[-1] != values[-1] and step > 1:
        ticks = ticks + [values[-1]] if values[-1] - ticks[-1] >= step / 2 else ticks[:-1] + [values[-1]]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks, [str(t) for t in ticks])
    return ticks


def position_colors(grid):
    """A 2D colour map over the patch grid, ``(N, 3)`` RGB: rows go dark→light, columns
    go blue→orange, so both coordinates can be read from one colour."""
    import numpy as np

    gh, gw = grid
    r = np.repeat(np.linspace(0, 1, gh), gw)
    c = np.tile(np.linspace(0, 1, gw), gh)
    rgb = np.stack([0.15 + 0.8 * c, 0.15 + 0.7 * r, 0.95 - 0.8 * c], axis=1)
    return np.clip(rgb, 0, 1)


def panel_axes(ax, n, width, height):
    """``(figure, [n axes])`` for a row of ``n`` panels: a new figure when ``ax`` is ``None``,
    else the caller's axes (one axis or a sequence of them).

    Examples
    --------
    >>> fig, axes = panel_axes(None, 3, 2.0, 2.0)
    >>> len(axes), axes[0].figure is fig
    (3, True)
    >>> panel_axes(axes[1], 1, 2.0, 2.0)[1] == [axes[1]]
    True
    """
    if ax is None:
        fig, grid = new_figure(width, height, ncols=n)
        return fig, list(grid[0])
    axes = list(ax) if isinstance(ax, (list, tuple)) or getattr(ax, "ndim", 0) else [ax]
    return axes[0].figure, axes


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
