"""Named hook points on every block, to read (cache) or patch activations: TransformerLens's
``run_with_cache`` / ``run_with_hooks`` for timm-style ViTs.

Hook point names are ``blocks.{i}.{point}`` with ``i`` the 0-based block (negative counts
from the end: ``blocks.-1.hook_resid_post`` is the last block's output). The points:

================== ==========================================================================
``hook_resid_pre``  the token sequence entering block ``i`` (asg_probe layer ``i``)
``hook_resid_post`` block ``i``'s output (asg_probe layer ``i + 1``), before the final norm
``hook_normed``     output of ``block.norm1``: the normed tokens attention reads (pre-norm blocks)
``hook_normed_mlp`` output of ``block.norm2``: the normed tokens the MLP reads
``hook_attn_out``   output of ``block.attn`` (after its output projection, *before* layer scale
                    and drop-path): the attention branch
``hook_mlp_out``    output of ``block.mlp`` (before layer scale and drop-path): the MLP branch
``hook_q``          queries ``(B, heads, tokens, head_dim)`` as passed to attention (after
                    q/k norms and RoPE), read where the block calls
                    ``scaled_dot_product_attention`` (as :mod:`asg_probe.capture` does)
``hook_k``, ``hook_v`` keys and values, likewise
``hook_pattern``    attention probabilities ``(B, heads, queries, keys)``, float32
================== ==========================================================================

Layer numbering: asg_probe's layer ``L`` (:mod:`asg_probe.geometry`: 0 = tokens entering
block 0, ``i`` = output of block ``i``) is :func:`resid_name`'s ``blocks.{L}.hook_resid_pre``
(``blocks.{depth-1}.hook_resid_post`` for the last).

**Parallel blocks** (timm's ``ParallelScalingBlock``: attention and MLP both read the same
input and are added together, ``x + attn(norm(x)) + mlp(norm(x))``) are labelled
``"parallel"`` by :func:`block_kind`; their ``hook_attn_out``/``hook_mlp_out`` are the two
branches' output projections (``attn_out_proj``, ``mlp_out_proj``), which are summed into the
residual, and ``hook_normed`` is the one shared ``in_norm`` (no ``hook_normed_mlp``).
Hugging Face models (:class:`asg_probe.hf.HFViT`) offer the residual and attention points
(``hook_resid_*``, ``hook_q/k/v``, ``hook_pattern``); :func:`hook_points` lists what a model has.

A hook function is called as ``fn(activation, name)``; returning ``None`` leaves the
activation as it is, returning a tensor replaces it (patching). Residual-stream functions
always see the full sequence, prefix tokens (class, registers) first; caches drop the prefix
tokens unless ``include_prefix=True``. ``hook_q/k/v`` and ``hook_pattern`` make the hooked
blocks' attention run through ``scaled_dot_product_attention`` for the duration (timm's
``fused_attn``); a patched pattern is applied as ``pattern @ v`` (eval mode: no dropout).
Every hook and patch is removed in a ``finally``, also when the forward raises.

Examples
--------
>>> import asg_probe, torch
>>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2).eval()
>>> x = torch.randn(2, 3, 32, 32)
>>> out, cache = run_with_cache(m, x, ["blocks.0.hook_resid_post", "blocks.-1.hook_pattern"])
>>> tuple(cache["blocks.0.hook_resid_post"].shape), tuple(cache["blocks.1.hook_pattern"].shape)
((2, 64, 128), (2, 4, 64, 64))
>>> same = run_with_hooks(m, x, fwd_hooks=[("blocks.0.hook_resid_post", lambda act, name: act)])
>>> torch.equal(same, out)
True
"""
from __future__ import annotations

import contextlib
import re
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError

__all__ = ["POINTS", "hook_points", "block_kind", "resid_name", "hooks", "run_with_hooks", "run_with_cache",
           "run_from", "iter_activations", "HookCache"]

#: Every hook point a block can have (see the module docstring).
POINTS = ("hook_resid_pre", "hook_resid_post", "hook_normed", "hook_normed_mlp", "hook_attn_out", "hook_mlp_out",
          "hook_q", "hook_k", "hook_v", "hook_pattern")
