"""Side-by-side explorer: attention, probe predictions and token embeddings of several models."""
from __future__ import annotations

import html
import time

import ipywidgets as widgets

from ..plotting import display_name, model_color
from . import panels
from .panels import traceback_html
from .view import as_views

__all__ = ["ComparisonExplorer", "MEAN_HEAD"]

#: Value of the head control that averages the heads.
MEAN_HEAD = -1
PANEL_KINDS = ("attention", "field", "embedding")


def scaled_cell(row, col, grid, full_grid):
    """``(row, col)`` on ``full_grid`` mapped to the same relative place on ``grid``.

    Models with different grids share one pair of query sliders (sized to the
    largest grid); each model reads the patch at the same relative position.
    """
    def one(v, n, full):
        return int(round(v * (n - 1) / (full - 1))) if full > 1 else 0

    return one(row, grid[0], full_grid[0]), one(col, grid[1], full_grid[1])


def model_header(label, view, index=0, note="") -> str:
    """The coloured name of a model over its panels (one colour per model, as in every figure).

    ``note`` is appended in grey (e.g. the training step shown); ``index`` is ignored
    (kept for old callers: a model's colour never depends on its position).
    """
    extra = f" · {html.escape(note)}" if note else ""
    return (f"<b style='color:{model_color(label)}'>{html.escape(display_name(label))}</b> "
            f"<span style='color:#666;font-size:85%'>{view.depth} blocks · {view.num_heads} heads · "
            f"grid {view.grid[0]}×{view.grid[1]}{extra}</span>")


