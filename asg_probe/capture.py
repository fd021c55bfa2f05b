"""Attention probabilities from any timm-style ViT, while it runs with fused attention.

Fused kernels (``F.scaled_dot_product_attention``, "SDPA") never materialise the
attention matrix, which is why hook-based tools lose attention maps or ask the
user to switch every module to the slow path. :func:`capture_attention` does not:

* ``sdpa`` route: while the context is open, ``torch.nn.functional.
  scaled_dot_product_attention`` is replaced by a wrapper. timm modules call it as
  ``F.scaled_dot_product_attention`` (an attribute look-up on the module object at
  call time), so they see the wrapper. It computes ``softmax(q kᵀ · scale + mask)``
  explicitly in float32 from exactly the q, k and mask the module passed (so after
  RoPE and with any positional bias), records it for the block in flight, then
  calls the *original* kernel with the untouched arguments: the model's output is
  bit-for-bit what it would be without capturing.
* ``attn_drop`` route: modules in unfused mode (``fused_attn = False``) apply
  ``softmax`` and then ``self.attn_drop``; a forward hook on ``attn_drop`` reads
  its input, which is the probability map.

With ``logits=True`` the recorder also keeps what went *into* the softmax: on the
``sdpa`` route the logits ``q kᵀ · scale + mask`` themselves (positional biases,
RoPE and masks included), computed once and shared with the probabilities. Where
no single logit matrix exists (the ``attn_drop`` route, which sees probabilities
only, and a block whose attention is a composition of passes) it keeps the
log-probabilities instead: they differ from logits by one constant per query,
which softmax ignores. The default (``logits=False``) path does not change.

Forward pre-hooks on ``model.blocks[i]`` tell both routes which block is running;
calls outside any block (e.g. an attention-pooling head) are ignored. Everything
(the SDPA function, all hooks, any ``fused_attn`` flag we changed) is restored in a
``finally``, also when the forward raises.

Layer numbering follows the rest of asg_probe: layer ``i`` (1-based) is block
``model.blocks[i - 1]``; layer 0 is the patch embedding and has no attention.
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError
from .geometry import resolve_layers

__all__ = ["AttentionRecorder", "attention_logits", "attention_probabilities", "capture_attention", "MODES"]

MODES = ("auto", "sdpa", "attn_drop")

# Positional parameters of SDPA after (query, key, value), in order. ``scale`` and
# ``enable_gqa`` are keyword-only in torch, but accepting them positionally costs nothing.
_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def attention_logits(q, k, attn_mask=None, scale=None, is_causal=False, enable_gqa=False):
    """What SDPA feeds its softmax: ``q kᵀ · scale + mask`` in float32.

    Same conventions as :func:`attention_probabilities` (which is the softmax of
    this); pairs a bool mask or ``is_causal`` excludes are ``-inf``.

    Examples
    --------
    >>> q = torch.ones(1, 1, 2, 4); k = torch.ones(1, 1, 3, 4)
    >>> attention_logits(q, k, attn_mask=torch.tensor([0.0, -1.0, 0.5]))[0, 0, 0]
    tensor([2.0000, 1.0000, 2.5000])
    """
    # Autocast would silently push the matmul back to bf16/fp16; the point here is fp32.
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        q, k = q.detach().float(), k.detach().float()
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        logits = (q @ k.transpose(-2, -1)) * scale
        if is_causal:
            L, S = logits.shape[-2:]
            upper = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
            logits = logits.masked_fill(upper, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask.detach().float()
        return logits


def _softmax_rows(logits):
    """Softmax over keys; a fully masked query (all ``-inf``) gets a zero row, not NaN."""
    with torch.autocast(logits.device.type, enabled=False):
        probs = logits.softmax(dim=-1)
        # softmax of an all -inf row is NaN; a NaN would poison every sum downstream.
        dead = torch.isneginf(logits.amax(dim=-1, keepdim=True))
        if bool(dead.any()):
            probs = probs.masked_fill(dead, 0.0)
        return probs


def attention_probabilities(q, k, attn_mask=None, scale=None, is_causal=False, enable_gqa=False):
    """The probabilities SDPA uses: ``softmax(q kᵀ · scale + mask)`` in float32.

    Follows ``F.scaled_dot_product_attention``'s conventions: ``scale`` defaults to
    ``1 / sqrt(d)``; a bool ``attn_mask`` marks the pairs that *take part*; a float
    mask is added to the logits; both broadcast to ``(..., L, S)``; ``is_causal``
    masks the strictly upper triangle (top-left aligned); ``enable_gqa`` repeats key
    heads to match query heads. A query whose keys are all masked gets a zero row
    (SDPA's output for it is not a weighted mean of anything).

    Parameters
    ----------
    q : tensor (..., L, d)
    k : tensor (..., S, d)
    attn_mask : tensor, optional
    scale : float, optional
    is_causal : bool
    enable_gqa : bool

    Returns
    -------
    tensor (..., L, S), float32, rows sum to 1 (or 0 where fully masked).

    Examples
    --------
    >>> q = k = torch.zeros(1, 2, 5, 8)
    >>> attention_probabilities(q, k)[0, 0, 0]
    tensor([0.2000, 0.2000, 0.2000, 0.2000, 0.2000])
    """
    with torch.no_grad():
        return _softmax_rows(attention_logits(q, k, attn_mask, scale, is_causal, enable_gqa))


class AttentionRecorder:
    """What :func:`capture_attention` yields: the attention maps of the last forward pass.

    Attributes
    ----------
    attn : dict
        ``{layer: value}`` with ``layer`` 1-based (block ``layer - 1``). ``value`` is the
        ``(B, H, N_all, N_all)`` float32 probability map (prefix tokens included,
        rows = queries, on the model's device), or ``reduce(map)`` when ``reduce`` was
        given. Cleared at the start of every forward pass (when block 0 starts), so it
        always describes exactly one pass: stream over batches by reading it after
        each call.
    layers : set of int or None
        Layers being recorded (None: all).
    calls : dict
        ``{layer: number of attention computations}`` in the last pass; 2 for the
        decomposed (axial) decay, whose map is the composition of both.
    logits : bool
        Also keep what went into the softmax: ``value`` is then ``(probs, logits)``
        (or ``reduce(probs, logits)``), ``logits`` ``(B, H, N_all, N_all)`` float32.
    """

    def __init__(self, layers=None, reduce=None, logits=False):
        self.layers = layers
        self.reduce = reduce
        self.logits = bool(logits)
        self.attn = {}
        self.calls = {}
        self.current = None       # layer whose block is running, or None between blocks
        self._thread = None       # thread running that block: SDPA is patched process-wide
        self._pending = None      # map of the running block, composed over its SDPA calls
        self._pending_logits = None  # its logits while one logit matrix describes it (logits=True)
        self._last_out = None     # output of the block's previous SDPA call (chain detection)
        self._warned = set()

    # -- called by the hooks -------------------------------------------------------------
    def _new_forward(self):
        self.attn = {}
        self.calls = {}

    def _start_block(self, layer):
        self._pending, self._pending_logits, self._last_out = None, None, None
        self.current = layer if self.wants(layer) else None
        self._thread = threading.get_ident()

    def _end_block(self):
        layer, probs, logits = self.current, self._pending, self._pending_logits
        self.current, self._pending, self._pending_logits, self._last_out = None, None, None, None
        if layer is None or probs is None:
            return
        # reduce runs once the block's map is complete (after composing its passes),
        # so only one full map per block is ever alive.
        if not self.logits:
            self.attn[layer] = self.reduce(probs) if self.reduce is not None else probs
            return
        if logits is None:
            # No single logit matrix (attn_drop route, composed passes): the log-probabilities
            # are logits up to one constant per query, which is all softmax sees.
            logits = probs.log()
        self.attn[layer] = self.reduce(probs, logits) if self.reduce is not None else (probs, logits)

    def active(self):
        """True while a recorded block is running in this thread."""
        return self.current is not None and self._thread == threading.get_ident()

    def wants(self, layer):
        return self.layers is None or layer in self.layers

    def _record(self, probs, chained=True, logits=None):
        layer, prev = self.current, self._pending
        self.calls[layer] = self.calls.get(layer, 0) + 1
        prev_logits, self._pending_logits = self._pending_logits, None
        if prev is None:
            self._pending, self._pending_logits = probs, logits
        elif chained and prev.shape[-2] == probs.shape[-1]:
            # A block that attends twice on the first pass's output (the decomposed decay:
            # out1 = A1 V, then out = A2 out1 with the same q, k) mixes values with
            # out = A2 (A1 V) = (A2 A1) V, so its effective attention is A2 @ A1. Each row
            # of a product of row-stochastic matrices still sums to 1.
            self._pending = probs @ prev
        elif not chained and prev.shape[0] == probs.shape[0] and prev.shape[2:] == probs.shape[2:]:
            # Independent attentions over the same tokens (e.g. timm's differential
            # attention: two SDPA calls on the same v) cannot be composed; they are kept
            # as extra heads, so each is still a distribution per query.
            self._pending = torch.cat([prev, probs], dim=1)
            if prev_logits is not None and logits is not None:
                self._pending_logits = torch.cat([prev_logits, logits], dim=1)
        else:
            self._pending_logits = prev_logits
            if layer not in self._warned:
                self._warned.add(layer)
                warnings.warn(f"capture_attention: block {layer - 1} attends several times with maps "
                              f"{tuple(prev.shape)} and {tuple(probs.shape)} that neither chain nor stack; "
                              "keeping the first", RuntimeWarning, stacklevel=3)


def _same_tensor(a, b):
    """``a`` is ``b`` or a no-copy view of the same values (same storage start and shape)."""
    if a is b:
        return True
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.device == b.device and a.data_ptr() == b.data_ptr())


def _attention_modules(block):
    """Modules of a block that compute attention the timm way (``fused_attn`` / ``attn_drop``).

    Usually ``block.attn``; for timm's parallel blocks the block itself.
    """
    found = []
    for module in block.modules():
        if hasattr(module, "fused_attn") or isinstance(getattr(module, "attn_drop", None), nn.Module):
            found.append(module)
    return found


@contextlib.contextmanager
def capture_attention(model, layers=None, reduce=None, mode="auto", logits=False, blocks=None):
    """Record attention probabilities of ``model``'s blocks during forward passes.

    Nothing about the model changes for the caller: fused modules stay fused, the
    outputs are identical, and every hook, the patched SDPA function and any
    ``fused_attn`` flag switched by ``mode`` are restored on exit, also on error.

    Parameters
    ----------
    model : nn.Module
        A timm-style ViT with ``blocks`` (``VisionTransformer``, ``Eva``, asg_probe's
        ``SpatialViT``).
    layers : int or iterable of int, optional
        1-based layers (block ``i`` is layer ``i + 1``) to record; negative numbers
        count from the end. Default: all. Unrecorded blocks cost nothing extra.
    reduce : callable, optional
        ``reduce(map) -> anything`` applied to each block's ``(B, H, N, N)`` map as soon
        as the block finishes; ``recorder.attn`` then holds the reduced values. Without
        it, one forward keeps ``depth × B × H × N²`` float32 values alive.
    mode : {"auto", "sdpa", "attn_drop"}
        ``auto`` intercepts SDPA for fused modules and hooks ``attn_drop`` of unfused
        ones, leaving the modules as they are. ``sdpa`` switches every module with a
        ``fused_attn`` flag to fused for the duration and intercepts SDPA only;
        ``attn_drop`` switches them to unfused and only hooks ``attn_drop``.
    logits : bool
        Also record the pre-softmax scores: each block's value becomes
        ``(probs, logits)``, and ``reduce`` is called as ``reduce(probs, logits)``.
        On the ``sdpa`` route the logits are exactly what the module's softmax
        received (``q kᵀ · scale`` plus any bias or mask it passed); where attention
        is only seen as probabilities (``attn_drop`` route) or is a composition of
        passes, ``log(probs)``, which differs by one constant per query.
    blocks : list of nn.Module, optional
        The modules that stand for layers ``1..len(blocks)``, in forward order, instead of
        ``model.blocks``: for backbones whose attention is nested in stages (Swin, NesT),
        where asg_probe passes each block's attention module.

    Yields
    ------
    AttentionRecorder
        ``recorder.attn``: ``{layer: map or reduce(map)}`` of the last forward pass.

    Notes
    -----
    A block that calls attention twice, the second time on the first call's output
    (the decomposed RMT/SDT decay: row pass, then column pass with the same q, k),
    is recorded as the composition ``A2 @ A1``, since ``out = A2 (A1 V)``. On the
    SDPA route this is checked (the second call's ``v`` must be the first call's
    output); independent calls over the same tokens (timm's differential attention)
    are stacked as extra heads instead. On the ``attn_drop`` route repeated calls are
    always composed. Probabilities are taken before dropout, and for talking-heads
    attention (CaiT) before the post-softmax mixing of heads. SDPA is patched for the
    whole process while the context is open, but only calls from the thread running
    a recorded block are read. ``torch.compile``-d models bypass the patch.

    Examples
    --------
    >>> import timm, torch
    >>> m = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    >>> with torch.no_grad(), capture_attention(m) as rec:
    ...     _ = m(torch.randn(1, 3, 32, 32))
    >>> sorted(rec.attn), tuple(rec.attn[1].shape)
    ([1, 2], (1, 3, 5, 5))
    """
    # Validate everything before attaching anything: a bad argument leaves no trace.
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if reduce is not None and not callable(reduce):
        raise TypeError(f"reduce must be callable, got {type(reduce).__name__}")
    if blocks is not None:
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise UsageError("blocks must be a non-empty list of modules, one per layer in forward order")
    else:
        blocks = getattr(model, "blocks", None)
        if blocks is None or not isinstance(blocks, nn.Module) or len(blocks) == 0:
            raise UsageError(f"{type(model).__name__} has no `blocks`: capture_attention needs a timm-style ViT")
        blocks = list(blocks)
    # layer 0 (the patch embedding) has no attention: blocks are layers 1..depth
    wanted = None if layers is None else set(resolve_layers(layers, len(blocks), first=1))
    recorder = AttentionRecorder(wanted, reduce, logits=logits)
    original_sdpa = F.scaled_dot_product_attention
    state = {"open": True}
    handles, flags = [], []

    def sdpa(query, key, value, *args, **kwargs):
        if not (state["open"] and recorder.active()):
            return original_sdpa(query, key, value, *args, **kwargs)
        named = dict(zip(_SDPA_ARGS, args))
        named.update(kwargs)
        chained = recorder._last_out is not None and _same_tensor(value, recorder._last_out)
        mask, scale = named.get("attn_mask"), named.get("scale")
        causal, gqa = bool(named.get("is_causal", False)), bool(named.get("enable_gqa", False))
        if recorder.logits:
            # one logit matrix, shared by the probabilities and the reducer
            scores = attention_logits(query, key, mask, scale, causal, gqa)
            recorder._record(_softmax_rows(scores), chained=chained, logits=scores)
        else:
            recorder._record(attention_probabilities(query, key, mask, scale, causal, gqa), chained=chained)
        # The original kernel gets exactly the caller's arguments: outputs are unchanged.
        out = original_sdpa(query, key, value, *args, **kwargs)
        recorder._last_out = out
        return out

    sdpa.__wrapped__ = original_sdpa
    sdpa.__doc__ = original_sdpa.__doc__

    def drop_hook(module, args, output, owner):
        # Fused modules never call attn_drop on probabilities; the guard keeps a module
        # that somehow does from being recorded twice.
        if recorder.active() and not (mode == "auto" and getattr(owner, "fused_attn", False)):
            recorder._record(args[0].detach().float())

    try:
        handles.append(blocks[0].register_forward_pre_hook(lambda m, a: recorder._new_forward()))
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(lambda m, a, layer=i + 1: recorder._start_block(layer)))
            handles.append(block.register_forward_hook(lambda m, a, o: recorder._end_block()))
            for module in _attention_modules(block):
                if hasattr(module, "fused_attn") and mode != "auto":
                    flags.append((module, module.fused_attn))
                    module.fused_attn = mode == "sdpa"
                drop = getattr(module, "attn_drop", None)
                mix = getattr(module, "proj_w", None)
                if isinstance(mix, nn.Module) and mode != "sdpa":
                    # Talking-heads attention (CaiT) mixes the heads' softmax maps with a linear
                    # layer before attn_drop, and what reaches attn_drop is no longer a
                    # distribution: read the softmax maps where they enter the mixing, (B, N, N, H).
                    handles.append(mix.register_forward_pre_hook(
                        lambda m, a: recorder._record(a[0].detach().float().permute(0, 3, 1, 2))
                        if recorder.active() else None))
                elif isinstance(drop, nn.Module) and mode != "sdpa":
                    handles.append(drop.register_forward_hook(
                        lambda m, a, o, owner=module: drop_hook(m, a, o, owner)))
        if mode != "attn_drop":
            F.scaled_dot_product_attention = sdpa
        yield recorder
    finally:
        # Unconditional restore; and if someone patched on top of us and later restores our
        # wrapper, `open = False` turns it into a plain pass-through.
        state["open"] = False
        F.scaled_dot_product_attention = original_sdpa
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.fused_attn = flag
        recorder.current, recorder._pending, recorder._pending_logits, recorder._last_out = None, None, None, None
