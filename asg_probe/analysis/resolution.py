"""Resolution transfer: fit coordinate probes at one input size, evaluate them at others.

Protocol. The images with an **even** index fit one ridge probe per layer at the
training size (streamed statistics, alpha by cross-validation split by image,
exactly as :mod:`asg_probe.analysis.layerwise`). The images with an **odd** index
are then shown at every evaluation size and the fitted probes' predictions are
scored against the normalised ``(row, col)`` of *that* size's grid, so the
question is "does the probe's map from token to relative position still hold
when the grid grows or shrinks?".

How the images of each size are made is part of the result (``size_source``):

- ``"rendered"``: the procedural scenes (``images="scenes"``) are drawn afresh at
  every size, same seed and count, so scene ``i`` is the same scene at every size
  (see :func:`resolution_transfer` for what the generator's pixel-size rules change);
- ``"resized"``: any other source (photographs, a folder, a tensor) is loaded once
  at the largest size and every size is made from it by bicubic, antialiased resizing.

Every row reports the absolute R² and the fraction of the same layer's fit-size R²
it keeps (``r2_retained``, ``r2_row_retained``, ``r2_col_retained``): two models
can have the same R² at a new size, one having kept all of its fit-size R² and the
other having lost part of a higher one.

Only running sums are kept (per layer and size: squared error, target sum and
sum of squares), so memory does not grow with the number of images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from ..extract import Accumulator
from ..geometry import any_input_size  # noqa: F401 - public here too, as before
from ..probes import coordinate_targets
from ..results import AnalysisResult

__all__ = ["ResolutionResult", "TransferAccumulator", "default_sizes", "resolution_transfer", "any_input_size",
           "add_retained", "RETAINED_FLOOR"]

#: Evaluation sizes relative to the training size (rounded to the patch).
DEFAULT_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)

#: Retained fractions are NaN where the fit-size R² is below this: a fraction of a
#: near-zero R² (a layer that holds no position) is noise, not transfer.
RETAINED_FLOOR = 0.05

#: Smallest size the procedural scenes render at (:func:`asg_probe.scenes.render_scene`).
MIN_RENDER_SIZE = 8

_RETAINED = (("r2", "r2_retained"), ("r2_row", "r2_row_retained"), ("r2_col", "r2_col_retained"))


def default_sizes(train_size: int, patch: int):
    """About six sizes from 0.5× to 2× ``train_size``, multiples of ``patch``, the training size included.

    Examples
    --------
    >>> default_sizes(224, 16)
    [112, 176, 224, 288, 336, 448]
    """
    sizes = {max(patch, int(f * train_size / patch + 0.5) * patch) for f in DEFAULT_FACTORS}
    return sorted(sizes | {int(train_size)})


def _as_size(value, what):
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or int(value[0]) != int(value[1]):
            raise UsageError(f"{what} must be one square size (an int), got {value!r}")
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be an int, got {value!r}") from None


def _renders(images) -> bool:
    """Whether ``images`` names a source that can be drawn at any size: the procedural scenes
    (the string ``"scenes"`` where no file or folder of that name exists, as in :func:`~asg_probe.data.load_images`)."""
    return isinstance(images, str) and images == "scenes" and not Path(images).exists()


def add_retained(rows, train_size, floor=RETAINED_FLOOR):
    """Add ``r2_retained``, ``r2_row_retained``, ``r2_col_retained`` to every row (in place).

    Each is the row's value divided by the same layer's value at ``train_size``; NaN where
    that fit-size value is missing, NaN, or below ``floor``.

    Examples
    --------
    >>> rows = [{"layer": 0, "size": 16, "r2": 0.3, "r2_row": 0.2, "r2_col": 0.01},
    ...         {"layer": 0, "size": 32, "r2": 0.6, "r2_row": 0.8, "r2_col": 0.04}]
    >>> add_retained(rows, 32)[0]["r2_retained"], rows[1]["r2_retained"], rows[0]["r2_col_retained"]
    (0.5, 1.0, nan)
    """
    at_fit = {r["layer"]: r for r in rows if r["size"] == train_size}
    for row in rows:
        fit = at_fit.get(row["layer"], {})
        for column, retained in _RETAINED:
            value, ref = row.get(column, np.nan), fit.get(column, np.nan)
            ok = value is not None and ref is not None and np.isfinite(ref) and ref >= floor
            row[retained] = float(value) / float(ref) if ok else float("nan")
    return rows


def _check_size(size, patch, what="size"):
    if size < patch or size % patch:
        lower = max(patch, size // patch * patch)
        raise UsageError(f"{what} {size} is not a positive multiple of the patch size {patch}; "
                         f"pass e.g. {lower} or {lower + patch}")
    return size


class TransferAccumulator(Accumulator):
    """Scores fixed (already fitted) coordinate probes on the tokens of one input size.

    Per layer it keeps, per target column (row, col): the token count, the sum of
    squared errors and the target sum and sum of squares, so that
    ``R² = 1 - SSE / SST`` with SST around the evaluation set's own mean (as
    ``sklearn.metrics.r2_score``). Counts from several processes add up.

    Parameters
    ----------
    probes : dict
        ``{layer: (coef (2, D), intercept (2,))}`` mapping tokens to normalised (row, col).
    """

    def __init__(self, probes):
        self.probes = {int(l): (torch.as_tensor(np.asarray(w), dtype=torch.float64),
                                torch.as_tensor(np.asarray(b), dtype=torch.float64)) for l, (w, b) in probes.items()}
        self.sums = {l: torch.zeros(4, 2, dtype=torch.float64) for l in self.probes}  # n, sse, sum_y, sum_y2
        self.grid = None

    def update(self, batch):
        self.grid = tuple(int(g) for g in batch.grid)
        for layer, (w, b) in self.probes.items():
            tokens = batch.tokens[layer]
            B, N, _ = tokens.shape
            Y = coordinate_targets(self.grid, device=tokens.device, dtype=torch.float64)      # (N, 2)
            pred = tokens.to(torch.float64) @ w.to(tokens.device).T + b.to(tokens.device)     # (B, N, 2)
            s = self.sums[layer]
            s[0] += B * N
            s[1] += ((pred - Y) ** 2).sum((0, 1)).cpu()
            s[2] += B * Y.sum(0).cpu()
            s[3] += B * (Y * Y).sum(0).cpu()

    def all_reduce(self, group=None):
        """Sum the counts over torch.distributed processes (no-op in one process)."""
        from ..distributed import all_reduce_sum

        all_reduce_sum([self.sums[layer] for layer in sorted(self.sums)], group)

    def scores(self):
        """``{layer: (r2_row, r2_col)}`` of everything added (after :meth:`all_reduce`: all processes)."""
        out = {}
        for layer, (n, sse, sy, sy2) in self.sums.items():
            sst = sy2 - sy * sy / n.clamp_min(1)
            r2 = torch.where(sst > 1e-12, 1 - sse / sst.clamp_min(1e-12), torch.full_like(sst, float("nan")))
            out[layer] = tuple(float(v) for v in r2)
        return out


class ResolutionResult(AnalysisResult):
    """Probe R² per layer and input size, probes fit at ``train_size``.

    ``rows``: one dict per (layer, size) with ``layer``, ``size``, ``grid``,
    ``r2_row``, ``r2_col``, ``r2``, ``is_fit_size`` and the retained fractions
    ``r2_row_retained``, ``r2_col_retained``, ``r2_retained`` (the value over the same
    layer's value at ``train_size``; NaN where that is below :attr:`retained_floor`),
    added here when the rows lack them. ``fit``: one dict per layer with the probe's
    cross-validated R² on the fitting images (``r2_cv``) and its ``alpha``.
    ``size_source``: how the images of each size were made, ``"rendered"`` (scenes
    drawn at each size) or ``"resized"`` (one source resized); ``None`` when unknown.

    Examples
    --------
    >>> rows = [{"layer": 1, "size": s, "r2_row": v, "r2_col": v, "r2": v} for s, v in ((16, 0.4), (32, 0.8))]
    >>> res = ResolutionResult(rows, 32, [16, 32], 4, size_source="rendered")
    >>> res.curve(1, "r2_retained")[1].tolist(), res.to_dict()["size_source"]
    ([0.5, 1.0], 'rendered')
    >>> res.summary_line()
    'layer 1 (best at 32px): R² 16px 0.40, 32px 0.80; retained 50% at 16px, 100% at 32px (sizes rendered)'
    """

    name = "resolution"
    #: Fit-size R² below which a retained fraction is NaN (see :data:`RETAINED_FLOOR`).
    retained_floor = RETAINED_FLOOR

    def __init__(self, rows, train_size, sizes, patch_size, fit=None, checkpoint="", num_images_fit=None,
                 num_images_eval=None, size_source=None):
        self.train_size = int(train_size)
        self.rows = add_retained([dict(r) for r in rows], self.train_size, self.retained_floor)
        self.sizes = [int(s) for s in sizes]
        self.patch_size = int(patch_size)
        self.fit = fit or []
        self.checkpoint = checkpoint
        self.num_images_fit = num_images_fit
        self.num_images_eval = num_images_eval
        self.size_source = size_source

    def to_dict(self):
        return {"checkpoint": self.checkpoint, "train_size": self.train_size, "sizes": self.sizes,
                "patch_size": self.patch_size, "size_source": self.size_source,
                "retained_floor": self.retained_floor, "num_images_fit": self.num_images_fit,
                "num_images_eval": self.num_images_eval, "fit": self.fit, "layers": self.rows}

    def curve(self, layer, column="r2"):
        """``(sizes, values)`` of one layer (``column``: any row entry, e.g. ``"r2_retained"``)."""
        pts = sorted((r["size"], r[column]) for r in self.rows if r["layer"] == layer)
        return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)

    def best_layer(self):
        """The layer with the highest R² at the training size."""
        at_train = [r for r in self.rows if r["size"] == self.train_size] or self.rows
        return max(at_train, key=lambda r: -np.inf if np.isnan(r["r2"]) else r["r2"])["layer"]

    def plot(self, ax=None, layers=None, value="r2"):
        """R² against input size, one line per layer (default: the best layer and the last one).

        ``value="retained"`` draws the fraction of each layer's fit-size R² kept instead
        (the ``*_retained`` columns; a layer below :attr:`retained_floor` at the fit size
        has no curve), with a line at 1.
        """
        from ..plotting import new_figure

        if value not in ("r2", "retained"):
            raise UsageError(f"value must be 'r2' or 'retained', got {value!r}")
        suffix = "_retained" if value == "retained" else ""
        shades = ("k", "0.55", "0.3", "0.75")  # layers, not models: no model colour
        if ax is None:
            fig, axes = new_figure(6.6, 3.4)
            ax = axes[0][0]
        fig = ax.figure
        all_layers = sorted({r["layer"] for r in self.rows})
        if layers is None:
            best, last = self.best_layer(), all_layers[-1]
            layers = [(best, f"layer {best} (best at fit size)"), (last, f"layer {last} (last)")]
            layers = layers[1:] if best == last else layers
        else:
            layers = [(l, f"layer {l}") for l in layers]
        for i, (layer, label) in enumerate(layers):
            sizes, r2 = self.curve(layer, "r2" + suffix)
            line, = ax.plot(sizes, r2, marker="o", ms=4, lw=2, label=label, color=shades[i % len(shades)])
            for col, ls in (("r2_row", ":"), ("r2_col", "--")):
                ax.plot(sizes, self.curve(layer, col + suffix)[1], ls=ls, lw=0.9, color=line.get_color())
        ax.axvline(self.train_size, color="0.5", lw=0.8)  # solid: dashed and dotted are the column and row
        ax.annotate("fit size", (self.train_size, 0.02), xycoords=("data", "axes fraction"), fontsize=7,
                    rotation=90, ha="right", va="bottom")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(self.sizes)
        # every other size labelled when there are many: 8 pt labels that do not overlap
        every = 2 if len(self.sizes) > 8 else 1
        ax.set_xticklabels([f"{s}\n({s // self.patch_size}²)" if i % every == 0 or s == self.train_size else ""
                            for i, s in enumerate(self.sizes)], fontsize=8)
        ax.set_xlabel("input size, px (patch grid)")
        values = np.array([r["r2" + suffix] for r in self.rows], dtype=float)
        low = np.nanmin(values) if np.isfinite(values).any() else 0.0
        if value == "retained":
            ax.axhline(1, color="0.5", lw=0.5)  # all of the fit-size R² kept
            ax.set_ylabel("fraction of fit-size R² retained\n(dotted: row, dashed: col)")
            high = np.nanmax(values) if np.isfinite(values).any() else 1.0
            ax.set_ylim(max(-1.0, min(-0.05, low - 0.05)), max(1.1, min(3.0, high + 0.05)))
        else:
            ax.set_ylabel("R² on held-out images\n(dotted: row, dashed: col)")
            ax.set_ylim(max(-1.0, min(-0.05, low - 0.05)), 1.02)
        ax.grid(alpha=0.3)
        title = "Resolution transfer" + (" (retained fraction)" if value == "retained" else "")
        if self.checkpoint:
            title += f" — {self.checkpoint}"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.tight_layout()
        return fig

    def summary_line(self):
        best = self.best_layer()
        sizes, r2 = self.curve(best)
        parts = ", ".join(f"{s}px {v:.2f}" for s, v in zip(sizes, r2))
        line = f"layer {best} (best at {self.train_size}px): R² {parts}"
        kept = self.curve(best, "r2_retained")[1]
        if len(sizes):  # the smallest and the largest size: where a transfer breaks first
            ends = sorted({0, len(sizes) - 1})
            line += "; retained " + ", ".join(f"{kept[i]:.0%} at {sizes[i]}px" if np.isfinite(kept[i])
                                              else f"n/a at {sizes[i]}px" for i in ends)
            if not np.isfinite(kept[ends]).all():
                line += f" (n/a: fit-size R² below {self.retained_floor:g} or not measured)"
        if self.size_source:
            line += f" (sizes {self.size_source})"
        return line


def resolution_transfer(model, images=None, *, sizes=None, layers=None, n_folds=5, alphas=None, num_images=64,
                        img_size=None, batch_size=32, seed=0, device="cpu", progress=True, label="",
                        checkpoint=None, render="auto"):
    """Fit coordinate probes at the training size, evaluate them at other input sizes.

    Parameters
    ----------
    model : nn.Module
        A timm-style ViT. Models built for a fixed size are run at other sizes
        through timm's dynamic-size path (:func:`any_input_size`).
    images : None, str, Path, ImageSet or tensor
        ``"scenes"``: the procedural scenes' validation split, rendered at each size
        (see ``render``). ``None`` uses the embedded photographs and a folder is
        searched, both loaded once at the largest size; a tensor (uint8, or float
        already normalised) is the source as it is; each size is resized from these
        (bicubic, antialiased). Even-index images fit, odd-index images evaluate.
    sizes : list of int, optional
        Evaluation sizes (square, multiples of the patch). Default:
        :func:`default_sizes` (0.5× to 2× the training size). The fit size is always
        evaluated too: it is the denominator of the retained fractions.
    layers : list of int, optional
        Default: all, ``0..depth``.
    n_folds : int
        Cross-validation folds (split by image) that choose each probe's alpha.
    num_images, img_size, batch_size, seed
        ``img_size`` is the size the probes are fit at (default: the model's).
    device, progress, label
        As in :func:`asg_probe.layerwise_probes`, with one progress bar per input size
        (``checkpoint=``: a deprecated alias of ``label``).
    render : {"auto", True, False}
        How the images of each size are made. ``"auto"``: rendered where the source can
        render (``images="scenes"``: the ``num_images`` scenes of ``seed`` drawn at each
        size, scene ``i`` being the same scene, so even indices still fit at the training
        size and odd ones evaluate at every size), else resized. ``True``: rendered, a
        :class:`~asg_probe.errors.UsageError` for a source that cannot render. ``False``:
        resized from the images loaded once at the largest size, whatever the source.

    Returns
    -------
    ResolutionResult
        Absolute R² and the fraction of the fit-size R² retained, per layer and size;
        ``size_source`` (in the JSON and the provenance) says ``"rendered"`` or ``"resized"``.

    Notes
    -----
    A rendered scene keeps its horizon, vanishing point, sun, colours and object count
    (so its ``count`` label) at every size, but not its exact layout: the generator's
    pixel-size rules (objects at least 2.5 px tall and 1.5 px wide, a one-pixel gap
    between objects, in ``asg_probe.scenes._Layout``) move where every object's
    candidates fall and which are accepted. Of 64 validation scenes (seed 0) rendered at
    16, 32 and 64 px, the object count and label agree at all three sizes in 64 of 64;
    the layout is identical in only the 10 with no object; in 51 an object moves by more
    than 1/32 of the image (median shift 6% of the image between 16 and 32 px, with the
    kinds drawn in a different order in 12 scenes). So each size is evaluated on scenes
    from the same generator and seeds, not on pixel-for-pixel rescaled copies of one
    layout; that is what "rendered" measures, and ``render=False`` gives the other.

    Examples
    --------
    >>> import asg_probe
    >>> model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    >>> res = resolution_transfer(model, torch.randn(12, 3, 32, 32), sizes=[16, 32, 48], progress=False)
    >>> res.to_frame()[["layer", "size"]].drop_duplicates().shape[0], res.size_source
    (6, 'resized')
    >>> bool(res.curve(0)[1][1] > 0.9)   # APE at layer 0, evaluated at the fit size
    True
    >>> float(res.curve(0, "r2_retained")[1][1])   # the fit size keeps all of itself
    1.0
    >>> scenes = resolution_transfer(model, "scenes", num_images=10, sizes=[16, 32], progress=False)
    >>> scenes.size_source, scenes.provenance["size_source"]
    ('rendered', 'rendered')
    """
    from ..extract import run_analyses
    from ..geometry import model_geometry, resolve_layers
    from ..inputs import ImageBatches, display_label
    from .layerwise import LayerwiseAccumulator

    label = display_label(label, checkpoint)
    render = bool(render) if isinstance(render, (bool, np.bool_)) else render
    if not (render is True or render is False or (isinstance(render, str) and render == "auto")):
        raise UsageError(f"render must be 'auto', True or False, got {render!r}")
    if render is True and not _renders(images):
        if isinstance(images, str) and images == "scenes":  # a file or folder of that name wins, as in load_images
            raise UsageError("render=True: 'scenes' names a file or folder here, read as images, not the "
                             "procedural scenes; run from another folder, or pass render='auto'/False to resize")
        raise UsageError(f"render=True needs a source that can be drawn at any size, got {_describe(images)}; "
                         "pass images='scenes', or render='auto'/False to resize")
    rendered = bool(render) and _renders(images)  # "auto" is truthy: it renders where it can
    geo = model_geometry(model)
    patch, depth = geo.patch_size, geo.depth
    layers = resolve_layers(layers, depth)
    train_size = _check_size(_as_size(img_size if img_size is not None else geo.img_size, "img_size"), patch,
                             "img_size")
    if sizes is None:
        sizes = default_sizes(train_size, patch)
    else:
        sizes = sorted({_check_size(_as_size(s, "sizes"), patch, "size") for s in sizes})
        if not sizes:
            raise UsageError("sizes is empty; pass at least one evaluation size")
    sizes = sorted(set(sizes) | {train_size})  # the fit size: the denominator of the retained fractions
    if rendered and sizes[0] < MIN_RENDER_SIZE:
        raise UsageError(f"scenes cannot be rendered at {sizes[0]} px (smallest: {MIN_RENDER_SIZE}); "
                         f"pass sizes of at least {MIN_RENDER_SIZE}, or render=False to resize")

    def load(size):
        return ImageBatches.prepare(model, images, num_images=num_images, img_size=size, batch_size=batch_size,
                                    seed=seed, check_size=False)

    if rendered:  # drawn at each size, same seed and count: image i is scene i at every size
        source = load(train_size)
    else:  # one common source, loaded once at the largest size; every size is resized from it
        source = load(max(sizes))
    n = source.num_images
    if (n + 1) // 2 < n_folds or n < 2:
        raise UsageError(f"resolution transfer needs at least {2 * n_folds} images (even-index images fit the "
                         f"probes with {n_folds}-fold CV, odd-index ones evaluate them); got {n}; "
                         f"pass num_images >= {2 * n_folds}")
    fit_idx, eval_idx = torch.arange(0, n, 2), torch.arange(1, n, 2)

    def at_size(size):
        """The evaluation images at ``size``: their own rendering, or the common source resized."""
        if not rendered:
            return source.subset(eval_idx, size=size)
        data = source if size == train_size else load(size)
        if data.num_images != n:  # a generator that gave fewer scenes would pair scene i with another
            raise RuntimeError(f"scenes at {size} px: {data.num_images} images, {n} at {train_size} px")
        return data.subset(eval_idx)

    run = dict(layers=layers, device=device, progress=progress)
    with any_input_size(model):
        fit_data = source.subset(fit_idx, size=train_size, renumber=True)
        fitter = LayerwiseAccumulator(n_folds=n_folds, alphas=alphas, online_code=False)
        run_analyses(model, fit_data, [fitter], desc=f"resolution: fit at {train_size}px", **run)
        fits = fitter.fitted()
        probes = {layer: (fit.coef_[:2], fit.intercept_[:2]) for layer, fit in fits.items()}
        rows = []
        for size in sizes:
            (scorer,) = run_analyses(model, at_size(size), [TransferAccumulator(probes)],
                                     desc=f"resolution: evaluate at {size}px", **run)
            for layer, (r2_row, r2_col) in sorted(scorer.scores().items()):
                rows.append({"layer": layer, "size": size, "grid": [size // patch, size // patch],
                             "r2_row": r2_row, "r2_col": r2_col, "r2": 0.5 * (r2_row + r2_col),
                             "is_fit_size": size == train_size})
    rows.sort(key=lambda r: (r["layer"], r["size"]))
    fit_rows = [{"layer": int(layer), "r2_cv": float(np.mean(fit.cv_r2_[:2])),
                 "alpha": float(np.sqrt(fit.alpha_[0] * fit.alpha_[1]))} for layer, fit in fits.items()]
    size_source = "rendered" if rendered else "resized"
    result = ResolutionResult(rows, train_size, sizes, patch, fit=fit_rows, checkpoint=label,
                              num_images_fit=len(fit_idx), num_images_eval=len(eval_idx), size_source=size_source)
    # rendered: the images recorded are the fit-size scenes (every other size is the same scenes redrawn)
    return result.record_inputs(source, device=device, size_source=size_source)


def _describe(images) -> str:
    if isinstance(images, torch.Tensor):
        return f"a tensor {tuple(images.shape)}"
    if images is None:
        return "images=None (the embedded photographs)"
    return f"images={images!r}" if isinstance(images, (str, Path)) else f"a {type(images).__name__}"
