"""Token-position embeddings: a 2-D map of each layer's patch tokens, coloured by grid position.

Patch tokens of a few layers are sampled while the model runs (a bounded,
batch-order-independent sample: :class:`asg_probe.probes.TokenReservoir`), then
each layer's sample is reduced to 50 dimensions with PCA and laid out in 2-D with
UMAP. Points are coloured with a 2-D colour map over the patch grid, so row and
column can both be read.

How spatially organised the picture is, is summarised by one number per layer,
the **position score** (see :func:`asg_probe.analysis.layout.position_score`): the correlation between a
token's normalised (row, col) and the mean position of its nearest neighbours in
the 2-D map that come from *other images*; about 0 for a map that ignores
position, 1 for a perfectly organised one. Content alone can score a little
above 0 when the image set has position-dependent content (sky at the top,
overlapping crops of one photograph): compare with a ``pos="none"`` model on the
same images (about 0.1 on the embedded photographs).
"""
from __future__ import annotations


import numpy as np
import torch

from ..errors import UsageError
from ..extract import Accumulator, batch_grid
from ..layers.grid import grid_coords
from ..probes import TokenReservoir
from ..results import AnalysisResult
from .layout import DEFAULT_K, EMBEDDING_METHODS, embed_2d, position_score  # noqa: F401 (public here too)

__all__ = ["EmbeddingsAccumulator", "EmbeddingsResult", "EMBEDDING_METHODS", "embed_2d", "position_score", "token_embeddings",
           "compare_embeddings"]

# --------------------------------------------------------------------------- accumulator

