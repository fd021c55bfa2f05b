"""Mean attention distance per head and layer (ViT paper; Raghu et al. 2021; SPEC §4).

For each head: the attention-weighted Euclidean distance between a query patch
centre and the key patch centres, in pixels, averaged over query patches and
images. Prefix tokens (class, registers) are left out, as queries and as keys, and
each query's remaining weights are renormalised to sum to 1. Works under fused
attention and for every positional mechanism (biases included), timm's plain ViT
and Eva, through :func:`asg_probe.capture.capture_attention`.

Everything streams: :func:`mean_attention_distance` returns per-head *sums* and a
count, so batches, input files and torchrun processes combine by addition.

Check: uniform attention over a ``g × g`` grid gives the grid's mean pairwise
distance × patch size, 116.5 px for 14 × 14 patches of 16 px.
"""
from __future__ import annotations

import torch

from ..extract import Accumulator
from ..results import AnalysisResult

__all__ = ["patch_centres", "pairwise_distances", "mean_attention_distance", "uniform_distance",
           "AttentionDistanceAccumulator", "AttentionDistanceResult", "attention_distance"]


def _pair(value):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"expected an int or a pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def patch_centres(grid, patch_size, device=None, dtype=torch.float64):
    """Pixel centres ``(y, x)`` of the patches of a ``grid``, row-major, ``(N, 2)``.

    Parameters
    ----------
    grid : (int, int)
        ``(grid_h, grid_w)`` patches.
    patch_size : int or (int, int)
        Patch height and width in pixels.

    Examples
    --------
    >>> patch_centres((1, 2), 16).tolist()
    [[8.0, 8.0], [8.0, 24.0]]
    """
    gh, gw = _pair(grid)
    ph, pw = _pair(patch_size)
    rows = (torch.arange(gh, device=device, dtype=dtype) + 0.5) * ph
    cols = (torch.arange(gw, device=device, dtype=dtype) + 0.5) * pw
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)


def pairwise_distances(grid, patch_size, device=None, dtype=torch.float64):
    """Euclidean distances between patch centres in pixels, ``(N, N)``, row-major patches.

    Examples
    --------
    >>> pairwise_distances((2, 2), 10)[0].tolist()  # doctest: +ELLIPSIS
    [0.0, 10.0, 10.0, 14.142...]
    """
    c = patch_centres(grid, patch_size, device=device, dtype=torch.float64)
    # Differences rather than torch.cdist: cdist's matmul trick loses the exact zeros.
    return (c[:, None, :] - c[None, :, :]).pow(2).sum(-1).sqrt().to(dtype)


def mean_attention_distance(attn, grid, patch_size, num_prefix_tokens):
    """Per-head distance sums of one batch of attention maps: ``(sum_per_head (H,), count)``.

    Parameters
    ----------
    attn : tensor (B, H, N_all, N_all)
        Attention probabilities, rows = queries, prefix tokens first.
    grid : (int, int)
        Patch grid, ``N_all = num_prefix_tokens + grid_h * grid_w``.
    patch_size : int or (int, int)
        In pixels.
    num_prefix_tokens : int
        Leading tokens without a position (class, registers); dropped as queries
        and as keys, and each query's patch weights renormalised to sum to 1.

    Returns
    -------
    sum_per_head : tensor (H,), float64
        Sum over images and query patches of the per-query mean distance (pixels).
    count : int
        Number of (image, query patch) pairs, ``B * grid_h * grid_w``; the mean is
        ``sum_per_head / count``. A query with no weight on any patch counts as 0 px.

    Examples
    --------
    >>> a = torch.full((1, 2, 5, 5), 0.2)  # uniform, 1 prefix token + 2x2 grid
    >>> total, count = mean_attention_distance(a, (2, 2), 16, num_prefix_tokens=1)
    >>> [round(v, 4) for v in (total / count).tolist()]  # (0 + 16 + 16 + 22.627) / 4
    [13.6569, 13.6569]
    """
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (B, H, N, N), got shape {tuple(attn.shape)}")
    p = int(num_prefix_tokens)
    gh, gw = _pair(grid)
    if attn.shape[-1] - p != gh * gw:
        raise ValueError(f"attention over {attn.shape[-1]} tokens does not match {p} prefix tokens + a "
                         f"{gh}x{gw} grid ({p + gh * gw} tokens)")
    # float32 unless given float64: a float64 copy of every map would double the memory
    # of the one thing that is big here, and the per-query sums need no more than fp32.
    work = torch.float64 if attn.dtype == torch.float64 else torch.float32
    a = attn[:, :, p:, p:].to(work)
    dist = pairwise_distances((gh, gw), patch_size, device=a.device, dtype=work)
    # Σ_j a_ij d_ij and Σ_j a_ij per query; dividing afterwards is the renormalisation,
    # without materialising a second (B, H, N, N) tensor.
    weighted = torch.einsum("bhij,ij->bhi", a, dist).double()
    mass = a.sum(-1).double()
    per_query = weighted / mass.clamp_min(torch.finfo(torch.float64).tiny)
    return per_query.sum(dim=(0, 2)), int(per_query.shape[0] * per_query.shape[2])


