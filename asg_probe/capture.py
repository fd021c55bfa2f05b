"""Attention probabilities from any timm ViT, while it runs with fused attention.

Fused kernels (``F.scaled_dot_product_attention``) never materialise the
attention matrix, which is why hook-based tools lose attention maps. While
:func:`capture_attention` is active, the SDPA function that timm modules call is
wrapped: it computes ``softmax(q kᵀ · scale + mask)`` explicitly from the q, k and
mask it receives (after RoPE, with any positional bias), records it for the block
in flight, then calls the original kernel, so the model's output is unchanged.
Modules in unfused mode are read through a hook on their ``attn_drop`` (timm
applies it to the probabilities). Everything is restored in ``finally``.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


class AttentionRecorder:
    """Holds ``attn``: ``{layer: tensor}`` for the last forward pass (layer = block index + 1).

    With ``reduce``, each map ``(B, H, N, N)`` is replaced by ``reduce(map)`` as soon as
    the block's attention is complete, so large models never hold every full map.
    """

    def __init__(self, layers, reduce=None):
        self.layers = layers
        self.reduce = reduce
        self.attn = {}
        self._pending = {}
        self.current = None

    def _start_block(self, layer):
        self._flush()
        self.current = layer

    def _record(self, probs):
        layer = self.current
        if layer is None or (self.layers is not None and layer not in self.layers):
            return
        prev = self._pending.get(layer)
        # A block that attends twice (the decomposed decay: row pass, then column pass on
        # its output with the same q, k) has effective attention A2 @ A1, since out = A2 (A1 V).
        self._pending[layer] = probs if prev is None else probs @ prev

    def _flush(self):
        for layer, probs in self._pending.items():
            self.attn[layer] = self.reduce(probs) if self.reduce is not None else probs
        self._pending = {}

    def _end(self):
        self._flush()
        self.current = None

    def _new_forward(self):
        self.attn = {}
        self._pending = {}


def attention_probabilities(q, k, attn_mask=None, scale=None, is_causal=False, enable_gqa=False):
    """``softmax(q kᵀ · scale + mask)`` in float32, with SDPA's mask conventions."""
    q, k = q.float(), k.float()
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        L, S = logits.shape[-2:]
        logits = logits.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    return logits.softmax(dim=-1)


def _blocks(model):
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks`: capture_attention needs a timm-style ViT")
    return list(blocks)


@contextlib.contextmanager
def capture_attention(model, layers=None, reduce=None, mode="auto"):
    """Record attention probabilities of ``model``'s blocks during forward passes.

    Parameters
    ----------
    model : nn.Module
        A timm-style ViT with ``blocks`` (VisionTransformer, Eva, asg_probe's SpatialViT).
    layers : iterable of int, optional
        1-based block numbers to record (default: all).
    reduce : callable, optional
        Applied to each ``(B, H, N, N)`` map right away (e.g. an attention-distance sum).
    mode : {"auto", "sdpa", "attn_drop"}
        ``auto`` intercepts fused attention and hooks unfused modules.

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="rmt-decay", depth=2).eval()
    >>> with capture_attention(m) as rec:
    ...     _ = m(torch.randn(1, 3, 32, 32))
    >>> sorted(rec.attn), tuple(rec.attn[1].shape)
    ([1, 2], (1, 4, 65, 65))
    """
    if mode not in ("auto", "sdpa", "attn_drop"):
        raise ValueError(f"mode must be 'auto', 'sdpa' or 'attn_drop', got {mode!r}")
    blocks = _blocks(model)
    recorder = AttentionRecorder(None if layers is None else set(int(x) for x in layers), reduce)
    original_sdpa = F.scaled_dot_product_attention
    handles, flags = [], []

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        recorder._record(attention_probabilities(q, k, attn_mask, scale, is_causal,
                                                 kwargs.get("enable_gqa", False)).detach())
        return original_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, **kwargs)

    try:
        # Blocks mark the layer in flight; block 1 starts a new pass, the last block closes it
        # (so an attention-pooling head after the blocks is never recorded as a layer).
        handles.append(blocks[0].register_forward_pre_hook(lambda m, a: recorder._new_forward()))
        handles.append(blocks[-1].register_forward_hook(lambda m, a, o: recorder._end()))
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(lambda m, a, layer=i + 1: recorder._start_block(layer)))
            attn = getattr(block, "attn", None)
            if attn is None:
                continue
            if hasattr(attn, "fused_attn"):
                flags.append((attn, attn.fused_attn))
                if mode == "sdpa":
                    attn.fused_attn = True
                elif mode == "attn_drop":
                    attn.fused_attn = False
            drop = getattr(attn, "attn_drop", None)
            if drop is not None and mode != "sdpa":
                handles.append(drop.register_forward_hook(
                    lambda m, a, o, attn=attn: None if attn.fused_attn else recorder._record(a[0].detach().float())))
        if mode != "attn_drop":
            F.scaled_dot_product_attention = sdpa
        yield recorder
    finally:
        F.scaled_dot_product_attention = original_sdpa
        for h in handles:
            h.remove()
        for attn, flag in flags:
            attn.fused_attn = flag