class EmbeddingsAccumulator(Accumulator):
    """Keeps a bounded, order-independent sample of patch tokens per layer, with their (row, col).

    An :class:`~asg_probe.extract.Accumulator`: :meth:`update` offers each batch's
    tokens to the samples, :meth:`all_reduce` merges every process's samples and
    :meth:`result` lays them out in 2-D and scores them.

    Each layer has a :class:`~asg_probe.probes.TokenReservoir` (bottom-k of a
    pseudo-random key seeded by ``(seed, image, patch)``), so the sample does not
    depend on batch size, order or the number of processes, and the *same*
    (image, patch) pairs are kept at every layer. Memory: ``max_tokens × D`` floats
    per layer.

    Parameters
    ----------
    layers : list of int, optional
        Layers to keep (non-negative, as numbered by :func:`asg_probe.geometry.resolve_layers`).
        Default: first, middle and last of the layers the forward pass delivers.
    max_tokens : int
        Tokens kept per layer.
    seed : int
        Seeds the token sample and UMAP.
    k : int
        Neighbours of :func:`position_score`.

    Examples
    --------
    >>> import asg_probe
    >>> from asg_probe.extract import run_analyses
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2)
    >>> batches = [(torch.randn(4, 3, 32, 32), torch.arange(4))]
    >>> acc = EmbeddingsAccumulator(layers=[0, 2], max_tokens=100)
    >>> (acc,) = run_analyses(m, batches, [acc], layers=[0, 2], progress=False)
    >>> acc.reservoirs[2].features.shape
    torch.Size([100, 128])
    """

    def __init__(self, layers=None, max_tokens=2000, seed=0, k=DEFAULT_K):
        if layers is not None and any(int(l) < 0 for l in layers):
            raise ValueError(f"EmbeddingsAccumulator needs non-negative layers, got {list(layers)}; "
                             "resolve them first with asg_probe.geometry.resolve_layers")
        self.layers = None if layers is None else sorted({int(l) for l in layers})
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        self.k = int(k)
        self.reservoirs = {}
        self.grid = None
        self.image_ids = set()
        self.img_size = None

    def update(self, batch):
        if self.grid is None:
            self.img_size = [int(batch.images.shape[-2]), int(batch.images.shape[-1])]
        self.grid = grid = batch_grid(self.grid, batch)
        if self.layers is None:
            have = sorted(batch.tokens)
            self.layers = sorted({have[0], have[len(have) // 2], have[-1]})
        missing = [l for l in self.layers if l not in batch.tokens]
        if missing:
            raise ValueError(f"the forward pass did not deliver layer(s) {missing}; "
                             "pass them in run_analyses(layers=...)")
        coords = grid_coords(grid, device=batch.image_index.device)
        for layer in self.layers:
            res = self.reservoirs.setdefault(layer, TokenReservoir(self.max_tokens, self.seed))
            res.update(batch.tokens[layer], coords, batch.image_index)
        self.image_ids.update(int(i) for i in batch.image_index.tolist())

    def all_reduce(self, group=None):
        """Merge the samples of every torch.distributed process (no-op in one process)."""
        from ..distributed import all_gather_object, rank_world

        if rank_world(group)[1] == 1:
            return
        mine = {layer: (r.features.cpu(), r.targets.cpu(), r.image_index.cpu(), r.keys.cpu())
                for layer, r in self.reservoirs.items() if r.keys is not None}
        gathered = all_gather_object((mine, sorted(self.image_ids), self.grid, self.img_size, self.layers), group)
        layers = self.layers or next((part[4] for part in gathered if part[4]), None) or []
        merged = {}
        for layer in layers:
            res = TokenReservoir(self.max_tokens, self.seed)
            for part, *_ in gathered:
                if layer in part:
                    res._offer(*part[layer])
            merged[layer] = res
        self.reservoirs = merged
        self.layers = layers or None
        for _, ids, grid, size, _ in gathered:
            self.image_ids.update(ids)
            self.grid = self.grid or grid
            self.img_size = self.img_size or size

    def result(self, label="", num_images=None):
        """Lay out every layer's sample in 2-D and score it; returns :class:`EmbeddingsResult`.

        Call after :meth:`all_reduce` (done by :func:`~asg_probe.extract.run_analyses`).
        """
        if not self.reservoirs:
            raise ValueError("no tokens were collected: the image set is empty")
        if len(self.image_ids) < 2:
            raise UsageError("token embeddings need at least 2 images (the position score compares images); "
                             "pass num_images >= 2")
        rows_out = []
        method = "umap"
        for layer in sorted(self.reservoirs):
            res = self.reservoirs[layer]
            rc = res.targets.cpu().numpy().round().astype(int)
            image = res.image_index.cpu().numpy().astype(int)
            # canonical order (image, row, col): UMAP depends on the input order, which otherwise
            # depends on batching and on how many processes filled the sample
            order = np.lexsort((rc[:, 1], rc[:, 0], image))
            rc, image = rc[order], image[order]
            feats = res.features.float().cpu().numpy()[order]
            xy, reduced, method = embed_2d(feats, seed=self.seed)
            score = position_score(xy, rc[:, 0], rc[:, 1], image, self.grid, k=self.k)
            feat_score = position_score(reduced, rc[:, 0], rc[:, 1], image, self.grid, k=self.k)
            rows_out.append({
                "layer": int(layer), "x": xy[:, 0], "y": xy[:, 1], "row": rc[:, 0], "col": rc[:, 1],
                "image": image, "position_score": score["score"],
                "position_score_row": score["score_row"], "position_score_col": score["score_col"],
                "r2_knn_row": score["r2_knn_row"], "r2_knn_col": score["r2_knn_col"],
                "position_score_features": feat_score["score"], "n_tokens": int(xy.shape[0]),
            })
        return EmbeddingsResult(rows_out, self.grid, checkpoint=label, method=method,
                                num_images=num_images if num_images is not None else len(self.image_ids),
                                img_size=self.img_size, k=self.k)


# --------------------------------------------------------------------------- result

def _colour_key(ax, grid, rect=(1.04, 0.62, 0.36, 0.36)):
    """Small inset showing the 2-D colour map over the patch grid."""
    from ..plotting import position_colors

    gh, gw = grid
    inset = ax.inset_axes(list(rect))
    inset.imshow(position_colors(grid).reshape(gh, gw, 3), interpolation="nearest")
    inset.set_xticks([0, gw - 1])
    inset.set_yticks([0, gh - 1])
    inset.tick_params(labelsize=7, length=2)  # 7 pt: readable at 100% zoom
    inset.set_xlabel("col", fontsize=7, labelpad=1)
    inset.set_ylabel("row", fontsize=7, labelpad=3)
    inset.set_title("position key", fontsize=7)
    return inset


def _scatter(ax, entry, grid, title):
    from ..plotting import position_colors

    colours = position_colors(grid)[np.asarray(entry["row"]) * grid[1] + np.asarray(entry["col"])]
    n = len(entry["x"])
    ax.scatter(entry["x"], entry["y"], c=colours, s=float(np.clip(4000 / max(n, 1), 2, 14)), linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


class EmbeddingsResult(AnalysisResult):
    """Per layer, a 2-D layout of sampled patch tokens and its position score.

    ``layers`` is a list of dicts with ``layer``, ``x``, ``y``, ``row``, ``col``,
    ``image`` (arrays, one entry per sampled token) and the scores
    (``position_score``, its row/col parts, ``r2_knn_row``/``r2_knn_col`` and
    ``position_score_features``: the same score in the 50-D PCA space before UMAP).
    """

    name = "embeddings"

    def __init__(self, layers, grid, checkpoint="", method="umap", num_images=None, img_size=None, k=DEFAULT_K):
        self.layers = layers
        self.grid = tuple(int(g) for g in grid)
        self.checkpoint = checkpoint
        self.method = method
        self.num_images = num_images
        self.img_size = img_size
        self.k = k

    _SCALARS = ("position_score", "position_score_row", "position_score_col", "r2_knn_row", "r2_knn_col",
                "position_score_features", "n_tokens")

    def layer(self, layer):
        """The entry of one layer (``-1``: the last one shown)."""
        if layer == -1:
            return self.layers[-1]
        for entry in self.layers:
            if entry["layer"] == layer:
                return entry
        raise ValueError(f"layer {layer} is not in this result; it has layers {[e['layer'] for e in self.layers]}")

    def to_dict(self):
        layers = []
        for e in self.layers:
            d = {"layer": e["layer"]}
            for key in ("x", "y"):
                d[key] = [round(float(v), 4) for v in e[key]]
            for key in ("row", "col", "image"):
                d[key] = [int(v) for v in e[key]]
            d.update({key: e[key] for key in self._SCALARS})
            layers.append(d)
        return {"checkpoint": self.checkpoint, "grid": list(self.grid), "method": self.method,
                "num_images": self.num_images, "img_size": self.img_size, "k": self.k,
                "score": ("correlation of normalised (row, col) with the mean position of the k nearest "
                          "tokens from other images in the 2-D map"),
                "layers": layers}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"layer": e["layer"], **{k: e[k] for k in self._SCALARS}} for e in self.layers])

    def plot(self, ax=None):
        """One panel per layer, points coloured by 2-D grid position, with a colour key.

        ``ax`` may be one axis (only the first layer is drawn there) or a sequence
        of axes, one per layer.
        """
        from ..plotting import panel_axes

        n = len(self.layers)
        fig, axes = panel_axes(ax, n, 3.3, 3.3)
        for a, entry in zip(axes, self.layers):
            _scatter(a, entry, self.grid, f"layer {entry['layer']} — score {entry['position_score']:.2f}")
        _colour_key(axes[min(n, len(axes)) - 1], self.grid)
        a0 = axes[0]
        a0.set_xlabel(self.method.upper() + " 1", fontsize=8)
        a0.set_ylabel(self.method.upper() + " 2", fontsize=8)
        if self.checkpoint:
            fig.suptitle(f"Token-position embeddings — {self.checkpoint}", fontsize=10)
        fig.tight_layout()
        return fig

    def summary_line(self):
        parts = [f"layer {e['layer']}: {e['position_score']:.2f}" for e in self.layers]
        return "position score (0 = no spatial organisation, 1 = perfect): " + ", ".join(parts)


def compare_embeddings(results, labels=None, layer=-1):
    """Several models' embeddings of one layer side by side.

    Parameters
    ----------
    results : list of EmbeddingsResult
    labels : list of str, optional
        Panel titles (default: each result's checkpoint).
    layer : int
        Layer number present in every result, or ``-1`` for each result's last layer.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import asg_probe
    >>> imgs = torch.randn(6, 3, 32, 32)
    >>> res = [token_embeddings(asg_probe.create_model("vit_tiny_patch4_32", pos=p, depth=1), imgs,
    ...                         layers=[1], max_tokens=120, progress=False) for p in ("none", "ape")]
    >>> compare_embeddings(res, labels=["none", "ape"]).axes[0].get_title().splitlines()[0]
    'none'
    """
    from ..plotting import display_name, model_color, new_figure

    if not results:
        raise ValueError("compare_embeddings needs at least one EmbeddingsResult")
    labels = labels or [r.checkpoint or f"model {i}" for i, r in enumerate(results)]
    if len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results; pass one label per result")
    fig, axes = new_figure(3.3, 3.3, ncols=len(results))
    axes = list(axes[0])
    for i, (res, label, ax) in enumerate(zip(results, labels, axes)):
        entry = res.layer(layer)
        _scatter(ax, entry, res.grid,
                 f"{display_name(label)}\nlayer {entry['layer']} — score {entry['position_score']:.2f}")
        for spine in ax.spines.values():  # the model's colour, as in every other figure
            spine.set_edgecolor(model_color(label))
            spine.set_linewidth(2)
    _colour_key(axes[-1], results[-1].grid)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- high level

def token_embeddings(model, images=None, *, layers=None, num_images=64, img_size=None, batch_size=32,
                     max_tokens=2000, k=DEFAULT_K, seed=0, device="cpu", progress=True, label="", checkpoint=None):
    """UMAP of patch tokens of chosen layers, coloured by 2-D grid position, with a position score.

    Parameters
    ----------
    model : nn.Module
        A timm-style ViT (``patch_embed``, ``blocks``).
    images : None, str, Path, ImageSet or tensor
        As in :func:`asg_probe.layerwise_probes` (``None``: the embedded photographs).
    layers : list of int, optional
        Default: first, middle and last (``0``, ``depth // 2``, ``depth``); negative
        numbers count from the end.
    num_images, img_size, batch_size, seed
        Image set, as in :func:`asg_probe.layerwise_probes`; ``seed`` also seeds the
        token sample and UMAP.
    max_tokens : int
        Tokens sampled per layer (uniformly over all images' patches).
    k : int
        Neighbours of the position score (:func:`position_score`).
    device, progress, label
        Where the model runs, a tqdm bar and the display name stored in the result, as in
        :func:`asg_probe.layerwise_probes` (``checkpoint=``: a deprecated alias of ``label``).

    Returns
    -------
    EmbeddingsResult

    Examples
    --------
    >>> import asg_probe
    >>> model = asg_probe.create_model("vit_tiny_patch4_32", pos="sincos", depth=2)
    >>> res = token_embeddings(model, torch.randn(8, 3, 32, 32), max_tokens=200, progress=False)
    >>> res.to_frame()["layer"].tolist()
    [0, 1, 2]
    >>> bool(res.to_frame()["position_score"].iloc[0] > 0.5)   # sin-cos: tokens cluster by position
    True
    """
    from ..extract import run_analyses
    from ..geometry import model_geometry, resolve_layers
    from ..inputs import ImageBatches, display_label

    label = display_label(label, checkpoint)
    depth = model_geometry(model).depth
    layers = sorted({0, depth // 2, depth}) if layers is None else resolve_layers(layers, depth)
    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                batch_size=batch_size, seed=seed)
    if data.num_images < 2:
        raise UsageError(f"token embeddings need at least 2 images, got {data.num_images}; pass num_images >= 2")
    acc = EmbeddingsAccumulator(layers=layers, max_tokens=max_tokens, seed=seed, k=k)
    run_analyses(model, data, [acc], layers=layers, device=device, progress=progress, desc="embeddings")
    return acc.result(label, num_images=data.num_images).record_inputs(data, device=device)