_ATTENTION_POINTS = ("hook_q", "hook_k", "hook_v", "hook_pattern")
# token-shaped points whose token axis is -2 (pattern: both -2 and -1)
_NAME = re.compile(r"blocks\.(-?\d+)\.(hook_\w+)")
_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _blocks(model):
    blocks = getattr(model, "blocks", None)
    if blocks is None or not isinstance(blocks, nn.Module) or len(blocks) == 0:
        raise UsageError(f"{type(model).__name__} has no `blocks`: hook points need a timm-style ViT")
    return list(blocks)


def block_kind(block) -> str:
    """``"parallel"`` for blocks whose attention and MLP read the same input (timm's
    ``ParallelScalingBlock``, ``ParallelThingsBlock``), else ``"sequential"``.

    >>> import timm
    >>> from timm.models.vision_transformer import ParallelScalingBlock
    >>> block_kind(ParallelScalingBlock(dim=8, num_heads=2)), block_kind(timm.models.vision_transformer.Block(8, 2))
    ('parallel', 'sequential')
    """
    return "parallel" if "Parallel" in type(block).__name__ else "sequential"


def _module_points(block) -> dict:
    """``{point: submodule whose forward output is that point}`` for a block's module-level points."""
    found = {}
    if block_kind(block) == "parallel":
        pairs = {"hook_attn_out": "attn_out_proj", "hook_mlp_out": "mlp_out_proj", "hook_normed": "in_norm"}
    else:
        pairs = {"hook_attn_out": "attn", "hook_mlp_out": "mlp", "hook_normed": "norm1", "hook_normed_mlp": "norm2"}
    for point, attr in pairs.items():
        module = getattr(block, attr, None)
        if isinstance(module, nn.Module):
            found[point] = module
    return found


def _uses_sdpa(block) -> bool:
    """Whether the block computes attention in a way the SDPA interception can read (timm's
    ``fused_attn`` modules, asg_probe's attention, Hugging Face layers set to ``sdpa``)."""
    if any(hasattr(m, "fused_attn") for m in block.modules()):
        return True
    return type(block).__name__ == "HFBlock"


def hook_points(model) -> list:
    """Every hook point name ``model`` offers, block by block.

    Examples
    --------
    >>> import asg_probe
    >>> names = hook_points(asg_probe.create_model("vit_tiny_patch4_32", depth=1))
    >>> names[:3], len(names)
    (['blocks.0.hook_resid_pre', 'blocks.0.hook_resid_post', 'blocks.0.hook_normed'], 10)
    """
    names = []
    for i, block in enumerate(_blocks(model)):
        points = ["hook_resid_pre", "hook_resid_post", *_module_points(block)]
        if _uses_sdpa(block):
            points += list(_ATTENTION_POINTS)
        names += [f"blocks.{i}.{p}" for p in POINTS if p in points]
    return names


def resid_name(layer: int, depth: int) -> str:
    """The hook point of asg_probe layer ``layer`` (0..depth; negative counts from the end).

    >>> resid_name(0, 4), resid_name(2, 4), resid_name(4, 4), resid_name(-1, 4)
    ('blocks.0.hook_resid_pre', 'blocks.2.hook_resid_pre', 'blocks.3.hook_resid_post', 'blocks.3.hook_resid_post')
    """
    from .geometry import resolve_layers

    (layer,) = resolve_layers([layer], depth)
    return f"blocks.{layer}.hook_resid_pre" if layer < depth else f"blocks.{depth - 1}.hook_resid_post"


