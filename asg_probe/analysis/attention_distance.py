"""Mean attention distance per head and layer (ViT paper; Raghu et al. 2021).

For each head: the attention-weighted Euclidean distance between a query patch
centre and the key patch centres, in pixels, averaged over query patches and
images. Prefix tokens (cls, registers) are left out and each query's remaining
weights renormalised to sum to 1. Works under fused attention, for every
positional mechanism (biases included) and for timm's plain ViT, through
:func:`asg_probe.capture.capture_attention`.

Check: uniform attention over a ``g × g`` grid gives the grid's mean pairwise
distance × patch size, 116.5 px for 14 × 14 patches of 16 px.
"""
from __future__ import annotations

import torch

from ..layers.grid import euclidean_distances
from ..results import AnalysisResult


def mean_attention_distance(attn, grid, patch_size, num_prefix_tokens):
    """Summed distances of one batch: ``(per-head sum over queries and images (H,), count)``.

    Parameters
    ----------
    attn : tensor (B, H, N_all, N_all)
        Attention probabilities (rows sum to 1), prefix tokens first.
    """
    p = int(num_prefix_tokens)
    a = attn[:, :, p:, p:].double()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    dist = euclidean_distances(grid, device=a.device, dtype=torch.float64) * float(patch_size)
    per_query = (a * dist).sum(-1)                # (B, H, N)
    return per_query.sum(dim=(0, 2)), per_query.shape[0] * per_query.shape[2]


def uniform_distance(grid, patch_size) -> float:
    """Mean attention distance of uniform attention: the grid's mean pairwise distance in px."""
    return float(euclidean_distances(grid, dtype=torch.float64).mean()) * float(patch_size)


class AttentionDistanceAccumulator:
    """Streams per-head distance sums; plugs into :func:`asg_probe.extract.run_analyses`."""

    needs_attention = True

    def __init__(self, patch_size, num_prefix_tokens):
        self.patch_size = int(patch_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.sums = {}
        self.count = 0
        self.grid = None

    def attention_reduce(self, attn, grid):
        """Per-head distance sums of one block, computed as soon as its map exists."""
        return mean_attention_distance(attn, grid, self.patch_size, self.num_prefix_tokens)

    def update(self, batch):
        self.grid = tuple(batch.grid)
        n = 0
        for layer, value in batch.attn.items():
            if isinstance(value, torch.Tensor):  # full maps (several attention analyses at once)
                value = self.attention_reduce(value, self.grid)
            total, n = value
            self.sums[layer] = self.sums.get(layer, 0) + total.cpu()
        self.count += n

    def finalize(self, checkpoint=""):
        from .common import dist_rank_world

        layers = sorted(self.sums)
        if dist_rank_world()[1] > 1:
            import torch.distributed as dist

            stacked = torch.stack([self.sums[layer] for layer in layers] + [torch.full_like(self.sums[layers[0]],
                                                                                           self.count)])
            dist.all_reduce(stacked)
            self.sums = {layer: stacked[i] for i, layer in enumerate(layers)}
            self.count = float(stacked[-1, 0])
        heads_px = {layer: (self.sums[layer] / self.count).tolist() for layer in layers}
        return AttentionDistanceResult(heads_px, self.patch_size, self.grid, checkpoint=checkpoint)


class AttentionDistanceResult(AnalysisResult):
    """Mean attention distance ``heads_px[layer][head]`` (pixels); layer ``i`` = block ``i``."""

    name = "attention_distance"

    def __init__(self, heads_px, patch_size, grid, checkpoint=""):
        self.heads_px = heads_px
        self.patch_size = patch_size
        self.grid = tuple(grid)
        self.checkpoint = checkpoint
        self.uniform_px = uniform_distance(self.grid, patch_size)

    def to_dict(self):
        layers = [{"layer": layer, "heads_px": px, "mean_px": sum(px) / len(px),
                   "heads_grid": [v / self.patch_size for v in px]} for layer, px in self.heads_px.items()]
        return {"checkpoint": self.checkpoint, "patch_size": self.patch_size, "grid": list(self.grid),
                "uniform_px": self.uniform_px, "layers": layers}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"layer": layer, "head": h, "distance_px": v, "distance_grid": v / self.patch_size}
                             for layer, px in self.heads_px.items() for h, v in enumerate(px)])

    def plot(self, ax=None):
        from ..plotting import new_figure

        if ax is None:
            fig, axes = new_figure(5.0, 3.4)
            ax = axes[0][0]
        for layer, px in self.heads_px.items():
            ax.scatter([layer] * len(px), px, s=14, color="#1f77b4", alpha=0.8)
        layers = list(self.heads_px)
        ax.plot(layers, [sum(px) / len(px) for px in self.heads_px.values()], color="#1f77b4", lw=1, label="mean")
        ax.axhline(self.uniform_px, ls="--", color="k", lw=0.8, label=f"uniform ({self.uniform_px:.1f} px)")
        ax.set_xlabel("layer (block)")
        ax.set_ylabel("mean attention distance (px)")
        ax.set_xticks(layers)
        ax.set_ylim(0, max(self.uniform_px * 1.15, max(max(px) for px in self.heads_px.values()) * 1.05))
        ax.set_title(f"Attention distance{' — ' + self.checkpoint if self.checkpoint else ''}", fontsize=9)
        ax.legend(fontsize=7)
        ax.figure.tight_layout()
        return ax.figure


def attention_distance(model, images=None, *, num_images=64, img_size=None, batch_size=32, seed=0, device="cpu",
                       progress=True, checkpoint="") -> AttentionDistanceResult:
    """Mean attention distance per head and layer of any timm-style ViT.

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="alibi2d", depth=2)
    >>> res = attention_distance(m, torch.randn(4, 3, 32, 32), progress=False)
    >>> len(res.to_dict()["layers"]), len(res.to_dict()["layers"][0]["heads_px"])
    (2, 4)
    """
    from ..extract import model_geometry, run_analyses
    from .common import ImageBatches

    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                batch_size=batch_size, seed=seed)
    patch, prefix, _ = model_geometry(model)
    acc = AttentionDistanceAccumulator(patch, prefix)
    run_analyses(model, data, [acc], layers=[0], device=device, progress=progress, total=len(data),
                 desc="attention distance")
    return acc.finalize(checkpoint=checkpoint)
