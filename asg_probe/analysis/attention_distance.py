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

Windowed and hierarchical backbones (Swin, Swin V2, SAM-ViT, NesT, Hiera, Twins, PVTv2) are measured
block by block within each window (see :func:`attention_distance`), in pixels like a
ViT, so that layers of different stride compare; each layer states its window (or
``"global"``), grid and stride.
"""
from __future__ import annotations

import math

import torch

from ..extract import Accumulator
from ..results import AnalysisResult

__all__ = ["patch_centres", "pairwise_distances", "mean_attention_distance", "uniform_distance",
           "AttentionDistanceAccumulator", "AttentionDistanceResult", "attention_distance", "window_distance_sums",
           "windowed_sites", "WINDOWED_FAMILIES"]


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
    layers_info : dict or None
        Windowed and hierarchical backbones only (``None`` for a ViT, whose every layer is
        global attention over ``grid``): ``{layer: {"block", "grid", "stride", "window",
        "shift"}}``, the block's module path, its token grid, its stride ``[sy, sx]`` in
        pixels, its window ``[wh, ww]`` in tokens or ``"global"``, and its cyclic shift
        (Swin). ``patch_size`` and ``grid`` are then the first layer's, so ``heads_grid``
        is in units of the first layer's tokens (input patches) at every layer.
    uniform_by_layer : dict
        ``{layer: px}``: what uniform attention reaches in that layer, each query spread evenly
        over the keys it may see (its window or the grid, within its region of Swin's shift
        mask, without padding; ``layers_info[layer]["uniform_px"]`` where given, else one whole
        window); ``uniform_px`` is the last layer's.

    Examples
    --------
    >>> r = AttentionDistanceResult({1: [10.0, 30.0]}, patch_size=16, grid=(4, 4))
    >>> r.to_dict()["layers"][0]["mean_px"], r.to_dict()["layers"][0]["heads_grid"]
    (20.0, [0.625, 1.875])
    >>> info = {1: {"block": "layers.0.blocks.0", "grid": [8, 8], "stride": [4, 4], "window": [2, 2], "shift": [0, 0]}}
    >>> w = AttentionDistanceResult({1: [2.0]}, 4, (8, 8), layers_info=info)
    >>> row = w.to_dict()["layers"][0]; row["window"], row["stride"], round(row["uniform_px"], 3)
    ([2, 2], [4, 4], 3.414)
    """

    name = "attention_distance"

    def __init__(self, heads_px, patch_size, grid, checkpoint="", num_images=None, layers_info=None):
        self.heads_px = {int(k): [float(v) for v in px] for k, px in sorted(heads_px.items())}
        self.patch_size = int(patch_size)
        self.grid = _pair(grid)
        self.checkpoint = checkpoint
        self.num_images = num_images
        self.layers_info = None if layers_info is None else {int(k): dict(v) for k, v in sorted(layers_info.items())}
        if self.layers_info is None:
            self.uniform_px = uniform_distance(self.grid, self.patch_size)
            self.uniform_by_layer = {layer: self.uniform_px for layer in self.heads_px}
        else:
            self.uniform_by_layer = {layer: float(info["uniform_px"]) if "uniform_px" in info else
                                     _uniform_in_window(info) for layer, info in self.layers_info.items()}
            self.uniform_px = self.uniform_by_layer[max(self.uniform_by_layer)]

    def to_dict(self):
        layers = [{"layer": layer, "heads_px": px, "mean_px": sum(px) / len(px),
                   "heads_grid": [v / self.patch_size for v in px]} for layer, px in self.heads_px.items()]
        if self.layers_info is not None:  # a ViT's output stays as it was
            for row in layers:
                uniform = self.uniform_by_layer[row["layer"]]
                row.update(self.layers_info[row["layer"]], uniform_px=uniform, uniform_grid=uniform / self.patch_size)
        return {"checkpoint": self.checkpoint, "patch_size": self.patch_size, "grid": list(self.grid),
                "num_images": self.num_images, "uniform_px": self.uniform_px,
                "uniform_grid": self.uniform_px / self.patch_size, "layers": layers}

    def to_frame(self):
        """One row per (layer, head): ``layer, head, distance_px, distance_grid``; for windowed
        backbones also ``window`` (``"7x7"`` or ``"global"``), ``stride`` (px) and ``uniform_px``."""
        import pandas as pd

        rows = [{"layer": layer, "head": head, "distance_px": v, "distance_grid": v / self.patch_size}
                for layer, px in self.heads_px.items() for head, v in enumerate(px)]
        columns = ["layer", "head", "distance_px", "distance_grid"]
        if self.layers_info is not None:
            for row in rows:
                info = self.layers_info[row["layer"]]
                window = info["window"]
                row["window"] = window if isinstance(window, str) else "x".join(str(v) for v in window)
                row["stride"] = info["stride"][0] if info["stride"][0] == info["stride"][1] else \
                    "x".join(str(v) for v in info["stride"])
                row["uniform_px"] = self.uniform_by_layer[row["layer"]]
            columns += ["window", "stride", "uniform_px"]
        return pd.DataFrame(rows, columns=columns)

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
        if self.layers_info is None:
            ax.axhline(self.uniform_px, ls="--", color="k", lw=0.8,
                       label=f"uniform {self.grid[0]}×{self.grid[1]} ({self.uniform_px:.1f} px)")
        else:  # each layer's own window (or grid) and stride
            ax.plot(layers, [self.uniform_by_layer[layer] for layer in layers], ls="--", color="k", lw=0.8,
                    drawstyle="steps-mid", label="uniform within the window")
        ax.set_xlabel("layer (block)")
        ax.set_ylabel("mean attention distance (px)")
        integer_ticks(ax, layers)
        top = max(max(px) for px in self.heads_px.values())
        upper = max(max(self.uniform_by_layer.values()) * 1.15, top * 1.05)
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
    """Mean attention distance per head and layer of any timm-style ViT, or within the windows of a
    windowed backbone.

    Parameters
    ----------
    model : nn.Module
        timm ``VisionTransformer``, ``Eva`` or asg_probe ``SpatialViT``; fused
        attention is fine. Or a windowed backbone: timm Swin, Swin V2, NesT, Hiera, or a
        SAM-ViT with windowed blocks. There layer ``i`` is the ``i``-th attention block in
        forward order over all stages; distances are between the true image positions (px)
        of query and key tokens within each window (Swin: after its cyclic shift, the pairs
        its mask separates carrying no weight; padding left out; Hiera: pooled queries at
        their cell's centre), and :attr:`AttentionDistanceResult.layers_info` states each
        layer's block, window (or ``"global"``), grid and stride. Twins and PVTv2 too:
        windows, or keys pooled by the module, each key at its pooled cell's centre
        (``key_grid``). MViTv2, VOLO, CoaT and MCi are refused in one line. The model is put in eval mode
        for the run (its mode is restored) and moved to ``device``.
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
    >>> swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(2,),
    ...                          num_heads=(1,), window_size=4)
    >>> rows = attention_distance(swin, torch.randn(2, 3, 32, 32), progress=False).to_dict()["layers"]
    >>> [(r["window"], r["shift"], r["stride"]) for r in rows]
    [([4, 4], [0, 0], [4, 4]), ([4, 4], [2, 2], [4, 4])]
    """
    from ..errors import UsageError
    from ..extract import run_analyses
    from ..geometry import model_geometry
    from ..inputs import ImageBatches, display_label

    label = display_label(label, checkpoint)
    geo = model_geometry(model)
    sites = windowed_sites(model)
    if sites is None and geo.kind != "vit":
        _refuse_unmapped(model)
    if sites is not None:
        data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                    batch_size=batch_size, seed=seed)
        result = _windowed_attention_distance(model, data, device=device, progress=progress, label=label, mode=mode)
        return result.record_inputs(data, device=device)
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