def uniform_distance(grid, patch_size) -> float:
    """Mean attention distance of uniform attention: the grid's mean pairwise distance, px.

    Examples
    --------
    >>> round(uniform_distance((14, 14), 16), 1)
    116.5
    """
    return float(pairwise_distances(grid, patch_size).mean())


def _square_patch(patch_size):
    ph, pw = _pair(patch_size)
    if ph != pw:
        raise ValueError(f"mean attention distance in grid units needs square patches, got {ph}x{pw}")
    return ph


class AttentionDistanceAccumulator(Accumulator):
    """Streams per-layer, per-head distance sums over batches (and torchrun processes).

    An :class:`~asg_probe.extract.Accumulator`: its :meth:`attention` reducer turns each
    block's ``(B, H, N, N)`` map into ``(sum (H,), count)`` as soon as the block has
    run, :meth:`update` adds those, :meth:`all_reduce` sums them over processes and
    :meth:`result` builds the :class:`AttentionDistanceResult`.

    Parameters
    ----------
    patch_size : int
        In pixels (square patches).
    num_prefix_tokens : int
        Class/register tokens at the start of the sequence.

    Notes
    -----
    :meth:`add` takes ``{layer: map}`` as a ``capture_attention`` recorder holds it,
    either full ``(B, H, N, N)`` maps or the ``(sum, count)`` pairs of :meth:`attention`,
    for use without :func:`~asg_probe.extract.run_analyses`. All batches of one
    accumulator must share one grid.

    Examples
    --------
    >>> acc = AttentionDistanceAccumulator(patch_size=16, num_prefix_tokens=0)
    >>> acc.add({1: torch.eye(4).expand(2, 3, 4, 4)}, grid=(2, 2))
    >>> acc.result().to_dict()["layers"][0]["heads_px"]
    [0.0, 0.0, 0.0]
    """

    def __init__(self, patch_size, num_prefix_tokens):
        self.patch_size = _square_patch(patch_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.sums = {}    # layer -> (H,) float64
        self.counts = {}  # layer -> number of (image, query) pairs
        self.grid = None

    def attention(self, attn, grid):
        """Reduce one block's ``(B, H, N, N)`` map to ``(sum (H,), count)`` at once.

        The prefix of each block is what its map holds beyond the grid's patches, so a class
        token that joins in a later block (ConViT) is left out there too. A map over fewer
        tokens than the grid (attention within windows) is refused in one line.
        """
        gh, gw = _pair(grid)
        extra = attn.shape[-1] - gh * gw
        if extra < 0:
            from ..errors import InputError

            raise InputError(f"a block attends over {attn.shape[-1]} tokens, fewer than the {gh}x{gw} patch grid "
                             "(attention within windows): mean attention distance over the whole grid is not "
                             "defined for it (its coordinate probes work)")
        return mean_attention_distance(attn, grid, self.patch_size, extra)

    def update(self, batch):
        """Add one :class:`~asg_probe.extract.ForwardBatch` (its ``attn`` holds reduced maps)."""
        self.add(batch.attn, batch.grid)

    def add(self, attn_by_layer, grid):
        """Add one batch: ``attn_by_layer = {layer: (B,H,N,N) map or (sum, count)}``."""
        grid = _pair(grid)
        if self.grid is not None and grid != self.grid:
            raise ValueError(f"grid changed from {self.grid} to {grid}: use one accumulator per input size")
        self.grid = grid
        for layer, value in attn_by_layer.items():
            if isinstance(value, torch.Tensor):
                value = self.attention(value, grid)
            total, count = value
            layer = int(layer)
            self.sums[layer] = self.sums.get(layer, 0) + total.detach().double().cpu()
            self.counts[layer] = self.counts.get(layer, 0) + int(count)

    def all_reduce(self, group=None):
        """Sum ``sums``/``counts`` over torchrun processes (a process may have seen no batch)."""
        from ..distributed import all_gather_object, rank_world

        if rank_world(group)[1] == 1:
            return
        mine = ({k: v.tolist() for k, v in self.sums.items()}, self.counts, self.grid)
        sums, counts, grid = {}, {}, None
        for part_sums, part_counts, part_grid in all_gather_object(mine, group):
            if part_grid is not None:
                if grid is not None and tuple(part_grid) != tuple(grid):
                    raise ValueError(f"processes saw different grids: {grid} and {part_grid}")
                grid = tuple(part_grid)
            for layer, values in part_sums.items():
                sums[layer] = sums.get(layer, 0) + torch.tensor(values, dtype=torch.float64)
                counts[layer] = counts.get(layer, 0) + part_counts[layer]
        self.sums, self.counts, self.grid = sums, counts, grid

    def result(self, label: str = "") -> "AttentionDistanceResult":
        """Means over everything added (after :meth:`all_reduce`: over all processes)."""
        if not self.sums:
            raise ValueError("no attention was recorded: nothing to summarise (no batch, or a model "
                             "whose blocks do not compute attention the timm way)")
        from ..finite import require_finite

        means = {layer: self.sums[layer] / self.counts[layer] for layer in sorted(self.sums)}
        require_finite(means, source=label or "model", what="the attention distance of layer ")
        heads_px = {layer: value.tolist() for layer, value in means.items()}
        num_images = self.counts[min(self.counts)] // (self.grid[0] * self.grid[1])
        return AttentionDistanceResult(heads_px, self.patch_size, self.grid, checkpoint=label,
                                       num_images=num_images)


class AttentionDistanceResult(AnalysisResult):
    """Mean attention distance per layer and head.

    Attributes
    ----------
    heads_px : dict
        ``{layer: [distance of head 0, head 1, ...]}`` in pixels; layer ``i`` is block
        ``i`` counted from 1.
    patch_size : int
    grid : (int, int)
    uniform_px : float
        Distance of uniform attention on this grid (the largest a head "looking
        everywhere" reaches): the dashed baseline of the plot.
    checkpoint : str
    num_images : int or None

    Examples
    --------
    >>> r = AttentionDistanceResult({1: [10.0, 30.0]}, patch_size=16, grid=(4, 4))
    >>> r.to_dict()["layers"][0]["mean_px"], r.to_dict()["layers"][0]["heads_grid"]
    (20.0, [0.625, 1.875])
    """

    name = "attention_distance"

    def __init__(self, heads_px, patch_size, grid, checkpoint="", num_images=None):
        self.heads_px = {int(k): [float(v) for v in px] for k, px in sorted(heads_px.items())}
        self.patch_size = int(patch_size)
        self.grid = _pair(grid)
        self.checkpoint = checkpoint
        self.num_images = num_images
        self.uniform_px = uniform_distance(self.grid, self.patch_size)

    def to_dict(self):
        layers = [{"layer": layer, "heads_px": px, "mean_px": sum(px) / len(px),
                   "heads_grid": [v / self.patch_size for v in px]} for layer, px in self.heads_px.items()]
        return {"checkpoint": self.checkpoint, "patch_size": self.patch_size, "grid": list(self.grid),
                "num_images": self.num_images, "uniform_px": self.uniform_px,
                "uniform_grid": self.uniform_px / self.patch_size, "layers": layers}

    def to_frame(self):
        """One row per (layer, head): ``layer, head, distance_px, distance_grid``."""
        import pandas as pd

        rows = [{"layer": layer, "head": head, "distance_px": v, "distance_grid": v / self.patch_size}
                for layer, px in self.heads_px.items() for head, v in enumerate(px)]
        return pd.DataFrame(rows, columns=["layer", "head", "distance_px", "distance_grid"])

    def plot(self, ax=None):
        """The ViT-paper scatter: one point per head at each layer, uniform baseline dashed.

        On an axis that shares its y-axis with others (a grid of models), the limits only
        grow, so that no panel drawn earlier loses its highest head.
        """
        from ..plotting import integer_ticks, new_figure

        if ax is None:
            _, axes = new_figure(6.6, 3.4)  # the legend sits right of the axes
            ax = axes[0][0]
        import matplotlib.pyplot as plt

        layers = list(self.heads_px)
        num_heads = max(len(px) for px in self.heads_px.values())
        cmap = plt.get_cmap("viridis", max(num_heads, 2))
        for head in range(num_heads):
            xs = [layer for layer in layers if head < len(self.heads_px[layer])]
            ax.scatter(xs, [self.heads_px[layer][head] for layer in xs], s=16, color=cmap(head), alpha=0.85,
                       label=f"head {head}" if num_heads <= 8 else None)
        ax.plot(layers, [sum(px) / len(px) for px in self.heads_px.values()], color="0.4", lw=1, label="mean")
        ax.axhline(self.uniform_px, ls="--", color="k", lw=0.8,
                   label=f"uniform {self.grid[0]}×{self.grid[1]} ({self.uniform_px:.1f} px)")
        ax.set_xlabel("layer (block)")
        ax.set_ylabel("mean attention distance (px)")
        integer_ticks(ax, layers)
        top = max(max(px) for px in self.heads_px.values())
        upper = max(self.uniform_px * 1.15, top * 1.05)
        if len(ax.get_shared_y_axes().get_siblings(ax)) > 1:  # keep the other panels' data inside
            upper = max(upper, ax.get_ylim()[1] if getattr(ax, "_asg_ylim_set", False) else 0.0)
            for sibling in ax.get_shared_y_axes().get_siblings(ax):
                sibling._asg_ylim_set = True
        ax.set_ylim(0, upper)
        ax.set_title("Mean attention distance" + (f" — {self.checkpoint}" if self.checkpoint else ""), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # over no head
        ax.figure.tight_layout()
        return ax.figure


def attention_distance(model, images=None, *, num_images=64, img_size=None, batch_size=32, device="cpu",
                       seed=0, progress=True, label="", checkpoint=None, mode="auto") -> AttentionDistanceResult:
    """Mean attention distance per head and layer of any timm-style ViT.

    Parameters
    ----------
    model : nn.Module
        timm ``VisionTransformer``, ``Eva`` or asg_probe ``SpatialViT``; fused
        attention is fine. It is put in eval mode for the run (its mode is restored)
        and moved to ``device``.
    images : None, str, Path, ImageSet or tensor
        See :meth:`asg_probe.inputs.ImageBatches.prepare`: default the embedded
        photographs (``num_images``, ``img_size``, ``seed`` choose them), a folder,
        or an ``(N, 3, H, W)`` tensor (uint8 is normalised with the model's mean/std).
    batch_size, device, progress, label
        As in :func:`asg_probe.layerwise_probes` (``checkpoint=``: a deprecated alias of ``label``).
    mode : {"auto", "sdpa", "attn_drop"}
        How attention is read; see :func:`asg_probe.capture.capture_attention`.

    Returns
    -------
    AttentionDistanceResult

    Examples
    --------
    >>> import timm, torch
    >>> m = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)
    >>> res = attention_distance(m, torch.randn(2, 3, 32, 32), progress=False)
    >>> [row["layer"] for row in res.to_dict()["layers"]], len(res.to_dict()["layers"][0]["heads_px"])
    ([1, 2], 3)
    """
    from ..errors import UsageError
    from ..extract import run_analyses
    from ..geometry import model_geometry
    from ..inputs import ImageBatches, display_label

    label = display_label(label, checkpoint)
    geo = model_geometry(model)
    if geo.kind != "vit":
        from ..errors import InputError

        raise InputError(f"{type(model).__name__} is a grid backbone read through forward_intermediates (windowed, "
                         "pooled or convolutional stages): its attention maps are not read, so mean attention "
                         "distance is not measured for it (its coordinate probes work)")
    if not geo.token_attention:
        raise UsageError(f"{type(model).__name__}'s attention is over channels (cross-covariance), not tokens: "
                         "mean attention distance is undefined for it (its coordinate probes work)")
    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                batch_size=batch_size, seed=seed)
    acc = AttentionDistanceAccumulator(geo.patch_size, geo.num_prefix_tokens)
    # layers=[0]: no tokens are needed beyond the first; attention comes from every block.
    run_analyses(model, data, [acc], layers=[0], device=device, progress=progress, desc="attention distance",
                 attention_mode=mode)
    return acc.result(label).record_inputs(data, device=device)
