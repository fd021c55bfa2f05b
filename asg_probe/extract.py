"""One forward pass per image batch, shared by every analysis.

:func:`run_analyses` feeds each batch's per-layer patch tokens (and, when an
analysis asks for them, attention probabilities) to a list of *accumulators*,
which keep only small running statistics. That is what makes ``layerwise`` cost
about one forward pass and keeps memory flat in the number of images, and it is
how ``report`` computes every analysis from a single pass.

Layer numbering: ``0`` is the token sequence entering block 0 (patch embedding
plus whatever position the model injects there, e.g. ``ape``); ``i`` is the
output of block ``i`` (1-based), before the final norm.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .layers.grid import permute_patches


@dataclass
class ForwardBatch:
    """What an accumulator sees for one batch of images."""

    tokens: dict            # layer -> (B, N, D) patch tokens (prefix tokens removed)
    grid: tuple             # (grid_h, grid_w)
    image_index: torch.Tensor  # (B,) global image indices (fold assignment, sharding)
    images: torch.Tensor    # (B, 3, H, W) model input
    num_prefix_tokens: int
    patch_size: int
    attn: dict = field(default_factory=dict)  # layer -> reduced attention (see capture.py)
    perm: torch.Tensor | None = None  # (B, N) for the shuffled view: slot s holds original patch perm[b, s]


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


def model_geometry(model):
    """``(patch_size, num_prefix_tokens, depth)`` of a timm-style ViT."""
    patch = model.patch_embed.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return patch, prefix, len(model.blocks)


def resolve_layers(layers, depth):
    """``None`` → all of ``0..depth``; negative numbers count from the end; validated."""
    if layers is None:
        return list(range(depth + 1))
    out = []
    for layer in layers:
        layer = int(layer)
        layer = depth + 1 + layer if layer < 0 else layer
        if not 0 <= layer <= depth:
            raise ValueError(f"layer {layer} does not exist: this model has layers 0..{depth}")
        out.append(layer)
    return sorted(set(out))


@contextlib.contextmanager
def capture_tokens(model, layers, stop_early=True):
    """Record patch tokens of ``layers`` during forward passes; hooks are always removed.

    Yields a dict that is refilled on every forward: ``{layer: (B, N, D)}``.
    """
    patch, prefix, depth = model_geometry(model)
    layers = resolve_layers(layers, depth)
    store = {}
    last = max(layers) if layers else 0
    handles = []

    def keep(layer, tensor):
        store[layer] = tensor[:, prefix:].detach()
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
    with capture_tokens(model, layers, stop_early=stop_early) as store:
        try:
            with torch.no_grad():
                _features(model, x)
        except _StopForward:
            pass
        return dict(store)


def _features(model, x):
    if hasattr(model, "forward_features"):
        return model.forward_features(x)
    return model(x)


def run_analyses(model, batches, accumulators, layers=None, device="cpu", progress=True, total=None,
                 desc="forward"):
    """Run the model once over ``batches`` and feed every accumulator.

    Parameters
    ----------
    model : nn.Module
    batches : iterable of ``(images (B,3,H,W) float, image_index (B,) long)``
    accumulators : list
        Objects with ``update(ForwardBatch)``, ``finalize()``, and optionally
        ``needs_attention`` (bool), ``attention_reduce(attn, grid)`` (applied to each
        (B, H, N, N) map as soon as it is computed, so big maps are never stored) and
        ``view = "shuffled"`` (with ``shuffle_seed``) to receive the tokens of the same
        images with their patches shuffled. All views of a batch go through the model
        in one forward call.
    layers : list of int, optional
        Layers whose tokens are needed (default: all).
    """
    from .progress import progress_bar

    patch, prefix, depth = model_geometry(model)
    layers = resolve_layers(layers, depth)
    want_attn = [a for a in accumulators if getattr(a, "needs_attention", False)]
    model.eval().to(device)
    bar = progress_bar(batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False)
    shuffled = [a for a in accumulators if getattr(a, "view", "original") == "shuffled"]
    for images, index in bar:
        images = images.to(device, non_blocking=True)
        B = images.shape[0]
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        perm = None
        model_input = images
        if shuffled:
            perm = image_permutations(index, grid[0] * grid[1], getattr(shuffled[0], "shuffle_seed", 0))
            perm = perm.to(device)
            model_input = torch.cat([images, permute_patches(images, patch, perm)])
        attn = {}
        stop_early = not want_attn  # attention analyses need every block
        with contextlib.ExitStack() as stack:
            store = stack.enter_context(capture_tokens(model, layers, stop_early=stop_early))
            if want_attn:
                from .capture import capture_attention

                reduce = None
                if len(want_attn) == 1 and hasattr(want_attn[0], "attention_reduce"):
                    # attention analyses look at the original view only (the first B images)
                    reduce = (lambda r, g: (lambda a: r(a[:B], g)))(want_attn[0].attention_reduce, grid)
                recorder = stack.enter_context(capture_attention(model, reduce=reduce))
            try:
                with torch.no_grad():
                    _features(model, model_input)
            except _StopForward:
                pass
            tokens = dict(store)
            if want_attn:
                attn = dict(recorder.attn)
        index = index.to(device)
        views = {"original": {k: v[:B] for k, v in tokens.items()}}
        if shuffled:
            views["shuffled"] = {k: v[B:] for k, v in tokens.items()}
        for acc in accumulators:
            view = getattr(acc, "view", "original")
            acc.update(ForwardBatch(tokens=views[view], grid=grid, image_index=index, images=images,
                                    num_prefix_tokens=prefix, patch_size=patch, attn=attn,
                                    perm=perm if view == "shuffled" else None))
    return [acc.finalize() for acc in accumulators]