def _resolve(model, names) -> dict:
    """``{canonical name: (block index, point)}``, every name validated before anything is attached."""
    blocks = _blocks(model)
    depth = len(blocks)
    out = {}
    for name in names:
        match = _NAME.fullmatch(str(name))
        if match is None:
            raise UsageError(f"hook point {name!r}: names look like 'blocks.3.hook_resid_post' "
                             f"(points: {', '.join(POINTS)})")
        i, point = int(match.group(1)), match.group(2)
        if not -depth <= i < depth:
            raise UsageError(f"hook point {name!r}: this model has blocks 0..{depth - 1} (or -{depth}..-1)")
        i %= depth
        canonical = f"blocks.{i}.{point}"
        offered = hook_points_of_block(blocks[i])
        if point not in offered:
            raise UsageError(f"hook point {name!r}: block {i} ({type(blocks[i]).__name__}) offers "
                             f"{', '.join(offered)}")
        out[canonical] = (i, point)
    return out


def hook_points_of_block(block) -> list:
    """The points (without ``blocks.i.``) one block offers, in :data:`POINTS` order."""
    points = {"hook_resid_pre", "hook_resid_post", *_module_points(block)}
    if _uses_sdpa(block):
        points.update(_ATTENTION_POINTS)
    return [p for p in POINTS if p in points]


def _apply(fns, name, value):
    for fn in fns:
        new = fn(value, name)
        if new is not None:
            value = new
    return value


class _BlockTracker:
    """Which hooked block is running (in which thread): the SDPA wrapper reads attention only there."""

    def __init__(self):
        self.current = None
        self.thread = None
        self.seen = set()

    def start(self, i):
        self.current, self.thread = i, threading.get_ident()
        self.seen.discard(i)

    def stop(self):
        self.current = None

    def active(self):
        return self.current is not None and self.thread == threading.get_ident()


@contextlib.contextmanager
def hooks(model, fns):
    """Attach hook functions to named points for the duration of the ``with`` block.

    Parameters
    ----------
    model : nn.Module
        A timm-style ViT (asg_probe, timm, :class:`asg_probe.hf.HFViT`).
    fns : dict or list of (name, fn)
        ``fn(activation, name)`` returns ``None`` (read only) or a replacement tensor.
        Several functions on one point run in order, each seeing the previous one's result.

    Raises
    ------
    UsageError
        An unknown or unavailable hook point, or a function that is not callable; nothing is
        attached then.

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", depth=2).eval()
    >>> seen = []
    >>> with hooks(m, {"blocks.-1.hook_mlp_out": lambda act, name: seen.append(name)}):
    ...     _ = m(torch.randn(1, 3, 32, 32))
    >>> seen
    ['blocks.1.hook_mlp_out']
    """
    pairs = list(fns.items()) if isinstance(fns, dict) else [tuple(p) for p in fns]
    for pair in pairs:
        if len(pair) != 2 or not callable(pair[1]):
            raise UsageError(f"hooks take (name, fn) pairs with a callable fn, got {pair!r}")
    resolved = _resolve(model, [name for name, _ in pairs])
    by_point = {}
    for name, fn in pairs:
        by_point.setdefault(resolved[_canonical(model, name)], []).append(fn)
    blocks = _blocks(model)
    handles, flags = [], []
    tracker = _BlockTracker()
    attention_blocks = {i for (i, p) in by_point if p in _ATTENTION_POINTS}
    original_sdpa = F.scaled_dot_product_attention
    state = {"open": True}

    def sdpa(query, key, value, *args, **kwargs):
        if not (state["open"] and tracker.active() and tracker.current in attention_blocks):
            return original_sdpa(query, key, value, *args, **kwargs)
        i = tracker.current
        tracker.seen.add(i)
        query = _apply(by_point.get((i, "hook_q"), ()), f"blocks.{i}.hook_q", query)
        key = _apply(by_point.get((i, "hook_k"), ()), f"blocks.{i}.hook_k", key)
        value = _apply(by_point.get((i, "hook_v"), ()), f"blocks.{i}.hook_v", value)
        pattern_fns = by_point.get((i, "hook_pattern"))
        if not pattern_fns:
            return original_sdpa(query, key, value, *args, **kwargs)
        from .capture import attention_probabilities

        named = dict(zip(_SDPA_ARGS, args))
        named.update(kwargs)
        probs = attention_probabilities(query, key, named.get("attn_mask"), named.get("scale"),
                                        bool(named.get("is_causal", False)), bool(named.get("enable_gqa", False)))
        new = _apply(pattern_fns, f"blocks.{i}.hook_pattern", probs)
        if new is probs:   # read only: the model's own kernel, outputs unchanged
            return original_sdpa(query, key, value, *args, **kwargs)
        return (new.to(value.dtype) @ value)

    def pre(i, fns_):
        def hook(module, args):
            tracker.start(i)
            if fns_:
                new = _apply(fns_, f"blocks.{i}.hook_resid_pre", args[0])
                if new is not args[0]:
                    return (new, *args[1:])
            return None
        return hook

    def post(i, fns_):
        def hook(module, args, output):
            tracker.stop()
            if fns_:
                new = _apply(fns_, f"blocks.{i}.hook_resid_post", output)
                if new is not output:
                    return new
            return None
        return hook

    def module_hook(name, fns_):
        def hook(module, args, output):
            new = _apply(fns_, name, output)
            return None if new is output else new
        return hook

    try:
        for i, block in enumerate(blocks):
            resid_pre, resid_post = by_point.get((i, "hook_resid_pre")), by_point.get((i, "hook_resid_post"))
            if resid_pre or resid_post or i in attention_blocks:
                handles.append(block.register_forward_pre_hook(pre(i, resid_pre)))
                handles.append(block.register_forward_hook(post(i, resid_post)))
            for point, module in _module_points(block).items():
                if (i, point) in by_point:
                    handles.append(module.register_forward_hook(module_hook(f"blocks.{i}.{point}",
                                                                            by_point[(i, point)])))
            if i in attention_blocks:
                for module in block.modules():
                    if hasattr(module, "fused_attn"):
                        flags.append((module, module.fused_attn))
                        module.fused_attn = True
        if attention_blocks:
            F.scaled_dot_product_attention = sdpa
        yield tracker
    finally:
        state["open"] = False
        if attention_blocks:
            F.scaled_dot_product_attention = original_sdpa
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.fused_attn = flag
        tracker.stop()


