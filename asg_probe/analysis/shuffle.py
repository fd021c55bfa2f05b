"""Content or injection? Patch-shuffle analyses.

*Shuffle test.* Each image's patches are shuffled by a fixed random permutation
and, per layer, two probes are fit on the shuffled tokens (CV split by image):
one decodes the patch's **original** position (possible only from content, since
the content moved with the patch) and one decodes its **slot** (possible only
from what the model injects at that slot). A model without positional injection
is permutation-equivariant, so its slot R² stays at 0; a model with APE/RoPE/bias
can decode slots. Tokens of the unshuffled images come from the same forward call.

*Equivariance certificate.* For a model with no positional injection, shuffling
the input patches shuffles the patch outputs the same way, at every layer, up to
float rounding. :func:`check_equivariance` measures that directly.
"""
from __future__ import annotations

import torch

from ..probes import DEFAULT_ALPHAS, RidgeStats, coordinate_targets, solve_ridge_cv
from ..results import AnalysisResult
from .layerwise import LayerwiseAccumulator


class ShuffleAccumulator:
    """Ridge statistics on shuffled tokens for (original position, slot) targets."""

    view = "shuffled"

    def __init__(self, n_folds=5, shuffle_seed=0, alphas=None):
        self.n_folds = n_folds
        self.shuffle_seed = shuffle_seed
        self.alphas = DEFAULT_ALPHAS if alphas is None else alphas
        self.stats = {}
        self.grid = None

    def update(self, batch):
        self.grid = tuple(batch.grid)
        coords = coordinate_targets(self.grid, device=batch.perm.device)  # (N, 2)
        original = coords[batch.perm]                                      # (B, N, 2)
        slot = coords.expand_as(original)
        targets = torch.cat([original, slot], dim=-1)                      # (B, N, 4)
        for layer, tokens in batch.tokens.items():
            if layer not in self.stats:
                self.stats[layer] = RidgeStats(n_folds=self.n_folds)
            self.stats[layer].update(tokens, targets, batch.image_index)

    def finalize(self):
        out = {}
        for layer in sorted(self.stats):
            fit = solve_ridge_cv(self.stats[layer].all_reduce(), alphas=self.alphas)
            out[layer] = [float(v) for v in fit.cv_r2_[:4]]
        return out


class ShuffleResult(AnalysisResult):
    """Per layer: R² of original position and of slot on shuffled tokens, and unshuffled R²."""

    name = "shuffle_test"

    def __init__(self, rows, grid, num_images, checkpoint=""):
        self.rows = rows
        self.grid = tuple(grid)
        self.num_images = num_images
        self.checkpoint = checkpoint

    @staticmethod
    def source(r2_original, r2_slot, threshold=0.2):
        """Where a layer's position comes from: 'content', 'injected', 'both' or 'none'."""
        content, injected = r2_original > threshold, r2_slot > threshold
        return {(True, True): "both", (True, False): "content", (False, True): "injected"}.get(
            (content, injected), "none")

    def to_dict(self):
        return {"checkpoint": self.checkpoint, "num_images": self.num_images, "grid": list(self.grid),
                "layers": self.rows}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def plot(self, ax=None):
        import numpy as np

        from ..plotting import new_figure

        if ax is None:
            fig, axes = new_figure(5.6, 3.4)
            ax = axes[0][0]
        layers = np.array([r["layer"] for r in self.rows])
        width = 0.27
        series = [("r2_unshuffled", "unshuffled", "#bbbbbb"), ("r2_original", "shuffled → original position", "#2ca02c"),
                  ("r2_slot", "shuffled → slot", "#1f77b4")]
        for i, (key, label, color) in enumerate(series):
            ax.bar(layers + (i - 1) * width, [r[key] for r in self.rows], width, label=label, color=color)
        ax.set_xlabel("layer (0 = patch embedding)")
        ax.set_ylabel("held-out R² (mean of row, col)")
        ax.set_xticks(layers)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(min(-0.05, min(min(r["r2_original"], r["r2_slot"]) for r in self.rows) - 0.05), 1.02)
        ax.set_title(f"Content or injection?{' — ' + self.checkpoint if self.checkpoint else ''}", fontsize=9)
        ax.legend(fontsize=7)
        ax.figure.tight_layout()
        return ax.figure


def shuffle_test(model, images=None, *, num_images=64, img_size=None, batch_size=32, layers=None, n_folds=5,
                 seed=0, device="cpu", progress=True, checkpoint=""):
    """Does each layer know the patch's original position (content) or its slot (injection)?

    Returns
    -------
    ShuffleResult
        Columns ``r2_original``, ``r2_slot`` (shuffled images) and ``r2_unshuffled``
        (the ordinary probe on the same images), per layer, plus a ``source`` verdict.

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    >>> res = shuffle_test(m, torch.randn(10, 3, 32, 32), progress=False)
    >>> res.rows[0]["r2_slot"] < 0.05   # no injection: slots are not decodable
    True
    """
    from ..extract import run_analyses
    from ..inputs import ImageBatches

    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                batch_size=batch_size, seed=seed)
    if data.num_images < n_folds:
        raise ValueError(f"{data.num_images} images are too few for {n_folds}-fold cross-validation; "
                         f"use at least {n_folds} (--num-images)")
    plain = LayerwiseAccumulator(n_folds=n_folds)
    shuffled = ShuffleAccumulator(n_folds=n_folds, shuffle_seed=seed)
    _, by_layer = run_analyses(model, data, [plain, shuffled], layers=layers, device=device,
                               progress=progress, total=len(data), desc="shuffle test")
    return ShuffleResult(shuffle_rows(by_layer, plain.fitted()), shuffled.grid, data.num_images,
                         checkpoint=checkpoint)


