"""Matplotlib drawings of the widget panels, returned as PNG bytes.

Each panel is a small standalone ``Figure`` drawn with the Agg canvas: no pyplot
state, nothing shown twice by the notebook's inline backend, and a PNG that any
frontend (JupyterLab, VS Code, nbviewer, a headless browser) displays in an
``ipywidgets.Image``.

The explorer's panels are objects that build their figure once and afterwards
only move artists (``set_data``, ``set_UVC``, ``set_offsets``): creating axes costs
about as much as drawing them, and a head or query change must feel instant.
"""
from __future__ import annotations

import html
import io
import traceback

import numpy as np

from ..plotting import display_name, position_colors

#: Panel side in inches and resolution: ~250 px squares, so four models fit side by side.
PANEL_INCHES = 2.8
PANEL_DPI = 90


def new_panel(width=PANEL_INCHES, height=PANEL_INCHES):
    """A standalone Agg figure with one axes (no pyplot: nothing leaks into the notebook)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=PANEL_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    # Light compression: these PNGs travel once over a local socket; encoding time is what shows.
    fig.savefig(buf, format="png", dpi=PANEL_DPI, pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def message_panel(text: str, title: str = "") -> bytes:
    """A blank panel that says why there is nothing to draw (e.g. layer 0 has no attention)."""
    fig, ax = new_panel()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, color="0.3",
            transform=ax.transAxes)
    if title:
        ax.set_title(title, fontsize=9)
    return to_png(fig)


def _cell_box(ax, row, col, patch, color):
    from matplotlib.patches import Rectangle

    return ax.add_patch(Rectangle((col * patch, row * patch), patch, patch, fill=False, edgecolor=color, lw=1.6))


def _bare(ax):
    ax.set_xticks([])
    ax.set_yticks([])


class AttentionPanel:
    """The query patch's attention ``(gh, gw)`` over the image, one colour per patch cell.

    The colour scale runs from 0 to the map's maximum, printed under the panel next
    to the uniform value ``1 / N``, so a flat map is recognisable as flat.
    """

    def __init__(self):
        self.fig = None

    def render(self, image, att_map, query_cell, patch, title) -> bytes:
        h, w = image.shape[:2]
        top = float(att_map.max()) or 1.0
        if self.fig is None:
            self.fig, ax = new_panel()
            self._image = ax.imshow(image, extent=(0, w, h, 0), interpolation="bilinear")
            # Nearest-neighbour upsampling: one attention weight belongs to one whole patch.
            self._map = ax.imshow(att_map, extent=(0, w, h, 0), cmap="inferno", alpha=0.65, vmin=0, vmax=top,
                                  interpolation="nearest")
            self._box = _cell_box(ax, *query_cell, patch, "cyan")
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            _bare(ax)
            self._title = ax.set_title(title, fontsize=9)
            self._note = ax.set_xlabel("", fontsize=8)
            self._ax = ax
        else:
            self._image.set_data(image)
            self._map.set_data(att_map)
            self._map.set_clim(0, top)
            self._box.set_xy((query_cell[1] * patch, query_cell[0] * patch))
            self._title.set_text(title)
        self._ax.set_xlabel(f"max {att_map.max():.3f} · uniform {1 / att_map.size:.3f}", fontsize=8)
        return to_png(self.fig)


class FieldPanel:
    """Arrows from each patch's cell centre to the probe's predicted cell centre.

    ``true_cells`` and ``pred_cells`` are ``(N, 2)`` ``(row, col)`` in cell units.
    Arrow colour is the patch's true position (:func:`asg_probe.plotting.position_colors`).
    """

    def __init__(self, image_alpha=0.35):
        self.fig = None
        self.image_alpha = image_alpha

    def render(self, image, true_cells, pred_cells, grid, patch, title, query=None) -> bytes:
        h, w = grid[0] * patch, grid[1] * patch
        start = (np.asarray(true_cells) + 0.5) * patch          # (N, 2) pixel (y, x) of cell centres
        delta = (np.asarray(pred_cells) + 0.5) * patch - start
        box_xy = (-10 * w, -10 * h) if query is None else ((query % grid[1]) * patch, (query // grid[1]) * patch)
        if self.fig is None:
            self.fig, ax = new_panel()
            colors = position_colors(grid)
            self._image = None
            if image is not None:
                self._image = ax.imshow(image, extent=(0, w, h, 0), alpha=self.image_alpha, interpolation="bilinear")
            ax.scatter(start[:, 1], start[:, 0], s=5, c=colors, edgecolors="none")
            self._arrows = ax.quiver(start[:, 1], start[:, 0], delta[:, 1], delta[:, 0], color=colors,
                                     angles="xy", scale_units="xy", scale=1, width=0.008, headwidth=3.5,
                                     headlength=4)
            self._box = _cell_box(ax, 0, 0, patch, "black")
            pad = 0.5 * patch  # a little room for arrows that overshoot the grid
            ax.set_xlim(-pad, w + pad)
            ax.set_ylim(h + pad, -pad)
            ax.set_aspect("equal")
            _bare(ax)
            self._title = ax.set_title(title, fontsize=9)
        else:
            if self._image is not None and image is not None:
                self._image.set_data(image)
            self._arrows.set_UVC(delta[:, 1], delta[:, 0])
            self._title.set_text(title)
        self._box.set_xy(box_xy)
        return to_png(self.fig)


class EmbeddingPanel:
    """2-D token layout coloured by grid position; one point (the query token) starred."""

    def __init__(self):
        self.fig = None

    def render(self, emb, grid, title, highlight=None) -> bytes:
        colors = position_colors(grid)[emb.patch]
        star = emb.xy[highlight] if highlight is not None else np.array([np.nan, np.nan])
        if self.fig is None or len(emb.xy) != self._count:
            if self.fig is None:
                self.fig, self._ax = new_panel()
            ax = self._ax
            ax.clear()
            self._points = ax.scatter(emb.xy[:, 0], emb.xy[:, 1], s=4, c=colors, edgecolors="none", alpha=0.8)
            self._star = ax.scatter([star[0]], [star[1]], s=90, marker="*", c="white", edgecolors="black",
                                    linewidths=1.0, zorder=3)
            self._count = len(emb.xy)
            _bare(ax)
            self._title = ax.set_title(title, fontsize=9)
            self._note = ax.set_xlabel("", fontsize=8)
        else:
            self._points.set_offsets(emb.xy)
            self._points.set_facecolors(colors)
            self._star.set_offsets([star])
            self._title.set_text(title)
        if highlight is not None:
            self._star.set_facecolors([colors[highlight]])
        lo, hi = emb.xy.min(0), emb.xy.max(0)
        margin = 0.05 * np.maximum(hi - lo, 1e-6)
        self._ax.set_xlim(lo[0] - margin[0], hi[0] + margin[0])
        self._ax.set_ylim(lo[1] - margin[1], hi[1] + margin[1])
        self._note.set_text(emb.method.upper() + " of patch tokens")
        return to_png(self.fig)


def field_panel(image, true_cells, pred_cells, grid, patch, title, query=None, image_alpha=0.35) -> bytes:
    """One-off :class:`FieldPanel` drawing."""
    return FieldPanel(image_alpha).render(image, true_cells, pred_cells, grid, patch, title, query=query)


def r2_curve_panel(curves, layer, title="probe R² by layer", colors=None) -> bytes:
    """R² against layer for one or more models, the current layer marked."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = new_panel(width=PANEL_INCHES * 1.2)
    for label, r2 in curves.items():
        color = None if colors is None else colors[label]
        ax.plot(np.arange(len(r2)), r2, marker="o", ms=3, lw=1.4, label=display_name(label), color=color)
        if layer < len(r2):
            ax.scatter([layer], [r2[layer]], s=50, color=color, edgecolors="black", zorder=3)
    ax.axvline(layer, color="0.6", lw=0.8, ls="--")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = patch embedding)", fontsize=8)
    ax.set_ylabel("held-out R² (row, col mean)", fontsize=8)
    ax.set_ylim(min(-0.05, min(float(np.nanmin(r)) for r in curves.values()) - 0.05), 1.05)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return to_png(fig)


def traceback_html(exc: BaseException) -> str:
    """A failed update's traceback as HTML for a status line (a widget callback has nowhere else to report)."""
    return ("<pre style='color:#b00;font-size:80%'>"
            + html.escape("".join(traceback.format_exception(exc))) + "</pre>")