def _canonical(model, name):
    match = _NAME.fullmatch(str(name))
    depth = len(_blocks(model))
    return f"blocks.{int(match.group(1)) % depth}.{match.group(2)}"


def _forward(model, images):
    with torch.no_grad():
        return model(images)


def run_with_hooks(model, images, fwd_hooks=(), *, forward=None):
    """``model(images)`` (no gradients) with ``fwd_hooks`` attached, removed afterwards.

    Parameters
    ----------
    model : nn.Module
    images : tensor (B, 3, H, W)
        Model input (normalised).
    fwd_hooks : list of (name, fn) or dict
        See :func:`hooks`.
    forward : callable, optional
        ``forward(model, images)`` to run instead of ``model(images)`` (e.g. ``forward_features``).

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", depth=2).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> zeroed = run_with_hooks(m, x, [("blocks.1.hook_mlp_out", lambda act, name: torch.zeros_like(act))])
    >>> zeroed.shape, bool((zeroed != m(x)).any())
    (torch.Size([2, 1000]), True)
    """
    with hooks(model, fwd_hooks) as tracker:
        out = (forward or _forward)(model, images)
    _check_attention_seen(model, fwd_hooks, tracker)
    return out


def _pass_through(x, *args, **kwargs):
    return x


@contextlib.contextmanager
def _skipped(blocks):
    """The ``blocks`` return their input unchanged for the duration (an instance attribute shadows
    ``forward``; hooks on them still run), restored in a ``finally``."""
    saved = []
    try:
        for block in blocks:
            saved.append((block, block.__dict__.get("forward")))
            block.forward = _pass_through
        yield
    finally:
        for block, own in saved:
            if own is None:
                del block.__dict__["forward"]
            else:
                block.forward = own