# --------------------------------------------------------------------------- windowed and hierarchical backbones
#
# Swin, Swin V2, SAM-ViT, NesT, Hiera and Twins attend within windows, PVTv2 and Twins to
# pooled keys, over grids that shrink from stage to stage. Each of their attention layers is
# read where it runs: the probabilities come from capture_attention (SDPA interception or
# attn_drop, as for a ViT), and the image position of every query and key comes from running
# the block's own window partition, unroll or pooling (timm's functions and modules) on a map
# of pixel centres. Distances are therefore true
# image distances in pixels, comparable across stages of different stride and with a ViT.

#: timm blocks whose window layout asg_probe reads: (module, class) -> layout
_WINDOWED_BLOCKS = {
    ("timm.models.swin_transformer", "SwinTransformerBlock"): "swin",
    ("timm.models.swin_transformer_v2", "SwinTransformerV2Block"): "swin",
    ("timm.models.vision_transformer_sam", "Block"): "sam",
    ("timm.models.nest", "NestLevel"): "nest",
    ("timm.models.hiera", "HieraBlock"): "hiera",
    ("timm.models.twins", "LocallyGroupedAttn"): "twins_local",
    ("timm.models.twins", "GlobalSubSampleAttn"): "subsampled",
    ("timm.models.pvt_v2", "Attention"): "subsampled",
}

