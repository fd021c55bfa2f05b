"""Per-layer tokens and attention of any supported ViT, for your own analyses.

:func:`collect_activations` runs the extraction every asg_probe analysis uses
(:func:`asg_probe.extract.run_analyses`: the same layer numbering, prefix-token
handling, preprocessing and attention capture) and keeps what it sees in an
:class:`ActivationCache` keyed by layer.

Layer numbering: ``0`` is the token sequence entering block 0, ``i`` the output of
block ``i`` (before the final norm); attention exists for layers ``1..depth``.

Grid backbones (Swin, Hiera, MViTv2, PVTv2, NesT, VOLO, ...: :mod:`asg_probe.intermediates`)
are read as ``layerwise`` reads them, through timm's ``forward_intermediates``: layer ``i``
(from 1) is the ``i``-th feature map, each with its own grid (:attr:`ActivationCache.grids`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .extract import Accumulator, batch_grid, run_analyses
from .geometry import model_geometry, resolve_layers

__all__ = ["ActivationCache", "collect_activations"]


class ActivationCache(Mapping):
    """Patch tokens (and optionally attention maps) per layer, for every image.

    ``cache[layer]`` is a float32 CPU tensor ``(num_images, N, D)`` of the ``N =
    grid_h * grid_w`` patch tokens in row-major order (prefix tokens removed), images
    in the order of :attr:`image_index`.

    Attributes
    ----------
    attention : dict
        ``{layer: (num_images, H, N_all, N_all)}`` float32 attention probabilities
        (rows are queries) when collected, else empty. ``N_all`` includes the
        prefix tokens, which come first: ``attention[l][..., p:, p:]`` with ``p =
        num_prefix_tokens`` is patch-to-patch, ``attention[l][:, :, 0, p:]`` the
        class token's attention over patches.
    grid : tuple of int
        ``(grid_h, grid_w)`` of the first layer collected.
    grids : dict
        ``{layer: (grid_h, grid_w)}``: every layer's own grid (the same for every layer of a
        ViT; a grid backbone's stages shrink it).
    num_prefix_tokens : int
    patch_size : int
        Pixels per token side at the first layer collected (a grid backbone's stride there).
    image_index : torch.LongTensor
        ``(num_images,)``: row ``i`` of every tensor is image ``image_index[i]`` of the input.

    Examples
    --------
    >>> import torch
    >>> cache = ActivationCache({0: torch.zeros(2, 4, 8)}, grid=(2, 2), num_prefix_tokens=1,
    ...                         patch_size=16, image_index=torch.arange(2))
    >>> list(cache), cache[0].shape, cache.spatial(0).shape, cache.coords[-1].tolist()
    ([0], torch.Size([2, 4, 8]), torch.Size([2, 2, 2, 8]), [1, 1])

    A grid backbone's layers each have their grid:

    >>> cache = ActivationCache({1: torch.zeros(2, 16, 8), 2: torch.zeros(2, 4, 16)}, grid=(4, 4),
    ...                         grids={1: (4, 4), 2: (2, 2)}, num_prefix_tokens=0, patch_size=4,
    ...                         image_index=torch.arange(2))
    >>> cache.spatial(2).shape, cache.layer_coords(2).tolist()
    (torch.Size([2, 2, 2, 16]), [[0, 0], [0, 1], [1, 0], [1, 1]])
    """

    def __init__(self, tokens: dict, *, grid, num_prefix_tokens: int, patch_size: int, image_index,
                 attention: dict | None = None, grids: dict | None = None):
        self.tokens = dict(sorted(tokens.items()))
        self.attention = dict(sorted((attention or {}).items()))
        self.grid = tuple(int(g) for g in grid)
        self.grids = {int(layer): tuple(int(g) for g in (grids or {}).get(layer, self.grid)) for layer in self.tokens}
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.patch_size = int(patch_size)
        self.image_index = torch.as_tensor(image_index, dtype=torch.long)

    def __getitem__(self, layer):
        try:
            return self.tokens[int(layer)]
        except KeyError:
            raise KeyError(f"layer {layer} was not collected (collected: {list(self.tokens)})") from None

    def __iter__(self):
        return iter(self.tokens)

    def __len__(self):
        return len(self.tokens)

    @property
    def layers(self) -> list:
        """Layers whose tokens were collected."""
        return list(self.tokens)

    @property
    def num_images(self) -> int:
        return len(self.image_index)

    @property
    def coords(self) -> torch.Tensor:
        """``(N, 2)`` long: the (row, col) cell of each patch token on :attr:`grid` (see :meth:`layer_coords`)."""
        return _cells(self.grid)

    def layer_coords(self, layer) -> torch.Tensor:
        """``(N, 2)`` long: the (row, col) cell of each token of ``layer`` on that layer's own grid."""
        self[layer]   # the usual KeyError for a layer not collected
        return _cells(self.grids[int(layer)])

    def spatial(self, layer) -> torch.Tensor:
        """Tokens of ``layer`` laid out on its grid: ``(num_images, grid_h, grid_w, D)``."""
        tokens = self[layer]
        return tokens.reshape(tokens.shape[0], *self.grids[int(layer)], tokens.shape[-1])

    def __repr__(self):
        d = next(iter(self.tokens.values())).shape[-1] if self.tokens else 0
        attn = f", attention at {list(self.attention)}" if self.attention else ""
        grids = set(self.grids.values())
        grid = f"grids {self.grids}" if len(grids) > 1 else f"grid {self.grid}"
        return (f"ActivationCache({self.num_images} images, {grid}, {self.num_prefix_tokens} prefix "
                f"tokens, width {d}, layers {self.layers}{attn})")


def _cells(grid) -> torch.Tensor:
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


class _Collector(Accumulator):
    """Keeps every batch's tokens (and attention maps), on the CPU."""

    #: a grid backbone's layers come with grids of their own: kept per layer (``grids``)
    per_layer_grids = True

    def __init__(self, attention_layers):
        self.attention_layers = set(attention_layers)
        # full maps of the original view, moved off the device as soon as each block has run
        self.attention = (lambda attn, grid: attn.detach().float().cpu()) if attention_layers else None
        self.tokens, self.attn, self.index = {}, {}, []
        self.grid = None
        self.grids = {}

    def update(self, batch):
        self.grid = batch_grid(self.grid, batch)
        for layer in batch.tokens:
            self.grids.setdefault(layer, tuple(batch.grids.get(layer, self.grid)))
        for layer, tokens in batch.tokens.items():
            self.tokens.setdefault(layer, []).append(tokens.detach().float().cpu())
        for layer, attn in batch.attn.items():
            if layer in self.attention_layers:
                self.attn.setdefault(layer, []).append(attn)
        self.index.append(batch.image_index.detach().cpu())

    def all_reduce(self, group=None):
        """Nothing to merge: under torchrun each process keeps its own images (see ``image_index``)."""


def collect_activations(model, images=None, *, layers=None, attention=False, num_images=16, img_size=None,
                        batch_size=8, seed=0, device="cpu", progress=True) -> ActivationCache:
    """Patch tokens (and attention) of chosen layers, from the extraction every analysis uses.

    Parameters
    ----------
    model : nn.Module
        Any model the analyses accept: asg_probe or timm ViT, :func:`asg_probe.load_checkpoint`
        output (also Hugging Face folders, ``hf:`` and ``timm:`` names), or a timm grid backbone
        (its feature maps, layers from 1, each on its own grid: ``cache.grids``).
    images : None, str, Path, ImageSet or tensor
        As for :func:`asg_probe.layerwise_probes`: ``None`` the embedded photographs,
        ``"scenes"``, a folder, an ``ImageSet``, or a ``(N, 3, H, W)`` tensor (uint8 is
        normalised with the model's mean/std, float is used as is).
    layers : int or list of int, optional
        Layers to keep (default: all, ``0..depth``, a grid backbone's ``1..depth``); negative
        numbers count from the end.
    attention : bool or list of int
        ``True`` also keeps the attention maps of the requested layers (those ``≥ 1``);
        a list chooses attention layers separately. A map is ``H × N_all²`` floats
        per image and layer: ask for few layers on big models.
    num_images, img_size, seed
        How many images, at which size, which crops (photographs, scenes, folders).
    batch_size : int
    device : str or torch.device
    progress : bool

    Returns
    -------
    ActivationCache

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2)
    >>> cache = collect_activations(m, torch.zeros(3, 3, 32, 32, dtype=torch.uint8), layers=[0, -1],
    ...                             attention=True, progress=False)
    >>> cache.layers, tuple(cache[2].shape), tuple(cache.attention[2].shape), cache.grid
    ([0, 2], (3, 64, 128), (3, 4, 65, 65), (8, 8))

    A grid backbone, stage by stage:

    >>> import timm
    >>> swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(1, 1),
    ...                          num_heads=(1, 2), window_size=4, num_classes=0)
    >>> cache = collect_activations(swin, torch.zeros(2, 3, 32, 32), progress=False)
    >>> cache.layers, cache.grids, tuple(cache[2].shape)
    ([1, 2], {1: (8, 8), 2: (4, 4)}, (2, 16, 32))
    """
    from .inputs import ImageBatches

    geo = model_geometry(model)
    asked = [layers] if isinstance(layers, int) else list(layers or [])
    if geo.first_layer and 0 in asked:
        from .errors import UsageError

        raise UsageError(f"layer 0 does not exist for {type(model).__name__}: a grid backbone's layers are its "
                         f"feature maps 1..{geo.depth}")
    token_layers = resolve_layers(layers, geo.depth, first=geo.first_layer)
    if attention is True:
        attn_layers = [layer for layer in token_layers if layer >= 1]
        if not attn_layers:
            raise ValueError("attention=True, but no requested layer has attention (layer 0 is the patch "
                             "embedding); add layers >= 1 or pass attention=[...]")
    elif attention is False or attention is None:
        attn_layers = []
    else:
        attn_layers = resolve_layers(attention, geo.depth, first=1)
    batches = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                   batch_size=batch_size, seed=seed)
    from .analysis.resolution import any_input_size

    # a timm ViT built for one size takes any multiple of its patch while collecting
    with any_input_size(model):
        (acc,) = run_analyses(model, batches, [_Collector(attn_layers)], layers=token_layers, device=device,
                              progress=progress, desc="activations")
    index = torch.cat(acc.index) if acc.index else torch.empty(0, dtype=torch.long)
    order = torch.argsort(index)
    tokens = {layer: torch.cat(parts)[order] for layer, parts in acc.tokens.items()}
    attn = {layer: torch.cat(parts)[order] for layer, parts in acc.attn.items()}
    grid = acc.grid or geo.grid(batches.img_size)
    # a grid backbone's first layer has the stride of its first feature map, not a patch size
    patch = geo.patch_size if geo.kind == "vit" else batches.img_size[0] // grid[0]
    return ActivationCache(tokens, attention=attn, grid=grid, grids=acc.grids,
                           num_prefix_tokens=geo.num_prefix_tokens, patch_size=patch, image_index=index[order])
