"""Layerwise coordinate probes: at which depth does each token know where it is?

For every layer (0 = tokens entering block 1, ``i`` = output of block ``i``) a
ridge probe maps patch tokens to normalised (row, col), regularisation chosen by
k-fold cross-validation split by image, scored by held-out R². A control probe on
a fixed random permutation of positions gives the selectivity (true − control).
Statistics are streamed (:mod:`asg_probe.probes`), so the cost is one forward
pass and memory does not grow with the number of images.
"""
from __future__ import annotations

import math

import numpy as np

from ..probes import DEFAULT_ALPHAS, CellAccuracy, RidgeStats, probe_targets, solve_ridge_cv
from ..results import AnalysisResult


class LayerwiseAccumulator:
    """Streams per-fold ridge statistics for every requested layer."""

    def __init__(self, n_folds=5, control_seed=0, alphas=None, exact=True):
        self.n_folds = n_folds
        self.exact = exact
        self.control_seed = control_seed
        self.alphas = DEFAULT_ALPHAS if alphas is None else alphas
        self.stats = {}
        self.grid = None
        self.num_images = 0
        self._targets = None
        self._fits = None

    def update(self, batch):
        if self.grid is None:
            self.grid = tuple(batch.grid)
        elif tuple(batch.grid) != self.grid:
            raise ValueError(f"all images must have one size; got grids {self.grid} and {tuple(batch.grid)}")
        if self._targets is None:
            self._targets = probe_targets(self.grid, control=True, control_seed=self.control_seed,
                                          device=batch.image_index.device)
        for layer, tokens in batch.tokens.items():
            if layer not in self.stats:
                self.stats[layer] = RidgeStats(n_folds=self.n_folds, exact=self.exact)
            self.stats[layer].update(tokens, self._targets, batch.image_index)
        self.num_images += len(batch.image_index)

    def fitted(self):
        """``{layer: RidgeCVResult}`` after combining statistics across processes (done once)."""
        if self._fits is None:
            self._fits = {layer: solve_ridge_cv(self.stats[layer].all_reduce(), alphas=self.alphas)
                          for layer in sorted(self.stats)}
        return self._fits

    def finalize(self, checkpoint="", img_size=None):
        fits = self.fitted()
        num_images = int(sum(self.stats[min(self.stats)].n_images)) if self.stats else 0
        return LayerwiseResult.from_fits(fits, self.grid, num_images=num_images, checkpoint=checkpoint,
                                         img_size=img_size)


class CellAccuracyAccumulator:
    """Second pass: held-out per-cell classification accuracy from the fitted fold probes."""

    def __init__(self, fits, grid):
        self.counters = {layer: CellAccuracy(fit, grid) for layer, fit in fits.items()}

    def update(self, batch):
        for layer, tokens in batch.tokens.items():
            self.counters[layer].update(tokens, batch.image_index)

    def finalize(self):
        return {layer: c.all_reduce().accuracy for layer, c in self.counters.items()}


def _geomean(a, b):
    return float(math.sqrt(a * b))


class LayerwiseResult(AnalysisResult):
    """Per-layer probe scores. ``rows`` is a list of dicts, one per layer (see :meth:`to_dict`)."""

    name = "layerwise"

    def __init__(self, rows, grid, num_images, checkpoint="", img_size=None, extra=None):
        self.rows = rows
        self.grid = tuple(grid) if grid else None
        self.num_images = num_images
        self.checkpoint = checkpoint
        self.img_size = img_size
        self.extra = extra or {}

    @classmethod
    def from_fits(cls, fits, grid, num_images, checkpoint="", img_size=None):
        rows = []
        for layer, fit in fits.items():
            r2 = fit.cv_r2_
            r2_row, r2_col, c_row, c_col = (float(v) for v in r2[:4])
            mean = 0.5 * (r2_row + r2_col)
            control = 0.5 * (c_row + c_col)
            rows.append({
                "layer": int(layer), "r2_row": r2_row, "r2_col": r2_col, "r2": mean,
                "r2_control": control, "selectivity": mean - control,
                "alpha": _geomean(fit.alpha_[0], fit.alpha_[1]),
                "alpha_row": float(fit.alpha_[0]), "alpha_col": float(fit.alpha_[1]),
                "alpha_at_edge": bool(fit.alpha_at_edge[:2].any()),
                "r2_control_row": c_row, "r2_control_col": c_col,
            })
        return cls(rows, grid, num_images, checkpoint=checkpoint, img_size=img_size)

    def add_column(self, name, values_by_layer):
        for row in self.rows:
            row[name] = values_by_layer.get(row["layer"])

    def to_dict(self):
        return {"checkpoint": self.checkpoint, "num_images": self.num_images, "img_size": self.img_size,
                "grid": list(self.grid) if self.grid else None, "layers": self.rows, **self.extra}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def r2(self, column="r2"):
        """``(layers, values)`` numpy arrays of one column."""
        return (np.array([r["layer"] for r in self.rows]), np.array([r[column] for r in self.rows]))

    def plot(self, ax=None, label=None):
        from ..plotting import new_figure

        if ax is None:
            fig, axes = new_figure(5.2, 3.4)
            ax = axes[0][0]
        fig = ax.figure
        layers, _ = self.r2()
        styles = [("r2_row", "row", "-", "o"), ("r2_col", "col", "-", "s"), ("r2", "mean", "-", None),
                  ("r2_control", "control", "--", None)]
        for col, name, ls, marker in styles:
            ax.plot(layers, self.r2(col)[1], ls=ls, marker=marker, ms=4, lw=2 if col == "r2" else 1.2,
                    label=f"{label + ' ' if label else ''}{name}")
        ax.set_xlabel("layer (0 = patch embedding)")
        ax.set_ylabel("held-out R² (split by image)")
        ax.set_ylim(min(-0.05, float(np.nanmin(self.r2("r2_control")[1])) - 0.05), 1.02)
        ax.set_xticks(layers)
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3)
        title = "Coordinate probes"
        if self.checkpoint:
            title += f" — {self.checkpoint}"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        return fig

    def summary_line(self):
        last = self.rows[-1]
        best = max(self.rows, key=lambda r: r["r2"])
        return (f"last layer R² row/col {last['r2_row']:.2f}/{last['r2_col']:.2f} "
                f"(control {last['r2_control']:.2f}); best layer {best['layer']} R² {best['r2']:.2f}")