#: grid backbones whose attention is not (yet) mapped to image positions, and why
_UNMAPPED = {
    "timm.models.mvitv2": "pooling attention: queries and keys pooled",
    "timm.models.volo": "outlook attention, not query-key attention",
    "timm.models.coat": "factorised attention over channels",
    "timm.models.fastvit": "convolutional token mixing",
}

#: the families :func:`attention_distance` reads, for messages and README
WINDOWED_FAMILIES = ("Swin", "Swin V2", "SAM-ViT", "NesT", "Hiera", "Twins", "PVTv2")


class _Site:
    """One attention layer of a windowed backbone: its block, its attention module, its layout."""

    def __init__(self, name, block, attn, layout, level=None):
        self.name, self.block, self.attn, self.layout, self.level = name, block, attn, layout, level


def windowed_sites(model):
    """The attention layers of a windowed backbone, in forward order, or ``None`` for another model.

    Layer ``i`` of the result is the ``i``-th attention block the image passes through
    (1-based, over all stages). A SAM-ViT whose blocks are all global gets ``None``:
    it is an ordinary ViT for :func:`attention_distance`.

    Examples
    --------
    >>> import timm
    >>> m = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(2, 1),
    ...                       num_heads=(1, 2), window_size=4)
    >>> [s.name for s in windowed_sites(m)]
    ['layers.0.blocks.0', 'layers.0.blocks.1', 'layers.1.blocks.0']
    """
    sites, pooled = [], []
    for name, module in model.named_modules():
        layout = _WINDOWED_BLOCKS.get((type(module).__module__, type(module).__name__))
        if layout == "hiera":
            # Hiera's tokens are unrolled (model.unroll) and pooled in place: a block's token
            # positions follow from the unroll and the query poolings of the blocks before it.
            sites.append(_Site(name, module, module.attn, layout, level=(model, tuple(pooled))))
            if module.attn.q_stride > 1:
                pooled.append(int(module.attn.q_stride))
        elif layout == "nest":
            for i, layer in enumerate(module.transformer_encoder):
                sites.append(_Site(f"{name}.transformer_encoder.{i}", layer, layer.attn, layout, level=module))
        elif layout in ("twins_local", "subsampled"):   # the attention module is the block: (x, size) in
            sites.append(_Site(name, module, module, layout))
        elif layout is not None:
            sites.append(_Site(name, module, module.attn, layout))
    if sites and all(s.layout == "sam" and not s.block.window_size for s in sites):
        return None
    return sites or None


