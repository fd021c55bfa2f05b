"""Resolution transfer: fit coordinate probes at one input size, evaluate them at others.

Protocol. The images with an **even** index fit one ridge probe per layer at the
training size (streamed statistics, alpha by cross-validation split by image,
exactly as :mod:`asg_probe.analysis.layerwise`). The images with an **odd** index
are then shown at every evaluation size and the fitted probes' predictions are
scored against the normalised ``(row, col)`` of *that* size's grid, so the
question is "does the probe's map from token to relative position still hold
when the grid grows or shrinks?". Every size is made from one common source
(the images loaded once at the largest size) by bicubic, antialiased resizing.

Only running sums are kept (per layer and size: squared error, target sum and
sum of squares), so memory does not grow with the number of images.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..errors import UsageError
from ..extract import Accumulator
from ..probes import coordinate_targets
from ..results import AnalysisResult

__all__ = ["ResolutionResult", "TransferAccumulator", "default_sizes", "resolution_transfer", "any_input_size"]

#: Evaluation sizes relative to the training size (rounded to the patch).
DEFAULT_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


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


def _check_size(size, patch, what="size"):
    if size < patch or size % patch:
        lower = max(patch, size // patch * patch)
        raise UsageError(f"{what} {size} is not a positive multiple of the patch size {patch}; "
                         f"pass e.g. {lower} or {lower + patch}")
    return size


@contextlib.contextmanager
def any_input_size(model):
    """Let a timm ViT built for one input size take any size (multiple of the patch) while in the block.

    Models with ``dynamic_img_size=True`` (every asg_probe model) are left alone.
    For the others timm's own dynamic path is switched on (the patch embedding
    returns NHWC and the absolute position table is resampled to the grid) and
    switched off again on exit, also after an exception.
    """
    pe = getattr(model, "patch_embed", None)
    if getattr(model, "dynamic_img_size", True) or pe is None or not hasattr(pe, "strict_img_size"):
        yield model
        return
    from timm.layers import Format

    saved = (model.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt)
    try:
        model.dynamic_img_size = True
        pe.strict_img_size, pe.flatten, pe.output_fmt = False, False, Format.NHWC
        yield model
    finally:
        model.dynamic_img_size = saved[0]
        pe.strict_img_size, pe.flatten, pe.output_fmt = saved[1:]


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
    ``r2_row``, ``r2_col``, ``r2``; ``fit``: one dict per layer with the probe's
    cross-validated R² on the fitting images (``r2_cv``) and its ``alpha``.
    """

    name = "resolution"

    def __init__(self, rows, train_size, sizes, patch_size, fit=None, checkpoint="", num_images_fit=None,
                 num_images_eval=None):
        self.rows = rows
        self.train_size = int(train_size)
        self.sizes = [int(s) for s in sizes]
        self.patch_size = int(patch_size)
        self.fit = fit or []
        self.checkpoint = checkpoint
        self.num_images_fit = num_images_fit
        self.num_images_eval = num_images_eval

    def to_dict(self):
        return {"checkpoint": self.checkpoint, "train_size": self.train_size, "sizes": self.sizes,
                "patch_size": self.patch_size, "num_images_fit": self.num_images_fit,
                "num_images_eval": self.num_images_eval, "fit": self.fit, "layers": self.rows}

    def curve(self, layer, column="r2"):
        """``(sizes, values)`` of one layer."""
        pts = sorted((r["size"], r[column]) for r in self.rows if r["layer"] == layer)
        return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)

    def best_layer(self):
        """The layer with the highest R² at the training size."""
        at_train = [r for r in self.rows if r["size"] == self.train_size] or self.rows
        return max(at_train, key=lambda r: -np.inf if np.isnan(r["r2"]) else r["r2"])["layer"]

    def plot(self, ax=None, layers=None):
        """R² against input size, one line per layer (default: the best layer and the last one)."""
        from ..plotting import new_figure

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
            sizes, r2 = self.curve(layer)
            line, = ax.plot(sizes, r2, marker="o", ms=4, lw=2, label=label, color=shades[i % len(shades)])
            for col, ls in (("r2_row", ":"), ("r2_col", "--")):
                ax.plot(sizes, self.curve(layer, col)[1], ls=ls, lw=0.9, color=line.get_color())
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
        ax.set_ylabel("R² on held-out images\n(dotted: row, dashed: col)")
        values = np.array([r["r2"] for r in self.rows], dtype=float)
        low = np.nanmin(values) if np.isfinite(values).any() else 0.0
        ax.set_ylim(max(-1.0, min(-0.05, low - 0.05)), 1.02)
        ax.grid(alpha=0.3)
        title = "Resolution transfer"
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
        return f"layer {best} (best at {self.train_size}px): R² {parts}"


