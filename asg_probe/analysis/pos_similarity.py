"""Positional-embedding similarity (ViT paper, Fig. 7 left).

Cosine similarity of each position's embedding with every other, drawn as a
``g × g`` grid of ``g × g`` maps. Applies to models whose position lives in an
embedding table: learned (``ape``, any timm ViT with ``pos_embed``) or fixed
sin-cos (``sincos``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..results import AnalysisResult


def position_embeddings(model, grid=None) -> tuple[torch.Tensor, tuple]:
    """The patch position embeddings as ``(gh, gw, D)`` and the grid they live on.

    Learned tables are read at their native grid (no interpolation), unless ``grid``
    is given, in which case timm's resampling is used (what the model does at that size).
    """
    pos = getattr(model, "pos", None)
    if pos == "sincos":
        from ..models import sincos_2d

        gh, gw = grid or tuple(model.patch_embed.grid_size)
        return sincos_2d(gh, gw, model.embed_dim), (gh, gw)
    table = getattr(model, "pos_embed", None)
    if table is None or not isinstance(table, torch.Tensor):
        # a usage error (exit 2), not a bug: the model is fine, the analysis does not apply to it
        raise UsageError(f"{type(model).__name__} (pos={pos!r}) has no position-embedding table to compare; "
                         "pos-similarity applies to learned (ape, most timm ViTs) or sin-cos embeddings, "
                         "e.g. `asg-probe pos-similarity ape`")
    table = table.detach()[0]
    native = tuple(model.patch_embed.grid_size)
    n_patch = native[0] * native[1]
    table = table[-n_patch:]  # prefix tokens' entries (if any) come first
    emb = table.reshape(*native, -1)
    if grid is not None and tuple(grid) != native:
        from timm.layers import resample_abs_pos_embed

        emb = resample_abs_pos_embed(table[None], new_size=tuple(grid), old_size=native,
                                     num_prefix_tokens=0)[0].reshape(*grid, -1)
        native = tuple(grid)
    return emb, native


class PosSimilarityResult(AnalysisResult):
    """Cosine similarities ``(N, N)`` between the position embeddings of an ``(gh, gw)`` grid."""

    name = "pos_similarity"

    def __init__(self, similarity, grid, checkpoint=""):
        self.similarity = similarity
        self.grid = tuple(grid)
        self.checkpoint = checkpoint

    def distance_profile(self):
        """Mean similarity as a function of Euclidean grid distance (rounded to 0.5)."""
        from ..layers.grid import euclidean_distances

        d = (euclidean_distances(self.grid) * 2).round() / 2
        out = []
        for value in torch.unique(d):
            mask = d == value
            out.append((float(value), float(self.similarity[mask].mean())))
        return out

    def to_dict(self):
        return {"checkpoint": self.checkpoint, "grid": list(self.grid),
                "similarity": self.similarity.tolist(),
                "distance_profile": [{"distance": d, "mean_cos": s} for d, s in self.distance_profile()]}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.distance_profile(), columns=["distance_grid", "mean_cos"])

    def mosaic(self) -> torch.Tensor:
        """The ``gh × gw`` grid of ``gh × gw`` similarity maps as one image, tiles split by NaN lines.

        Tile ``(r, c)`` shows the similarity of position ``(r, c)`` with every position.
        """
        gh, gw = self.grid
        sim = self.similarity.reshape(gh, gw, gh, gw).float()
        out = torch.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), float("nan"))
        for r in range(gh):
            for c in range(gw):
                out[r * (gh + 1):r * (gh + 1) + gh, c * (gw + 1):c * (gw + 1) + gw] = sim[r, c]
        return out

    def plot(self, ax=None):
        """Draw the similarity mosaic (one image, so it fits any ``ax`` and stays fast at 14×14)."""
        import matplotlib.pyplot as plt

        gh, gw = self.grid
        if ax is None:
            fig, ax = plt.subplots(figsize=(min(0.45 * gw + 1.5, 9), min(0.45 * gh + 1, 8)))
        else:
            fig = ax.figure
        cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # NaN: the separators between tiles
        im = ax.imshow(self.mosaic().numpy(), vmin=-1, vmax=1, cmap=cmap, interpolation="nearest")
        ax.set_xticks([(gw + 1) * c + (gw - 1) / 2 for c in range(gw)], [str(c) for c in range(gw)], fontsize=7)
        ax.set_yticks([(gh + 1) * r + (gh - 1) / 2 for r in range(gh)], [str(r) for r in range(gh)], fontsize=7)
        ax.tick_params(length=0)
        ax.set_xlabel("input patch column")
        ax.set_ylabel("input patch row")
        ax.set_title(f"Position embedding similarity ({gh}×{gw})"
                     f"{' — ' + self.checkpoint if self.checkpoint else ''}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
        return fig


def pos_similarity(model, grid=None, *, label: str = "", checkpoint=None) -> PosSimilarityResult:
    """Cosine similarity between every pair of position embeddings.

    No images are involved (the embeddings are read from the model), so of the
    common entry-point options only ``label`` applies.

    Parameters
    ----------
    model : nn.Module
    grid : (int, int), optional
        Grid to evaluate the embeddings on (default: the model's).
    label : str
        Display name stored in the result (``checkpoint=``: a deprecated alias).

    Examples
    --------
    >>> import asg_probe
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="sincos")
    >>> res = pos_similarity(m)
    >>> res.grid, float(res.similarity[0, 0])
    ((8, 8), 1.0)
    """
    from ..finite import require_finite
    from ..inputs import display_label

    label = display_label(label, checkpoint)
    emb, grid = position_embeddings(model, grid)
    require_finite({"the position embeddings": emb}, source=label or "model")
    flat = F.normalize(emb.reshape(-1, emb.shape[-1]).float(), dim=-1)
    return PosSimilarityResult(flat @ flat.T, grid, checkpoint=label)