def run_from(model, layer, resid, images, fwd_hooks=(), *, forward=None):
    """Continue a forward pass from asg_probe layer ``layer``: ``resid`` enters there, and only the
    blocks from ``layer`` on (then the final norm and head) run on it.

    What :func:`run_with_hooks` with a patching hook at :func:`resid_name` ``(layer)`` computes,
    without running the blocks before ``layer``: the cheap way to run many edits of one cached
    residual stream (causal erasure at every layer: :func:`asg_probe.erase_position`). The blocks
    before ``layer`` are skipped for the duration (each returns its input); the model's own
    ``forward`` (or ``forward``) still runs its embedding on ``images``, whose result is discarded,
    so any per-forward state the embedding sets (grid, RoPE, resolution) is that of ``images``.

    Parameters
    ----------
    model : nn.Module
    layer : int
        asg_probe layer (0..depth; negative counts from the end).
    resid : tensor (B, prefix + N, D)
        The residual stream at ``layer``, prefix tokens included (``run_with_cache(...,
        include_prefix=True)``).
    images : tensor (B, 3, H, W)
        The images ``resid`` belongs to (any whose token sequence has ``resid``'s length and batch).
    fwd_hooks : list of (name, fn) or dict
        Further hooks (:func:`hooks`), at ``layer`` or later; a function at ``layer``'s own point sees
        ``resid``.
    forward : callable, optional
        As in :func:`run_with_hooks`.

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", depth=3).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> out, cache = run_with_cache(m, x, [resid_name(2, 3)], include_prefix=True)
    >>> resumed = run_from(m, 2, cache[resid_name(2, 3)], x)
    >>> torch.allclose(resumed, out, atol=1e-5)
    True
    """
    from .geometry import resolve_layers

    blocks = _blocks(model)
    depth = len(blocks)
    (layer,) = resolve_layers([layer], depth)
    if resid.shape[0] != images.shape[0]:
        raise UsageError(f"run_from: resid has {resid.shape[0]} sequences for {images.shape[0]} images; "
                         "pass the images the residual stream belongs to (repeat them for stacked copies)")

    def enter(act, name):
        if act.shape != resid.shape:
            raise UsageError(f"run_from: resid has shape {tuple(resid.shape)}, the model's layer {layer} has "
                             f"{tuple(act.shape)}; pass the residual stream with its prefix tokens "
                             "(run_with_cache(..., include_prefix=True)) of images of this size")
        return resid.to(act.dtype)

    extra = list(fwd_hooks.items()) if isinstance(fwd_hooks, dict) else [tuple(p) for p in fwd_hooks]
    with _skipped(blocks[:layer]):
        return run_with_hooks(model, images, [(resid_name(layer, depth), enter), *extra], forward=forward)


def _check_attention_seen(model, fns, tracker):
    names = list(fns) if isinstance(fns, dict) else [n for n, _ in fns]
    missing = sorted({_canonical(model, n).split(".")[1] for n in names
                      if n.rsplit(".", 1)[-1] in _ATTENTION_POINTS}
                     - {str(i) for i in tracker.seen})
    if missing:
        raise RuntimeError(f"blocks {', '.join(missing)} never called scaled_dot_product_attention: "
                           "hook_q/k/v/pattern need attention computed through it")


class HookCache(dict):
    """``{hook point name: tensor}`` of one forward pass, with what is needed to read it.

    Attributes
    ----------
    num_prefix_tokens : int
        Prefix tokens of the model (dropped from every tensor unless ``include_prefix``).
    include_prefix : bool
    image_index : tensor or None
        Global index of each image of the batch (:func:`iter_activations`).
    """

    def __init__(self, values, *, num_prefix_tokens, include_prefix, image_index=None):
        super().__init__(values)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.include_prefix = bool(include_prefix)
        self.image_index = image_index


def _strip(name, value, prefix):
    point = name.rsplit(".", 1)[-1]
    if prefix == 0 or not isinstance(value, torch.Tensor):
        return value
    if point == "hook_pattern":
        return value[..., prefix:, prefix:]
    if point in ("hook_q", "hook_k", "hook_v"):
        return value[..., prefix:, :]
    return value[:, prefix:]