def resolution_transfer(model, images=None, *, sizes=None, layers=None, n_folds=5, alphas=None, num_images=64,
                        img_size=None, batch_size=32, seed=0, device="cpu", progress=True, label="",
                        checkpoint=None):
    """Fit coordinate probes at the training size, evaluate them at other input sizes.

    Parameters
    ----------
    model : nn.Module
        A timm-style ViT. Models built for a fixed size are run at other sizes
        through timm's dynamic-size path (:func:`any_input_size`).
    images : None, str, Path, ImageSet or tensor
        ``None`` uses the embedded photographs and a folder is searched, both
        loaded once at the largest size; a tensor (uint8, or float already
        normalised) is the source as it is. Every size is resized from it
        (bicubic, antialiased). Even-index images fit, odd-index images evaluate.
    sizes : list of int, optional
        Evaluation sizes (square, multiples of the patch). Default:
        :func:`default_sizes` (0.5× to 2× the training size).
    layers : list of int, optional
        Default: all, ``0..depth``.
    n_folds : int
        Cross-validation folds (split by image) that choose each probe's alpha.
    num_images, img_size, batch_size, seed
        ``img_size`` is the size the probes are fit at (default: the model's).
    device, progress, label
        As in :func:`asg_probe.layerwise_probes`, with one progress bar per input size
        (``checkpoint=``: a deprecated alias of ``label``).

    Returns
    -------
    ResolutionResult

    Examples
    --------
    >>> import asg_probe
    >>> model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    >>> res = resolution_transfer(model, torch.randn(12, 3, 32, 32), sizes=[16, 32, 48], progress=False)
    >>> res.to_frame()[["layer", "size"]].drop_duplicates().shape[0]
    6
    >>> bool(res.curve(0)[1][1] > 0.9)   # APE at layer 0, evaluated at the fit size
    True
    """
    from ..extract import run_analyses
    from ..geometry import model_geometry, resolve_layers
    from ..inputs import ImageBatches, display_label
    from .layerwise import LayerwiseAccumulator

    label = display_label(label, checkpoint)
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
    # one common source, loaded once at the largest size; every size is resized from it
    source = ImageBatches.prepare(model, images, num_images=num_images, img_size=max(sizes + [train_size]),
                                  batch_size=batch_size, seed=seed, check_size=False)
    n = source.num_images
    if (n + 1) // 2 < n_folds or n < 2:
        raise UsageError(f"resolution transfer needs at least {2 * n_folds} images (even-index images fit the "
                         f"probes with {n_folds}-fold CV, odd-index ones evaluate them); got {n}; "
                         f"pass num_images >= {2 * n_folds}")
    fit_idx, eval_idx = torch.arange(0, n, 2), torch.arange(1, n, 2)

    run = dict(layers=layers, device=device, progress=progress)
    with any_input_size(model):
        fit_data = source.subset(fit_idx, size=train_size, renumber=True)
        fitter = LayerwiseAccumulator(n_folds=n_folds, alphas=alphas)
        run_analyses(model, fit_data, [fitter], desc=f"resolution: fit at {train_size}px", **run)
        fits = fitter.fitted()
        probes = {layer: (fit.coef_[:2], fit.intercept_[:2]) for layer, fit in fits.items()}
        rows = []
        for size in sizes:
            data = source.subset(eval_idx, size=size)
            (scorer,) = run_analyses(model, data, [TransferAccumulator(probes)],
                                     desc=f"resolution: evaluate at {size}px", **run)
            for layer, (r2_row, r2_col) in sorted(scorer.scores().items()):
                rows.append({"layer": layer, "size": size, "grid": [size // patch, size // patch],
                             "r2_row": r2_row, "r2_col": r2_col, "r2": 0.5 * (r2_row + r2_col),
                             "is_fit_size": size == train_size})
    rows.sort(key=lambda r: (r["layer"], r["size"]))
    fit_rows = [{"layer": int(layer), "r2_cv": float(np.mean(fit.cv_r2_[:2])),
                 "alpha": float(np.sqrt(fit.alpha_[0] * fit.alpha_[1]))} for layer, fit in fits.items()]
    result = ResolutionResult(rows, train_size, sizes, patch, fit=fit_rows, checkpoint=label,
                              num_images_fit=len(fit_idx), num_images_eval=len(eval_idx))
    return result.record_inputs(source, device=device)
