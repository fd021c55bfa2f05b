"""One forward pass per image batch, shared by every analysis.

:func:`run_analyses` feeds each batch's per-layer patch tokens (and, to the
analyses that ask, their own reduced attention maps) to a list of
*accumulators* (:class:`Accumulator`), which keep only small running statistics.
That is what makes ``layerwise`` cost about one forward pass and keeps memory
flat in the number of images, and it is how ``report`` computes every analysis
from a single pass. It hands the accumulators back, merged across processes;
each analysis's entry point builds its result from its accumulator once.

Layer numbering: see :mod:`asg_probe.geometry` (``0`` is the token sequence
entering block 0, ``i`` the output of block ``i``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, runtime_checkable

import torch

from .errors import InputError
from .finite import model_source, require_finite
from .geometry import NO_GRID_HELP, any_input_size, model_geometry, resolve_layers
from .layers.grid import permute_patches

#: The views of a batch an accumulator can ask for.
VIEWS = ("original", "shuffled")

__all__ = ["Accumulator", "ForwardBatch", "VIEWS", "run_analyses", "forward_tokens", "capture_tokens",
           "image_permutations", "batch_grid"]


@dataclass
class ForwardBatch:
    """What an accumulator sees for one batch of images (see :class:`Accumulator`)."""

    tokens: dict            # layer -> (B, N, D) patch tokens of this accumulator's view (prefix tokens removed)
    grid: tuple             # (grid_h, grid_w)
    image_index: torch.Tensor  # (B,) global image indices (fold assignment, sharding)
    images: torch.Tensor    # (B, 3, H, W) model input
    num_prefix_tokens: int
    patch_size: int
    attn: dict = field(default_factory=dict)  # layer -> this accumulator's attention(map, grid); original view only
    perm: torch.Tensor | None = None  # (B, N) for the shuffled view: slot s holds original patch perm[b, s]
    grids: dict = field(default_factory=dict)  # layer -> (h, w) where a layer has its own grid (grid backbones)


@runtime_checkable
class Accumulator(Protocol):
    """What :func:`run_analyses` feeds: one analysis's streamed state over image batches.

    **Consumes**, per batch, a :class:`ForwardBatch`: ``tokens`` ``{layer: (B, N, D)}``
    (patch tokens only, prefix tokens removed) of the layers passed to
    :func:`run_analyses`, the patch ``grid``, the global ``image_index`` of each image
    (for fold assignment and sampling: the same for any batch size, order or process
    count), the model ``images``, ``num_prefix_tokens``, ``patch_size``, and

    * ``attn``: ``{layer: attention(map, grid)}`` when :attr:`attention` is a reducer,
      else ``{}``. The reducer is called on each block's ``(B, H, N_all, N_all)``
      attention probabilities (prefix tokens included, original view only) as soon
      as the block has run, so full maps are never stored; every accumulator that
      asks gets the output of *its own* reducer. With :attr:`attention_logits`
      True it is called as ``attention(map, grid, logits)``, ``logits`` being the
      block's pre-softmax scores, ``(B, H, N_all, N_all)`` float32 (see
      :func:`asg_probe.capture.capture_attention`); they are only computed and kept
      while some accumulator asks for them.
    * ``perm``: ``(B, N)`` when :attr:`view` is ``"shuffled"``: ``tokens`` are then those
      of the same images with their patches shuffled (slot ``s`` holds original patch
      ``perm[b, s]``, fixed per image by ``shuffle_seed``); ``None`` otherwise.
    * ``grids``: ``{layer: (h, w)}`` for a grid backbone (hierarchical or windowed,
      :mod:`asg_probe.intermediates`), whose layers each have their own grid; only
      accumulators with ``per_layer_grids = True`` are fed such models. Empty for ViTs.

    **Merges** in :meth:`all_reduce`, which :func:`run_analyses` calls once after the
    last batch: every process's statistics are combined (by
    :mod:`asg_probe.distributed`) so that each process then holds the totals; in one
    process it does nothing. Statistics are sums (or order-free samples), so batches,
    processes and input files combine by addition.

    **Hands back** itself: :func:`run_analyses` returns the accumulators, and the
    analysis's entry point reads the merged state (usually through a method such as
    ``result(...)``) and builds its result object once.

    Classes satisfy the protocol structurally; inheriting from it explicitly gives
    the defaults ``view = "original"``, ``shuffle_seed = 0`` and ``attention = None``.

    Examples
    --------
    >>> import asg_probe
    >>> class TokenCount(Accumulator):
    ...     def __init__(self):
    ...         self.n = torch.zeros((), dtype=torch.long)
    ...     def update(self, batch):
    ...         self.n += batch.tokens[0].shape[0] * batch.tokens[0].shape[1]
    ...     def all_reduce(self, group=None):
    ...         from asg_probe.distributed import all_reduce_sum
    ...         all_reduce_sum([self.n], group)
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    >>> (acc,) = run_analyses(m, [(torch.randn(3, 3, 32, 32), torch.arange(3))], [TokenCount()],
    ...                       layers=[0], progress=False)
    >>> int(acc.n)    # 3 images x 64 patches
    192
    """

    #: ``"original"``, or ``"shuffled"`` for the patch-shuffled copy of each batch.
    view: str = "original"
    #: Seed of the per-image patch permutations of the shuffled view.
    shuffle_seed: int = 0
    #: ``None`` (no attention), or ``reduce(attn (B, H, N, N), grid) -> anything``.
    attention: Optional[Callable] = None
    #: ``True``: ``attention`` is called as ``reduce(attn, grid, logits)`` with the pre-softmax scores.
    attention_logits: bool = False

    def update(self, batch: ForwardBatch) -> None:
        """Add one batch."""
        ...

    def all_reduce(self, group=None) -> None:
        """Combine the statistics of every torch.distributed process (no-op in one process)."""
        ...


def batch_grid(grid, batch: ForwardBatch) -> tuple[int, int]:
    """The patch grid of an accumulator that has seen ``batch``: statistics over tokens are
    only comparable on one grid, so its first batch fixes it and any other size is an error.

    ``grid``: the accumulator's grid so far (``None`` before the first batch).

    Examples
    --------
    >>> b = ForwardBatch(tokens={}, grid=(2, 2), image_index=torch.arange(1), images=torch.zeros(1, 3, 8, 8),
    ...                  num_prefix_tokens=0, patch_size=4)
    >>> batch_grid(None, b), batch_grid((2, 2), b)
    ((2, 2), (2, 2))
    >>> batch_grid((3, 3), b)
    Traceback (most recent call last):
    ...
    ValueError: all images must have one size; got grids (3, 3) and (2, 2)
    """
    new = tuple(int(g) for g in batch.grid)
    if grid is not None and new != tuple(grid):
        raise ValueError(f"all images must have one size; got grids {tuple(grid)} and {new}")
    return new


def image_permutations(image_index: torch.Tensor, num_patches: int, seed: int = 0) -> torch.Tensor:
    """One fixed random patch permutation per image, ``(B, N)``.

    Seeded by the image's global index, so a given image is shuffled the same way
    whatever the batch size, order or number of processes.
    """
    rows = []
    for i in image_index.tolist():
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
        rows.append(torch.randperm(num_patches, generator=gen))
    return torch.stack(rows).to(image_index.device)


class _StopForward(Exception):
    """Raised by a hook once the deepest requested layer is computed: later blocks are skipped."""


@contextlib.contextmanager
def capture_tokens(model, layers, stop_early=True, num_patches=None):
    """Record patch tokens of ``layers`` during forward passes; hooks are always removed.

    Yields a dict that is refilled on every forward: ``{layer: (B, N, D)}``. Blocks
    that carry an NHWC grid (SAM-ViT) are flattened row-major. With ``num_patches``,
    each layer's leading tokens beyond the patches are its prefix, so a class token
    that joins in a later block (ConViT) is dropped there too.
    """
    geo = model_geometry(model)
    prefix, depth = geo.num_prefix_tokens, geo.depth
    if geo.kind != "vit":
        raise InputError(f"{type(model).__name__} is a grid backbone without one token sequence through its "
                         "blocks: read it with asg_probe.intermediates.intermediate_tokens")
    layers = resolve_layers(layers, depth)
    store = {}
    last = max(layers) if layers else 0
    handles = []

    def keep(layer, tensor):
        if tensor.ndim == 4:   # (B, H, W, D) grid
            tensor = tensor.flatten(1, 2)
        skip = prefix if num_patches is None else max(tensor.shape[1] - int(num_patches), 0)
        store[layer] = tensor[:, skip:].detach()
        if stop_early and layer == last and last < depth:
            raise _StopForward

    try:
        if 0 in layers:
            handles.append(model.blocks[0].register_forward_pre_hook(lambda m, args: keep(0, args[0])))
        for layer in layers:
            if layer > 0:
                handles.append(model.blocks[layer - 1].register_forward_hook(
                    lambda m, args, out, layer=layer: keep(layer, out)))
        yield store
    finally:
        for h in handles:
            h.remove()


def forward_tokens(model, x, layers=None, stop_early=True):
    """Per-layer patch tokens of one batch: ``{layer: (B, N, D)}``.

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="none").eval()
    >>> toks = forward_tokens(m, torch.randn(2, 3, 32, 32), layers=[0, 4])
    >>> sorted(toks), toks[4].shape
    ([0, 4], torch.Size([2, 64, 128]))
    """
    gh, gw = model_geometry(model).grid(x.shape)
    with capture_tokens(model, layers, stop_early=stop_early, num_patches=gh * gw) as store:
        _forward(model, x)
        return dict(store)


def _forward(model, x):
    """One no-grad forward pass; stops quietly where :func:`capture_tokens` cut it short."""
    try:
        with torch.no_grad():
            _features(model, x)
    except _StopForward:
        pass


def _features(model, x):
    # any size the model can take: timm's dynamic path, position tables resampled
    with any_input_size(model):
        if hasattr(model, "forward_features"):
            return model.forward_features(x)
        return model(x)


def run_analyses(model, batches, accumulators, *, layers=None, device="cpu", progress=True, total=None,
                 desc="forward", attention_mode="auto"):
    """Run the model once over ``batches``, feed every accumulator, merge; return the accumulators.

    Parameters
    ----------
    model : nn.Module
        A timm-style ViT; put in eval mode (its mode is restored) and moved to ``device``.
    batches : iterable of ``(images (B,3,H,W) float, image_index (B,) long)``
        E.g. :class:`asg_probe.inputs.ImageBatches`.
    accumulators : list of Accumulator
        Each gets a :class:`ForwardBatch` per batch (see :class:`Accumulator`). All
        views of a batch (original, and the patch-shuffled copy when an accumulator
        asks for it) go through the model in one forward call; every accumulator with
        an ``attention`` reducer gets its own reduced maps.
    layers : list of int, optional
        Layers whose tokens are needed (default: all, ``0..depth``).
    device : str or torch.device
    progress : bool
        tqdm bar.
    total : int, optional
        Number of batches, for the bar (default: ``len(batches)`` when defined).
    desc : str
        Bar label.
    attention_mode : {"auto", "sdpa", "attn_drop"}
        How attention is read; see :func:`asg_probe.capture.capture_attention`.

    Returns
    -------
    list
        ``accumulators``, after :meth:`Accumulator.all_reduce`.
    """
    from .progress import progress_bar

    geo = model_geometry(model)
    patch, prefix = geo.patch_size, geo.num_prefix_tokens
    for acc in accumulators:
        if acc.view not in VIEWS:
            raise ValueError(f"{type(acc).__name__}.view must be one of {VIEWS}, got {acc.view!r}")
    if geo.kind != "vit":
        _check_grid_backbone(model, geo, accumulators)
        asked = [layers] if isinstance(layers, int) else list(layers or [])
        if 0 in asked:
            from .errors import UsageError

            raise UsageError(f"layer 0 does not exist for {type(model).__name__}: a grid backbone's layers are its "
                             f"feature maps 1..{geo.depth}")
    layers = resolve_layers(layers, geo.depth, first=geo.first_layer)
    want_attn = [acc for acc in accumulators if acc.attention is not None]
    shuffled = [acc for acc in accumulators if acc.view == "shuffled"]
    seeds = {int(acc.shuffle_seed) for acc in shuffled}
    if len(seeds) > 1:
        raise ValueError(f"shuffled-view accumulators of one pass must share one shuffle_seed, got {sorted(seeds)}")
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    was_training = model.training
    model.eval().to(device)
    try:
        bar = progress_bar(batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False)
        resized = {}  # grid backbones: input size -> the model at that size (timm's set_input_size on a copy)
        for images, index in bar:
            images, index = images.to(device, non_blocking=True), index.to(device)
            if geo.kind != "vit":
                _grid_backbone_batch(model, images, index, accumulators, layers, geo, resized)
                continue
            _one_batch(model, images, index, accumulators, layers,
                       patch, prefix, want_attn, shuffled, seeds, attention_mode)
    finally:
        model.train(was_training)
    for acc in accumulators:
        acc.all_reduce()
    return list(accumulators)


def _wants_logits(acc) -> bool:
    # getattr: accumulators written against the protocol before attention_logits existed
    # satisfy it structurally without the attribute.
    return bool(getattr(acc, "attention_logits", False))


def _check_grid_backbone(model, geo, accumulators):
    """Refuse, before any forward pass, analyses that a grid backbone cannot feed (one line)."""
    for acc in accumulators:
        what = type(acc).__name__
        if acc.attention is not None:
            raise InputError(f"{type(model).__name__} is a grid backbone read through forward_intermediates "
                             "(windowed, pooled or convolutional stages): its attention maps are not read, so "
                             "attention analyses refuse it; layerwise probes work")
        if acc.view != "original":
            raise InputError(f"{what} shuffles non-overlapping patches, which {type(model).__name__}'s stages "
                             f"(strides {list(geo.strides)}) do not keep apart; layerwise probes work")
        if not getattr(acc, "per_layer_grids", False):
            raise InputError(f"{what} needs one token grid for every layer, but {type(model).__name__} is a grid "
                             f"backbone (feature maps at strides {list(geo.strides)}); layerwise probes work. "
                             + NO_GRID_HELP)


def _grid_backbone_batch(model, images, index, accumulators, layers, geo, resized):
    from .intermediates import at_input_size, intermediate_tokens

    size = tuple(images.shape[-2:])
    if size not in resized:
        resized[size] = at_input_size(model, size).eval()
    tokens, grids = intermediate_tokens(resized[size], images, layers)
    require_finite(tokens, source=model_source(model), what="the feature map of layer ")
    first = grids[min(grids)]
    for acc in accumulators:
        acc.update(ForwardBatch(tokens=tokens, grid=first, image_index=index, images=images, num_prefix_tokens=0,
                                patch_size=images.shape[-2] // first[0], grids=grids))


def _one_batch(model, images, index, accumulators, layers, patch, prefix, want_attn, shuffled, seeds, mode):
    B = images.shape[0]
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    perm = None
    model_input = images
    if shuffled:
        perm = image_permutations(index, grid[0] * grid[1], next(iter(seeds))).to(images.device)
        model_input = torch.cat([images, permute_patches(images, patch, perm)])
    reducers = [(acc.attention, _wants_logits(acc)) for acc in want_attn]
    with_logits = any(wants for _, wants in reducers)

    total = model_input.shape[0]

    def batch_major(maps):
        if maps.ndim == 3:   # heads folded into the batch dimension (SAM-ViT): (B * H, N, N)
            maps = maps.unsqueeze(1)
        if maps.shape[0] != total:   # batch-major (B * X, H, N, N): X windows or heads per image
            maps = maps.reshape(total, -1, *maps.shape[-2:])
        return maps

    def reduce(attn, logits=None):
        attn = batch_major(attn)
        logits = None if logits is None else batch_major(logits)
        # attention analyses look at the original view only (the first B images)
        attn = attn[:B]
        logits = None if logits is None else logits[:B]
        return [r(attn, grid, logits) if wants else r(attn, grid) for r, wants in reducers]

    with contextlib.ExitStack() as stack:
        # attention analyses need every block, so no early stop then
        store = stack.enter_context(capture_tokens(model, layers, stop_early=not want_attn,
                                                   num_patches=grid[0] * grid[1]))
        if want_attn:
            from .capture import capture_attention

            recorder = stack.enter_context(capture_attention(model, reduce=reduce, mode=mode, logits=with_logits))
        _forward(model, model_input)
        tokens = dict(store)
        reduced = dict(recorder.attn) if want_attn else {}
    # the one activation check every analysis shares: a NaN token would become NaN statistics
    require_finite(tokens, source=model_source(model), what="the tokens of layer ")
    views = {"original": {k: v[:B] for k, v in tokens.items()}}
    if shuffled:
        views["shuffled"] = {k: v[B:] for k, v in tokens.items()}
    for acc in accumulators:
        attn = {}
        if acc.attention is not None:
            i = next(j for j, a in enumerate(want_attn) if a is acc)
            attn = {layer: values[i] for layer, values in reduced.items()}
        acc.update(ForwardBatch(tokens=views[acc.view], grid=grid, image_index=index, images=images,
                                num_prefix_tokens=prefix, patch_size=patch, attn=attn,
                                perm=perm if acc.view == "shuffled" else None))