def shuffle_rows(by_layer, unshuffled_fits):
    """Result rows from :class:`ShuffleAccumulator` output and the unshuffled probes' fits."""
    rows = []
    for layer, (o_row, o_col, s_row, s_col) in by_layer.items():
        r2_original, r2_slot = 0.5 * (o_row + o_col), 0.5 * (s_row + s_col)
        unshuffled = float(unshuffled_fits[layer].cv_r2_[:2].mean())
        rows.append({"layer": layer, "r2_unshuffled": unshuffled, "r2_original": r2_original, "r2_slot": r2_slot,
                     "r2_original_row": o_row, "r2_original_col": o_col, "r2_slot_row": s_row,
                     "r2_slot_col": s_col, "source": ShuffleResult.source(r2_original, r2_slot)})
    return rows


class EquivarianceResult(AnalysisResult):
    """Per-layer relative error between shuffled outputs and shuffled original outputs."""

    name = "equivariance"

    def __init__(self, rows, tol, num_images, num_permutations, checkpoint=""):
        self.rows = rows
        self.tol = tol
        self.num_images = num_images
        self.num_permutations = num_permutations
        self.checkpoint = checkpoint

    @property
    def certified(self) -> bool:
        """True when every layer is equivariant within ``tol``: no positional injection."""
        return all(r["equivariant"] for r in self.rows)

    def verdict(self) -> str:
        worst = max(r["max_rel_error"] for r in self.rows)
        setting = f"{self.num_images} images x {self.num_permutations} permutations"
        if self.certified:
            return (f"CERTIFIED equivariant: no positional injection (max relative error {worst:.1e} <= "
                    f"{self.tol:.0e} at every layer, {setting})")
        first = next(r for r in self.rows if not r["equivariant"])
        return (f"NOT equivariant: position is injected (layer {first['layer']} relative error "
                f"{first['max_rel_error']:.1e} > {self.tol:.0e}, {setting})")

    def to_dict(self):
        return {"checkpoint": self.checkpoint, "certified": self.certified, "tol": self.tol,
                "num_images": self.num_images, "num_permutations": self.num_permutations,
                "verdict": self.verdict(), "layers": self.rows}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def plot(self, ax=None):
        from ..plotting import new_figure

        if ax is None:
            fig, axes = new_figure(5.0, 3.2)
            ax = axes[0][0]
        layers = [r["layer"] for r in self.rows]
        errors = [max(r["max_rel_error"], 1e-12) for r in self.rows]
        ax.semilogy(layers, errors, marker="o", color="#2ca02c" if self.certified else "#d62728")
        ax.axhline(self.tol, ls="--", color="k", lw=0.8, label=f"tolerance {self.tol:.0e}")
        ax.set_xlabel("layer (0 = patch embedding)")
        ax.set_ylabel("max relative error")
        ax.set_xticks(layers)
        ax.set_title(("certified equivariant" if self.certified else "not equivariant")
                     + (f" — {self.checkpoint}" if self.checkpoint else ""), fontsize=9)
        ax.legend(fontsize=7)
        ax.figure.tight_layout()
        return ax.figure


def check_equivariance(model, images=None, *, num_images=8, img_size=None, batch_size=8, num_permutations=2,
                       tol=1e-4, seed=0, device="cpu", checkpoint=""):
    """Certify (or refute) that ``model`` has no positional injection.

    Shuffles each image's patches and checks, at every layer, that output token
    ``s`` equals the unshuffled output token ``perm[s]`` within ``tol`` relative
    to the largest token entry. Runs in float32; use float64 for a tighter bound.

    Examples
    --------
    >>> import asg_probe, torch
    >>> check_equivariance(asg_probe.create_model("vit_tiny_patch4_32", pos="none"), torch.randn(2, 3, 32, 32)).certified
    True
    >>> check_equivariance(asg_probe.create_model("vit_tiny_patch4_32", pos="ape"), torch.randn(2, 3, 32, 32)).certified
    False
    """
    from ..extract import forward_tokens, image_permutations
    from ..geometry import model_geometry
    from ..layers.grid import permute_patches
    from ..inputs import ImageBatches

    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                batch_size=batch_size, seed=seed)
    patch = model_geometry(model).patch_size
    model.eval().to(device)
    worst = {}
    for images_b, index in data:
        images_b = images_b.to(device)
        grid = (images_b.shape[-2] // patch, images_b.shape[-1] // patch)
        ref = forward_tokens(model, images_b)
        for k in range(num_permutations):
            perm = image_permutations(index, grid[0] * grid[1], seed=seed * 7919 + k + 1).to(device)
            out = forward_tokens(model, permute_patches(images_b, patch, perm))
            for layer in ref:
                expected = torch.gather(ref[layer], 1, perm[:, :, None].expand_as(ref[layer]))
                err = ((out[layer] - expected).abs().max() / ref[layer].abs().max().clamp_min(1e-12)).item()
                worst[layer] = max(worst.get(layer, 0.0), err)
    rows = [{"layer": layer, "max_rel_error": err, "equivariant": err <= tol} for layer, err in sorted(worst.items())]
    return EquivarianceResult(rows, tol, data.num_images, num_permutations, checkpoint=checkpoint)
