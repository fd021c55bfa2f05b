"""Pick a layer and a head, see its attention offset kernel (:mod:`asg_probe.analysis.attention_offsets`)."""
from __future__ import annotations

import ipywidgets as widgets
import numpy as np

from . import panels
from .panels import traceback_html

__all__ = ["OffsetKernelViewer"]


class OffsetKernelViewer:
    """One panel per model: the chosen head's offset kernel, the query at the centre.

    Nothing is computed here: the viewer draws :class:`~asg_probe.analysis.attention_offsets.
    AttentionOffsetsResult` objects (from :func:`asg_probe.attention_offsets` or
    ``AttentionOffsetsResult.load(json_path)``). Each model keeps one colour scale over all
    its layers and heads, so moving the sliders compares heads on one scale.

    Parameters
    ----------
    results : AttentionOffsetsResult, dict or list
        One result, ``{label: result}`` or a list (labelled by each result's checkpoint).
    kind : {"logit", "prob"}
        Logit kernel (centred, diverging colours) or mean attention per offset.

    Attributes
    ----------
    layer, head : ipywidgets.IntSlider
    kind : ipywidgets.ToggleButtons
    last_render : dict
        ``{label: {"layer", "head", "kernel" (2H − 1, 2W − 1), "r2"}}`` of the current view.
    widget : ipywidgets.VBox

    Examples
    --------
    >>> import asg_probe, torch
    >>> from asg_probe.widgets import OffsetKernelViewer
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="alibi2d", depth=2)
    >>> res = asg_probe.attention_offsets(m, torch.randn(4, 3, 32, 32), progress=False, label="alibi2d")
    >>> viewer = OffsetKernelViewer(res)
    >>> viewer.layer.value, viewer.head.value = 2, 3
    >>> viewer.last_render["alibi2d"]["kernel"].shape
    (15, 15)
    """

    def __init__(self, results, kind="logit"):
        if hasattr(results, "kernels"):
            results = [results]
        if not isinstance(results, dict):
            results = {(r.checkpoint or f"model {i}"): r for i, r in enumerate(results)}
        if not results:
            raise ValueError("OffsetKernelViewer needs at least one attention-offsets result")
        if kind not in ("logit", "prob"):
            raise ValueError(f"kind must be 'logit' or 'prob', got {kind!r}")
        self.results = dict(results)
        layers = sorted({layer for r in self.results.values() for layer in r.layers})
        heads = max(m.shape[0] for r in self.results.values() for m in r.kernels.values())
        self.layer = widgets.IntSlider(value=layers[-1], min=layers[0], max=layers[-1], description="layer")
        self.head = widgets.IntSlider(value=0, min=0, max=heads - 1, description="head")
        self.kind = widgets.ToggleButtons(options=["logit", "prob"], value=kind, description="kernel")
        self._images = {label: widgets.Image(format="png") for label in self.results}
        self.status = widgets.HTML()
        self.widget = widgets.VBox([widgets.HBox([self.layer, self.head]), self.kind,
                                    widgets.HBox(list(self._images.values())), self.status])
        self.last_render, self.last_error = {}, None
        for control in (self.layer, self.head, self.kind):
            control.observe(lambda change: self.update(), names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def update(self):
        """Draw the current layer, head and kind for every model."""
        layer, head, kind = int(self.layer.value), int(self.head.value), self.kind.value
        try:
            self.last_render = {}
            for label, res in self.results.items():
                maps = res.kernels if kind == "logit" else res.prob_kernels
                if layer not in maps or head >= maps[layer].shape[0]:
                    self._images[label].value = panels.message_panel(f"{label}: no layer {layer}, head {head}")
                    continue
                kernel = maps[layer][head]
                top = max(float(np.abs(m).max()) for m in maps.values()) or 1.0
                self._images[label].value = _kernel_panel(kernel, res.grid, kind, top,
                                                          f"{label} · L{layer} h{head} · R² {res.r2[layer][head]:.2f}")
                self.last_render[label] = {"layer": layer, "head": head, "kernel": kernel,
                                           "r2": res.r2[layer][head]}
            self.last_error, self.status.value = None, ""
        except Exception as exc:  # a notebook callback has nowhere else to report to
            self.last_error, self.status.value = exc, traceback_html(exc)
        return self


def _kernel_panel(kernel, grid, kind, top, title) -> bytes:
    fig, ax = panels.new_panel()
    gh, gw = grid
    extent = (-(gw - 1) - 0.5, gw - 1 + 0.5, gh - 1 + 0.5, -(gh - 1) - 0.5)
    scale = dict(vmin=-top, vmax=top, cmap="RdBu_r") if kind == "logit" else dict(vmin=0, vmax=top, cmap="magma")
    ax.imshow(kernel, extent=extent, interpolation="nearest", **scale)
    ax.plot([0], [0], marker="+", color="0.2", ms=6)
    ax.set_xlabel("Δcol (key − query)", fontsize=8)
    ax.set_ylabel("Δrow", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return panels.to_png(fig)