def _refuse_unmapped(model):
    from ..errors import InputError

    families = {type(m).__module__ for m in model.modules()}
    why = next((text for module, text in _UNMAPPED.items() if module in families),
               "a layout asg_probe does not know")
    families = ", ".join(WINDOWED_FAMILIES[:-1])
    raise InputError(f"{type(model).__name__} is a grid backbone whose attention ({why}) is not mapped to image "
                     f"positions: mean attention distance is measured for ViTs, {families} and "
                     f"{WINDOWED_FAMILIES[-1]} (its coordinate probes work)")


def _centres(h, w, stride, device):
    """Pixel centres ``(h, w, 2)`` of an ``h × w`` token grid of ``stride = (sy, sx)`` pixels (maybe fractional)."""
    rows = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * float(stride[0])
    cols = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * float(stride[1])
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)


def _nan_pad(grid, window):
    """Pad a ``(h, w, 2)`` position map to whole windows with NaN: padded tokens have no position."""
    h, w, _ = grid.shape
    ph, pw = (-h) % window[0], (-w) % window[1]
    return torch.nn.functional.pad(grid.permute(2, 0, 1), (0, pw, 0, ph), value=float("nan")).permute(1, 2, 0)


def _site_layout(site, x, img_hw):
    """``(key positions (nW, N, 2), info, stride (sy, sx), to_windows)`` of one block from its input ``x``.

    ``to_windows`` turns the recorded probabilities into ``(B, nW, heads, Nq, N)``; ``info``
    is what the result states, plus private ``_queries`` (query positions where they are not
    the keys) and ``_allowed`` (Swin's shift mask) for the baseline.
    """
    import sys

    if site.layout == "hiera":
        return _hiera_layout(site, x, img_hw)
    if site.layout in ("twins_local", "subsampled"):
        return _token_size_layout(site, x, img_hw)
    heads = int(site.attn.num_heads)
    if site.layout == "nest":
        _, t, n, _ = x.shape
        b = int(site.level.block_size)
        side = math.isqrt(t) * b
        stride = (img_hw[0] / side, img_hw[1] / side)
        blockify = sys.modules[type(site.level).__module__].blockify
        pos = blockify(_centres(side, side, stride, x.device)[None], b)[0]   # (T, N, 2), NesT's own order
        info = {"grid": [side, side], "window": [b, b], "shift": [0, 0]}
        return pos, info, stride, lambda a: a.permute(0, 2, 1, 3, 4)     # (B, H, T, N, N) -> (B, T, H, N, N)
    _, h, w, _ = x.shape
    stride = (img_hw[0] / h, img_hw[1] / w)
    grid = _centres(h, w, stride, x.device)
    if site.layout == "sam":
        ws = int(site.block.window_size)
        if not ws:
            info = {"grid": [h, w], "window": "global", "shift": [0, 0]}
            return grid.reshape(1, h * w, 2), info, stride, lambda a: a.reshape(-1, 1, heads, *a.shape[-2:])
        partition = sys.modules[type(site.block).__module__].window_partition
        pos = partition(_nan_pad(grid, (ws, ws))[None], ws)[0].flatten(1, 2)
        info = {"grid": [h, w], "window": [ws, ws], "shift": [0, 0]}
        nw = pos.shape[0]
        return pos, info, stride, lambda a: a.reshape(-1, nw, heads, *a.shape[-2:])
    # Swin (V1 and V2): the block rolls its tokens by -shift, pads to whole windows and
    # partitions; doing the same to the positions gives each token's true place in the image.
    # Tokens that the roll brings together from opposite edges share a window but not a region
    # of the block's mask (-100 added to their logits: weight e^-100 relative), so their true,
    # long distances carry no weight: distances are within the (shifted) window as the block sees it.
    window, shift = tuple(site.block.window_size), tuple(site.block.shift_size)
    if any(shift):
        grid = torch.roll(grid, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    partition = sys.modules[type(site.block).__module__].window_partition
    padded = _nan_pad(grid, window)
    pos = partition(padded[None], window).flatten(1, 2)
    info = {"grid": [h, w], "window": list(window), "shift": list(shift)}
    # the pairs the block's shift mask lets attend (0 in the mask, -100 elsewhere), for the baseline
    mask = (site.block.get_attn_mask(padded.new_zeros(1, *padded.shape[:2], 1))
            if getattr(site.block, "dynamic_mask", False) else getattr(site.block, "attn_mask", None))
    if mask is not None:
        info["_allowed"] = mask.to(pos.device) == 0
    nw = pos.shape[0]
    return pos, info, stride, lambda a: a.reshape(-1, nw, heads, *a.shape[-2:])


def _token_size_layout(site, x, img_hw):
    """Twins and PVTv2: attention modules called as ``attn(x (B, N, C), (H, W))``.

    ``twins_local``: windows of ``ws × ws`` tokens, zero-padded (padding left out).
    ``subsampled``: every query attends to keys pooled by the module (a strided convolution
    ``sr``, or PVTv2-li's adaptive average pool): each key sits at the centre of the cell it
    pools, obtained by pooling the map of token centres the same way.
    """
    h, w = (int(v) for v in x[1])
    stride = (img_hw[0] / h, img_hw[1] / w)
    grid = _centres(h, w, stride, x[0].device)
    heads = int(site.attn.num_heads)
    if site.layout == "twins_local":
        ws = int(site.attn.ws)
        padded = _nan_pad(grid, (ws, ws))
        hp, wp = padded.shape[0] // ws, padded.shape[1] // ws
        pos = padded.reshape(hp, ws, wp, ws, 2).transpose(1, 2).reshape(hp * wp, ws * ws, 2)   # Twins' own order
        info = {"grid": [h, w], "window": [ws, ws], "shift": [0, 0]}
        return pos, info, stride, lambda a: a                                  # already (B, nW, H, N, N)
    cells = grid.permute(2, 0, 1)[None]                                        # (1, 2, h, w)
    pool, sr = getattr(site.attn, "pool", None), getattr(site.attn, "sr", None)
    if pool is not None:
        cells = pool(cells)
    if isinstance(sr, torch.nn.Conv2d) and sr.kernel_size != (1, 1):
        cells = torch.nn.functional.avg_pool2d(cells, sr.kernel_size, sr.stride, sr.padding)
    keys = cells[0].flatten(1).t()[None]                                       # (1, Nk, 2)
    info = {"grid": [h, w], "window": "global", "shift": [0, 0], "key_grid": list(cells.shape[-2:]),
            "_queries": grid.reshape(1, h * w, 2)}
    return keys, info, stride, lambda a: a.reshape(-1, 1, heads, *a.shape[-2:])


def _hiera_layout(site, x, img_hw):
    """Hiera: keys are the block's tokens in unrolled order, windows (mask units) interleaved
    (token ``t`` is in unit ``t mod nW``), queries max-pooled over ``q_stride`` tokens in place."""
    model, pooled = site.level
    attn = site.attn
    size = [int(v) for v in model.unroll.size]
    stride = (img_hw[0] / size[0], img_hw[1] / size[1])
    pos = model.unroll(_centres(size[0], size[1], stride, x.device).reshape(1, -1, 2))[0]   # (N0, 2)
    for q_stride in pooled:   # the poolings before this block: each token is its cell's centre
        pos = pos.view(q_stride, -1, 2).mean(0)
    factor = math.isqrt(math.prod(pooled)) if pooled else 1
    grid = [size[0] // factor, size[1] // factor]
    stride = (stride[0] * factor, stride[1] * factor)
    n, qs = pos.shape[0], int(attn.q_stride)
    nw = n // (qs * int(attn.window_size)) if attn.use_mask_unit_attn else 1
    keys = pos.view(-1, nw, 2).transpose(0, 1)                                  # (nW, L, 2)
    queries = keys.reshape(nw, qs, -1, 2).mean(1) if qs > 1 else None           # pooled as the block pools q
    extent = keys[0].amax(0) - keys[0].amin(0)
    window = "global" if nw == 1 else [int(round(float(extent[0]) / stride[0])) + 1,
                                       int(round(float(extent[1]) / stride[1])) + 1]
    info = {"grid": grid, "window": window, "shift": [0, 0], "query_pool": qs, "_queries": queries}
    heads = int(attn.heads)

    def to_windows(a):
        # (B, heads, nW, Lq, L) on the mask-unit path, (B, heads, Nq, N) on the global one
        return a.permute(0, 2, 1, 3, 4) if a.ndim == 5 else a.reshape(-1, heads, *a.shape[-2:]).unsqueeze(1)

    return keys, info, stride, to_windows


def window_distance_sums(attn, positions, query_positions=None):
    """Per-head distance sums of one windowed attention map: ``(sum_per_head (H,), count)``.

    Parameters
    ----------
    attn : tensor (B, nW, H, Nq, N)
        Probabilities within each of ``nW`` windows, rows = queries.
    positions : tensor (nW, N, 2)
        Image position (pixels) of each window's tokens (keys); NaN for padding. Padded keys are
        dropped and each query's weights renormalised; padded queries are not counted.
    query_positions : tensor (nW, Nq, 2), optional
        Where the queries are not the keys (Hiera's pooled queries: their pooling cell's centre).

    Returns
    -------
    sum_per_head : tensor (H,), float64
        Sum over images and real query tokens of the per-query mean distance, pixels.
    count : int
        Number of (image, real query token) pairs.

    Examples
    --------
    >>> pos = torch.tensor([[[0.0, 0.0], [0.0, 4.0], [float("nan")] * 2]])  # 1 window: 2 tokens + 1 pad
    >>> a = torch.full((1, 1, 1, 3, 3), 1 / 3)
    >>> total, count = window_distance_sums(a, pos)
    >>> (total / count).tolist(), count   # each real query: (0 + 4) / 2
    ([2.0], 2)
    """
    queries = positions if query_positions is None else query_positions
    if (attn.ndim != 5 or attn.shape[1] != positions.shape[0] or attn.shape[-1] != positions.shape[1]
            or attn.shape[-2] != queries.shape[1]):
        raise ValueError(f"attn {tuple(attn.shape)} does not match windows {tuple(positions.shape)}")
    work = torch.float64 if attn.dtype == torch.float64 else torch.float32
    real = ~torch.isnan(positions).any(-1)                                    # (nW, N)
    real_q = ~torch.isnan(queries).any(-1)                                    # (nW, Nq)
    k = positions.nan_to_num(0.0).to(device=attn.device, dtype=torch.float64)
    q = queries.nan_to_num(0.0).to(device=attn.device, dtype=torch.float64)
    dist = (q[:, :, None] - k[:, None, :]).pow(2).sum(-1).sqrt().to(work)     # (nW, Nq, N)
    a = attn.to(work) * real.to(attn.device, work)[None, :, None, None, :]
    weighted = torch.einsum("bwhij,wij->bwhi", a, dist).double()
    mass = a.sum(-1).double()
    per_query = weighted / mass.clamp_min(torch.finfo(torch.float64).tiny)
    per_query = per_query * real_q.to(attn.device, torch.float64)[None, :, None, :]
    return per_query.sum(dim=(0, 1, 3)), int(attn.shape[0] * int(real_q.sum()))


def _uniform_in_window(info) -> float:
    """Mean distance of uniform attention over one whole window of a layer (its grid where global), px."""
    region = info["grid"] if isinstance(info["window"], str) else info["window"]
    rows, cols = (torch.arange(int(n), dtype=torch.float64) + 0.5 for n in region)
    centres = torch.stack(torch.meshgrid(rows * float(info["stride"][0]), cols * float(info["stride"][1]),
                                         indexing="ij"), dim=-1).reshape(-1, 2)
    return float((centres[:, None] - centres[None]).pow(2).sum(-1).sqrt().mean())


def _uniform_baseline(keys, info) -> float:
    """What uniform attention reaches in this layer's own layout, px: each query spread evenly over
    the keys it may see (its window without padding, within its region of Swin's shift mask), from
    where it is (Hiera's pooled queries at their cell centres)."""
    queries = info.get("_queries")
    nq = keys.shape[1] if queries is None else queries.shape[1]
    allowed = info.get("_allowed")
    uniform = (torch.ones(keys.shape[0], nq, keys.shape[1], device=keys.device) if allowed is None
               else allowed.float().expand(keys.shape[0], nq, keys.shape[1]))
    total, count = window_distance_sums(uniform[None, :, None], keys, queries)
    return float(total[0]) / count


def _int_if_whole(v):
    return int(v) if float(v).is_integer() else float(v)


def _windowed_attention_distance(model, data, *, device, progress, label, mode):
    """Mean attention distance of a windowed backbone, every attention block a layer."""
    from ..capture import capture_attention
    from ..finite import require_finite
    from ..intermediates import at_input_size
    from ..progress import progress_bar

    sums, counts, info = {}, {}, {}
    num_images = 0
    resized = {}
    was_training = model.training
    model.eval().to(device)
    try:
        for images, _ in progress_bar(data, total=len(data), desc="attention distance", unit="batch",
                                      disable=not progress, leave=False):
            images = images.to(device)
            size = tuple(images.shape[-2:])
            if size not in resized:
                work = at_input_size(model, size).eval()
                resized[size] = (work, windowed_sites(work))
            work, sites = resized[size]
            state = {}

            def seen(module, args, site):
                state["layout"] = _site_layout(site, args if site.layout in ("twins_local", "subsampled") else args[0],
                                                size)

            def reduce(probs, state=state):
                pos, info, _, to_windows = state["layout"]
                return window_distance_sums(to_windows(probs), pos, info.get("_queries"))

            hooks = [s.block.register_forward_pre_hook(lambda m, a, s=s: seen(m, a, s)) for s in sites]
            try:
                layouts = {}

                def keep(module, args, layer):
                    layouts[layer] = state["layout"]

                hooks += [s.attn.register_forward_pre_hook(lambda m, a, layer=i + 1: keep(m, a, layer))
                          for i, s in enumerate(sites)]
                with torch.no_grad(), capture_attention(work, reduce=reduce, mode=mode,
                                                        blocks=[s.attn for s in sites]) as rec:
                    work.forward_features(images) if hasattr(work, "forward_features") else work(images)
            finally:
                for hook in hooks:
                    hook.remove()
            for layer, (total, count) in rec.attn.items():
                sums[layer] = sums.get(layer, 0) + total.cpu()
                counts[layer] = counts.get(layer, 0) + count
                pos, layer_info, stride, _ = layouts[layer]
                public = {k: v for k, v in layer_info.items() if not k.startswith("_")}  # not the tensors
                info[layer] = {"block": sites[layer - 1].name, **public,
                               "stride": [_int_if_whole(stride[0]), _int_if_whole(stride[1])],
                               "uniform_px": _uniform_baseline(pos, layer_info)}
            num_images += images.shape[0]
    finally:
        model.train(was_training)
    # under torchrun each process saw its share of the images: sum over all of them
    from ..distributed import all_gather_object

    parts = all_gather_object(({k: v.tolist() for k, v in sums.items()}, counts, info, num_images))
    if len(parts) > 1:
        sums, counts, num_images = {}, {}, 0
        for part_sums, part_counts, part_info, part_images in parts:
            info.update(part_info)
            num_images += part_images
            for layer, values in part_sums.items():
                sums[layer] = sums.get(layer, 0) + torch.tensor(values, dtype=torch.float64)
                counts[layer] = counts.get(layer, 0) + part_counts[layer]
    if not sums:
        raise ValueError(f"no attention was recorded: no batch, or mode={mode!r} reads none of "
                         f"{type(model).__name__}'s attention modules; use mode='auto'")
    means = {layer: sums[layer] / counts[layer] for layer in sorted(sums)}
    require_finite(means, source=label or "model", what="the attention distance of layer ")
    first = info[min(info)]
    return AttentionDistanceResult({k: v.tolist() for k, v in means.items()}, first["stride"][0], first["grid"],
                                   checkpoint=label, num_images=num_images, layers_info=info)