class ComparisonExplorer:
    """Pick models, a layer, a head, a query patch and an image; see the models side by side.

    Each selected model gets a column of three panels:

    * **attention** of the chosen head (or the mean of heads) in block ``layer``,
      for the query patch of the chosen image, over the image (prefix tokens
      removed, rows renormalised, so uniform attention is ``1 / N`` per cell);
    * **probe field**: arrows from each patch's cell centre to the held-out ridge
      probe's predicted cell centre for that image, with the layer's CV R²;
    * **embedding**: UMAP (or PCA) of the layer's patch tokens coloured by grid
      position (:func:`asg_probe.plotting.position_colors`), query token starred.

    Everything heavy is cached per model and layer (:class:`ModelView`), so a change
    of head, query patch or image only redraws panels; a new layer costs one probe
    solve and one embedding per model, once.

    Parameters
    ----------
    models : dict or list
        ``{label: model or ModelView}``, or a list (labels from each model's ``pos``).
    images : optional
        Shared image set, see :class:`ModelView` (default: embedded photographs).
    image_index : int, default=0
    layer : int, optional
        Initial layer (default: the last layer every model has).
    head : int, optional
        Initial head, ``MEAN_HEAD`` (-1, the default) for the mean of heads.
    query : (int, int), optional
        Initial query patch ``(row, col)`` (default: the centre).
    show : list of str, optional
        Labels selected at first (default: all).
    orientation : {"columns", "rows"}, default="columns"
        One column per model with its panels stacked (panels of a kind line up across
        models), or one row per model.
    **view_kwargs
        Passed to :class:`ModelView` for models given as modules (``num_images``,
        ``embedding``, ``n_folds``, ...); ignored for models given as ``ModelView``.

    Attributes
    ----------
    models, layer, head, row, col, image : ipywidgets controls
        Setting ``.value`` from Python redraws, as moving them in the notebook does.
    views : dict
        ``{label: ModelView}``.
    last_render : dict
        ``{label: {...}}`` what the panels of each shown model draw now: ``layer``,
        ``head``, ``image``, ``query`` (patch index), ``query_cell``, ``attention``
        (``(gh, gw)`` or ``None``), ``true`` and ``pred`` (``(N, 2)`` cells), ``r2``,
        ``embedding`` (``(M, 2)``), ``embedding_query`` (row of it or ``None``).
    render_counts : dict
        ``{(label, panel): times drawn}``.
    last_timing : float
        Seconds taken by the last update.
    last_error : BaseException or None
        Set when an update failed (the traceback is also shown under the panels).
    widget : ipywidgets.VBox
        The whole explorer; a notebook displays the explorer object itself.

    Examples
    --------
    >>> import asg_probe
    >>> from asg_probe.widgets import ComparisonExplorer
    >>> models = {p: asg_probe.create_model("vit_tiny_patch4_32", pos=p, depth=2) for p in ("none", "ape")}
    >>> ex = ComparisonExplorer(models, num_images=6, embedding="pca")
    >>> ex.layer.value = 1; ex.head.value = 2; ex.row.value = 0
    >>> ex.last_render["ape"]["attention"].shape
    (8, 8)
    """

    def __init__(self, models, images=None, *, image_index=0, layer=None, head=MEAN_HEAD, query=None,
                 show=None, orientation="columns", **view_kwargs):
        if orientation not in ("columns", "rows"):
            raise ValueError(f"orientation must be 'columns' or 'rows', got {orientation!r}")
        self.views = as_views(models, images, **view_kwargs)
        views = list(self.views.values())
        labels = list(self.views)
        self.full_grid = (max(v.grid[0] for v in views), max(v.grid[1] for v in views))
        num_images = min(v.num_images for v in views)
        max_depth = max(v.depth for v in views)
        max_heads = max(v.num_heads for v in views)
        if layer is None:
            layer = min(v.depth for v in views)
        if query is None:
            query = (self.full_grid[0] // 2, self.full_grid[1] // 2)

        style = {"description_width": "60px"}
        self.models = widgets.SelectMultiple(options=labels, value=tuple(show or labels), description="models",
                                             rows=min(len(labels), 6), style=style)
        self.layer = widgets.IntSlider(value=int(layer), min=0, max=max_depth, description="layer",
                                       continuous_update=False, style=style)
        self.head = widgets.Dropdown(options=[("mean of heads", MEAN_HEAD)] + [(f"head {h}", h) for h in
                                                                               range(max_heads)],
                                     value=int(head), description="head", style=style)
        self.row = widgets.IntSlider(value=int(query[0]), min=0, max=self.full_grid[0] - 1, description="row",
                                     continuous_update=False, style=style)
        self.col = widgets.IntSlider(value=int(query[1]), min=0, max=self.full_grid[1] - 1, description="col",
                                     continuous_update=False, style=style)
        self.image = widgets.IntSlider(value=int(image_index), min=0, max=num_images - 1, description="image",
                                       continuous_update=False, style=style)
        self.status = widgets.HTML()
        self._panels, self._model_boxes, self._painters = {}, {}, {}
        inner, outer = (widgets.VBox, widgets.HBox) if orientation == "columns" else (widgets.HBox, widgets.VBox)
        for i, (label, view) in enumerate(self.views.items()):
            self._panels[label] = {"header": widgets.HTML(model_header(label, view, i)),
                                   **{kind: widgets.Image(format="png") for kind in PANEL_KINDS}}
            self._painters[label] = {"attention": panels.AttentionPanel(), "field": panels.FieldPanel(),
                                     "embedding": panels.EmbeddingPanel()}
            panel_box = inner([self._panels[label][kind] for kind in PANEL_KINDS])
            self._model_boxes[label] = widgets.VBox([self._panels[label]["header"], panel_box])
        self.columns = outer()
        if outer is widgets.HBox:
            self.columns.layout.flex_flow = "row wrap"  # many models wrap onto the next line
        # Subclasses add controls here, beside the layer slider (the training-step slider).
        self.depth_controls = widgets.VBox([self.layer, self.head, self.image])
        controls = widgets.HBox([
            self.models,
            self.depth_controls,
            widgets.VBox([widgets.HTML("<b>query patch</b>"), self.row, self.col]),
        ])
        self.widget = widgets.VBox([controls, self.columns, self.status])
        self.widget.add_class("asg-comparison-explorer")

        self.last_render = {}
        self.render_counts = {}
        self.last_timing = None
        self.last_error = None
        self._keys = {}
        for control in (self.models, self.layer, self.head, self.row, self.col, self.image):
            control.observe(self._on_change, names="value")
        self.update()

    # ------------------------------------------------------------------ notebook display

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def panel(self, label, kind):
        """The ``ipywidgets.Image`` showing panel ``kind`` (``attention``, ``field``, ``embedding``) of ``label``."""
        if kind not in PANEL_KINDS:
            raise ValueError(f"kind must be one of {PANEL_KINDS}, got {kind!r}")
        return self._panels[label][kind]

    # ------------------------------------------------------------------ updates

    def _on_change(self, change):
        self.update()

    def update(self):
        """Redraw what the current control values call for; panels whose inputs did not change are kept."""
        start = time.perf_counter()
        try:
            shown = [label for label in self.models.value if label in self.views]
            boxes = tuple(self._model_boxes[label] for label in shown)
            if self.columns.children != boxes:  # reuse the boxes: no new widget models, no flicker
                self.columns.children = boxes
            for label in shown:
                self._render_model(label)
            self.last_render = {k: v for k, v in self.last_render.items() if k in shown}
            self.last_error = None
            self.last_timing = time.perf_counter() - start
            self.status.value = (f"<span style='color:#666;font-size:85%'>updated in "
                                 f"{1000 * self.last_timing:.0f} ms</span>")
        except Exception as exc:  # a notebook callback has nowhere else to report to
            self.last_error = exc
            self.last_timing = time.perf_counter() - start
            self.status.value = traceback_html(exc)
        return self

    def _busy(self, text):
        # Sent right away, so the notebook shows why the first visit of a layer takes a while.
        self.status.value = f"<span style='color:#a60'>{html.escape(text)}…</span>"

    def _draw(self, label, kind, key, draw):
        """Call ``draw() -> png`` only if ``key`` changed since this panel was last drawn."""
        if self._keys.get((label, kind)) == key:
            return
        self._panels[label][kind].value = draw()
        self._keys[(label, kind)] = key
        self.render_counts[(label, kind)] = self.render_counts.get((label, kind), 0) + 1

    def _render_model(self, label):
        view = self.views[label]
        layer, head, image = int(self.layer.value), int(self.head.value), int(self.image.value)
        qrow, qcol = scaled_cell(self.row.value, self.col.value, view.grid, self.full_grid)
        query = view.patch_index(qrow, qcol)
        state = {"layer": layer, "head": head, "image": image, "query": query, "query_cell": (qrow, qcol),
                 "attention": None, "true": None, "pred": None, "r2": None, "embedding": None,
                 "embedding_query": None}
        self.last_render[label] = state
        if layer > view.depth or image >= view.num_images:
            text = (f"{label} has layers 0..{view.depth}" if layer > view.depth
                    else f"{label} has images 0..{view.num_images - 1}")
            for kind in PANEL_KINDS:
                self._draw(label, kind, ("missing", text), lambda: panels.message_panel(text))
            return
        picture = view.display_images[image]
        painters = self._painters[label]
        head_name = "mean of heads" if head == MEAN_HEAD else f"head {head}"

        # attention
        if layer == 0:
            text = "layer 0 is the patch embedding:\nno attention yet"
            self._draw(label, "attention", ("layer0",), lambda: panels.message_panel(text, "attention"))
        elif head >= view.num_heads:
            text = f"{label} has heads 0..{view.num_heads - 1}"
            self._draw(label, "attention", ("nohead", head), lambda: panels.message_panel(text, "attention"))
        else:
            if not view.cached("attention", image):
                self._busy(f"{label}: attention of image {image}")
            att = view.attention_map(layer, image, query, head=None if head == MEAN_HEAD else head)
            state["attention"] = att
            title = f"attention · block {layer} · {head_name}"
            self._draw(label, "attention", (layer, head, image, query),
                       lambda: painters["attention"].render(picture, att, (qrow, qcol), view.patch_size, title))

        # probe field
        if not view.cached("probe", layer):
            self._busy(f"{label}: probe of layer {layer}")
        fit = view.probe(layer)
        state.update(true=fit.true, pred=fit.predictions[image], r2=fit.r2)
        title = f"probe · layer {layer} · {fit.label()}"
        self._draw(label, "field", (layer, image, query),
                   lambda: painters["field"].render(picture, fit.true, fit.predictions[image], view.grid,
                                                    view.patch_size, title, query=query))

        # embedding
        if not view.cached("embedding", layer):
            self._busy(f"{label}: {view.embedding_method.upper()} of layer {layer}")
        emb = view.embedding(layer)
        hit = emb.index_of(image, query)
        state.update(embedding=emb.xy, embedding_query=hit)
        title = f"tokens · layer {layer}"
        self._draw(label, "embedding", (layer, image, query),
                   lambda: painters["embedding"].render(emb, view.grid, title, highlight=hit))