def compare_layerwise(results, labels=None, column="r2", ax=None):
    """All models' R² curves on one axis, coloured by mechanism.

    Parameters
    ----------
    results : list of LayerwiseResult
    labels : list of str, optional
        Legend labels (default: each result's checkpoint); mechanism names pick the colour.
    """
    from ..plotting import mechanism_color, new_figure

    if ax is None:
        fig, axes = new_figure(5.6, 3.6)
        ax = axes[0][0]
    labels = labels or [r.checkpoint or f"model {i}" for i, r in enumerate(results)]
    for i, (res, label) in enumerate(zip(results, labels)):
        layers, values = res.r2(column)
        color = mechanism_color(label, i)
        ax.plot(layers, values, marker="o", ms=3, color=color, label=label)
        ax.plot(layers, res.r2("r2_control")[1], ls=":", color=color, lw=0.8)
    ax.set_xlabel("layer (0 = patch embedding)")
    ax.set_ylabel(f"held-out {column.replace('r2', 'R²')}  (dotted: control)")
    ax.axhline(0, color="k", lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


def layerwise_probes(model, images=None, *, num_images=64, img_size=None, batch_size=32, layers=None,
                     n_folds=5, control_seed=0, alphas=None, cell_accuracy=False, seed=0, device="cpu",
                     progress=True, checkpoint="", exact=True):
    """Fit cross-validated coordinate probes on every layer of ``model``.

    Parameters
    ----------
    model : nn.Module
        A timm-style ViT (``patch_embed``, ``blocks``), e.g. from :func:`asg_probe.load_checkpoint`.
    images : None, str, Path, ImageSet or tensor
        ``None`` uses the embedded photographs; a folder is searched recursively;
        a uint8 tensor ``(N, 3, H, W)`` is normalised with the model's mean/std; a
        float tensor is used as is.
    num_images, img_size, seed
        How many images, at which size (default: the model's), which deterministic crops.
    layers : list of int, optional
        Default: all, ``0..depth``.
    n_folds : int
        Cross-validation folds, split by image.
    cell_accuracy : bool
        Also report held-out per-cell classification accuracy (costs a second forward pass).
    exact : bool, default=True
        Accumulate every product in float64 (see :class:`~asg_probe.probes.RidgeStats`): results
        independent of batching and process count to rounding. ``False`` forms the Gram matrices
        in float32, about 5% faster overall on CPU, but R² moves by up to ~1e-3 (bundled ``ape`` model).

    Returns
    -------
    LayerwiseResult

    Examples
    --------
    >>> import asg_probe
    >>> model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape")
    >>> res = asg_probe.layerwise_probes(model, num_images=10, progress=False)
    >>> res.to_frame().columns[:4].tolist()
    ['layer', 'r2_row', 'r2_col', 'r2']
    """
    from ..extract import run_analyses
    from ..inputs import ImageBatches

    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                batch_size=batch_size, seed=seed)
    if data.num_images < n_folds:
        raise ValueError(f"{data.num_images} images are too few for {n_folds}-fold cross-validation; "
                         f"use at least {n_folds} (--num-images)")
    acc = LayerwiseAccumulator(n_folds=n_folds, control_seed=control_seed, alphas=alphas, exact=exact)
    run_analyses(model, data, [acc], layers=layers, device=device, progress=progress,
                 total=len(data), desc="layerwise")
    result = acc.finalize(checkpoint=checkpoint, img_size=data.img_size)
    if cell_accuracy:
        fits = acc.fitted()
        cells = CellAccuracyAccumulator(fits, acc.grid)
        run_analyses(model, data, [cells], layers=layers, device=device, progress=progress,
                     total=len(data), desc="cell accuracy")
        result.add_column("cell_accuracy", cells.finalize())
    return result
