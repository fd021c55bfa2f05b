"""A layer slider with a play button: spatial organisation emerging through depth, per model."""
from __future__ import annotations

import time

import ipywidgets as widgets

from ..plotting import model_color
from . import panels
from .explorer import model_header
from .panels import traceback_html
from .view import as_views

__all__ = ["LayerSlider"]


class LayerSlider:
    """Animate, layer by layer, where each model's probe puts every patch.

    For each model, one panel shows the held-out ridge probe's predicted cell for
    every patch as an arrow from the patch's true cell centre (averaged over the
    images, or for one image), and one shared panel plots every model's probe R²
    against depth with the current layer marked. A model without positional
    information shows arrows collapsing to the grid centre; a model that knows
    where its patches are shows short arrows.

    All layers' probes are fitted on construction (they are needed for the R²
    curve) and every frame is drawn once and kept, so the animation replays
    without computing anything.

    Parameters
    ----------
    models : dict or list
        ``{label: model or ModelView}``, or a list.
    images : optional
        Shared image set, see :class:`ModelView`.
    image_index : int, optional
        Show the predictions for this image over it; default: the mean over images.
    layer : int, default=0
    interval : int, default=900
        Milliseconds between frames when playing.
    **view_kwargs
        Passed to :class:`ModelView` (``num_images``, ``n_folds``, ...).

    Attributes
    ----------
    layer : ipywidgets.IntSlider
    play : ipywidgets.Play
        Linked to ``layer`` in the kernel, so Python sees the animation too.
    r2_curves : dict
        ``{label: ndarray (depth + 1,)}`` held-out R² per layer.
    last_render : dict
        ``{label: {"layer", "r2", "true" (N, 2), "pred" (N, 2)}}`` for the current frame
        (``pred`` is ``None`` where the model has fewer layers).
    widget : ipywidgets.VBox

    Examples
    --------
    >>> import asg_probe
    >>> from asg_probe.widgets import LayerSlider
    >>> models = [asg_probe.create_model("vit_tiny_patch4_32", pos=p, depth=2) for p in ("none", "ape")]
    >>> ls = LayerSlider(models, num_images=6)
    >>> ls.layer.value = 2
    >>> sorted(ls.last_render), ls.last_render["ape"]["layer"]
    (['ape', 'none'], 2)
    """

    def __init__(self, models, images=None, *, image_index=None, layer=0, interval=900, **view_kwargs):
        view_kwargs.setdefault("embedding", "pca")  # never laid out here; no reason to import umap
        self.views = as_views(models, images, **view_kwargs)
        self.image_index = None if image_index is None else int(image_index)
        max_depth = max(v.depth for v in self.views.values())
        self.r2_curves = {label: view.r2_curve() for label, view in self.views.items()}
        self.colors = {label: model_color(label) for label in self.views}

        self.layer = widgets.IntSlider(value=int(layer), min=0, max=max_depth, description="layer",
                                       continuous_update=True)
        self.play = widgets.Play(value=int(layer), min=0, max=max_depth, step=1, interval=int(interval),
                                 description="play")
        # A kernel-side link (not jslink): frames are drawn in the kernel anyway, and tests
        # driving `play.value` from Python see the slider follow.
        self._link = widgets.link((self.play, "value"), (self.layer, "value"))
        self.curve = widgets.Image(format="png")
        self._fields = {label: widgets.Image(format="png") for label in self.views}
        columns = [widgets.VBox([widgets.HTML(model_header(label, view, i)), self._fields[label]])
                   for i, (label, view) in enumerate(self.views.items())]
        self.status = widgets.HTML()
        self.widget = widgets.VBox([widgets.HBox([self.play, self.layer]),
                                    widgets.HBox(columns + [self.curve], layout=widgets.Layout(flex_flow="row wrap")),
                                    self.status])
        self.widget.add_class("asg-layer-slider")
        self._frames = {}
        self.last_render = {}
        self.last_timing = None
        self.last_error = None
        self.layer.observe(lambda change: self.update(), names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _frame(self, key, draw):
        if key not in self._frames:
            self._frames[key] = draw()
        return self._frames[key]

    def precompute(self):
        """Draw every frame now, so the first play is as smooth as the next ones."""
        current = self.layer.value
        for layer in range(self.layer.max + 1):
            self.layer.value = layer
        self.layer.value = current
        return self

    def update(self):
        """Show the frame of the current layer (drawn on first visit, then reused)."""
        start = time.perf_counter()
        layer = int(self.layer.value)
        try:
            self.last_render = {}
            for label, view in self.views.items():
                if layer > view.depth:
                    text = f"{label} has layers 0..{view.depth}"
                    self._fields[label].value = self._frame((label, "missing", layer),
                                                            lambda: panels.message_panel(text))
                    self.last_render[label] = {"layer": layer, "r2": None, "true": None, "pred": None}
                    continue
                fit = view.probe(layer)
                if self.image_index is None:
                    pred, picture, what = fit.mean_predictions(), None, "mean over images"
                else:
                    pred, picture, what = fit.predictions[self.image_index], \
                        view.display_images[self.image_index], f"image {self.image_index}"
                title = f"layer {layer} · {fit.label()} · {what}"
                self._fields[label].value = self._frame(
                    (label, layer),
                    lambda: panels.field_panel(picture, fit.true, pred, view.grid, view.patch_size, title))
                self.last_render[label] = {"layer": layer, "r2": fit.r2, "true": fit.true, "pred": pred}
            self.curve.value = self._frame(("curve", layer),
                                           lambda: panels.r2_curve_panel(self.r2_curves, layer, colors=self.colors))
            self.last_error = None
            self.last_timing = time.perf_counter() - start
            self.status.value = ""
        except Exception as exc:  # a notebook callback has nowhere else to report to
            self.last_error = exc
            self.last_timing = time.perf_counter() - start
            self.status.value = traceback_html(exc)
        return self