def run_with_cache(model, images, names=None, *, include_prefix=False, forward=None, to_cpu=False):
    """``(model(images), cache)``: the output and the activations at ``names``.

    Parameters
    ----------
    model : nn.Module
    images : tensor (B, 3, H, W)
    names : list of str, optional
        Hook points (default: every residual point, ``hook_resid_pre`` of each block and the
        last block's ``hook_resid_post``, i.e. asg_probe layers ``0..depth``).
    include_prefix : bool, default=False
        Keep prefix tokens (class, registers) in token-shaped tensors. Without it the
        residual points hold patch tokens only; ``hook_q/k/v`` drop the prefix rows and
        ``hook_pattern`` keeps patch-to-patch attention (``[..., p:, p:]``, whose rows then sum
        to less than 1: the rest went to prefix tokens).
    forward : callable, optional
        As in :func:`run_with_hooks`.
    to_cpu : bool
        Move every cached tensor to the CPU as soon as it is read.

    Returns
    -------
    output, HookCache

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", depth=2).eval()
    >>> _, cache = run_with_cache(m, torch.randn(1, 3, 32, 32), include_prefix=True)
    >>> sorted(cache), tuple(cache["blocks.0.hook_resid_pre"].shape)
    (['blocks.0.hook_resid_pre', 'blocks.1.hook_resid_post', 'blocks.1.hook_resid_pre'], (1, 65, 128))
    """
    from .geometry import model_geometry

    blocks = _blocks(model)
    if names is None:
        names = [resid_name(layer, len(blocks)) for layer in range(len(blocks) + 1)]
    names = [_canonical(model, n) for n in _resolve(model, names)]
    prefix = 0 if include_prefix else model_geometry(model).num_prefix_tokens
    store = {}

    def keep(act, name):
        value = _strip(name, act.detach(), prefix)
        store[name] = value.cpu() if to_cpu else value

    out = run_with_hooks(model, images, [(n, keep) for n in names], forward=forward)
    return out, HookCache({n: store[n] for n in names}, num_prefix_tokens=model_geometry(model).num_prefix_tokens,
                          include_prefix=include_prefix)


def iter_activations(model, images=None, names=None, *, include_prefix=False, num_images=16, img_size=None,
                     batch_size=8, seed=0, device="cpu", with_output=False):
    """Stream activations batch by batch: yields one :class:`HookCache` per batch, on the CPU.

    Only one batch's activations are alive at a time, so 1,000 ViT-B images cost one batch of
    memory, not all of them. Images are resolved as for every analysis
    (:meth:`asg_probe.inputs.ImageBatches.prepare`); under torchrun each process gets its share.

    Parameters
    ----------
    model : nn.Module
    images : None, str, Path, ImageSet or tensor
    names : list of str, optional
        Hook points (default: every residual point; see :func:`run_with_cache`).
    include_prefix : bool
    num_images, img_size, batch_size, seed, device
        As in :func:`asg_probe.collect_activations`.
    with_output : bool
        Also put the model's output under ``cache["output"]``.

    Yields
    ------
    HookCache
        With ``image_index``: the global index of each image in the batch.

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", depth=1)
    >>> for cache in iter_activations(m, torch.zeros(5, 3, 32, 32, dtype=torch.uint8), ["blocks.0.hook_mlp_out"],
    ...                               batch_size=2):
    ...     print(cache.image_index.tolist(), tuple(cache["blocks.0.hook_mlp_out"].shape))
    [0, 1] (2, 64, 128)
    [2, 3] (2, 64, 128)
    [4] (1, 64, 128)
    """
    from .inputs import ImageBatches

    if names is not None:
        _resolve(model, names)   # a bad name fails before any image is read
    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size, batch_size=batch_size,
                                seed=seed)
    was_training = model.training
    model.eval().to(device)
    try:
        for x, index in data:
            out, cache = run_with_cache(model, x.to(device), names, include_prefix=include_prefix, to_cpu=True)
            cache.image_index = index
            if with_output:
                cache["output"] = out.detach().cpu()
            yield cache
    finally:
        model.train(was_training)
