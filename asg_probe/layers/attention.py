"""Attention with a 2D positional bias, built on timm's ``EvaAttention``.

timm's Eva attention already handles RoPE and passes an additive ``attn_mask``
to ``scaled_dot_product_attention`` (fused) or adds it to the logits (unfused).
We extend it rather than fork it: the positional module computes a bias for the
current grid and it rides in through ``attn_mask``. Only the decomposed (axial)
decay needs its own forward, because it applies attention twice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.eva import EvaAttention


class GridContext:
    """The patch grid of the forward pass in flight, shared by a model's attention layers.

    The model sets it once per forward (in ``_pos_embed``, where the grid is known)
    so that every layer can build its bias without changing timm's block signature.
    """

    def __init__(self):
        self.grid = None


class PositionalAttention(EvaAttention):
    """``EvaAttention`` plus a spatial bias module (``spatial``) and an optional axial form.

    Parameters
    ----------
    spatial : nn.Module
        Has ``bias(x, grid, num_prefix_tokens)``; decay modules also ``axial_biases``.
    context : GridContext
        Holds the grid of the current forward pass.
    decomposed : bool
        Use the axial two-pass form (row softmax, then column softmax on its output).
    **kwargs
        Passed to ``EvaAttention``.
    """

    def __init__(self, *, spatial, context: GridContext, decomposed: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.spatial = spatial
        self.context = context
        self.decomposed = bool(decomposed)

    @classmethod
    def convert(cls, attn: EvaAttention, *, spatial, context: GridContext, decomposed: bool = False):
        """Turn an existing ``EvaAttention`` into a ``PositionalAttention`` in place.

        Weights, initialisation and state-dict keys of the timm module are kept;
        only the spatial module's parameters (if any) are added under ``spatial.``.
        """
        if not isinstance(attn, EvaAttention):
            raise TypeError(f"expected timm EvaAttention, got {type(attn).__name__}")
        attn.__class__ = cls
        attn.spatial = spatial
        attn.context = context
        attn.decomposed = bool(decomposed)
        return attn

    def _grid(self, x):
        grid = self.context.grid
        if grid is None or grid[0] * grid[1] + self.num_prefix_tokens != x.shape[1]:
            raise RuntimeError(
                "PositionalAttention needs the patch grid of this forward pass; call the model "
                "(forward/forward_features/forward_intermediates), not the attention layer alone.")
        return grid

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        grid = self._grid(x)
        if self.decomposed:
            return self._axial_forward(x, grid)
        bias = self.spatial.bias(x, grid, self.num_prefix_tokens).to(x.dtype)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=x.dtype).masked_fill(~attn_mask, float("-inf"))
            bias = bias + attn_mask
        return super().forward(x, rope=rope, attn_mask=bias, is_causal=is_causal)

    def _qkv(self, x):
        B, N, _ = x.shape
        if self.qkv is not None:
            bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = F.linear(x, self.qkv.weight, bias)
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        return self.q_norm(q), self.k_norm(k), v  # (B, H, N, d) each

    def _attend(self, q, k, v, bias):
        if self.fused_attn:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias
        return self.attn_drop(attn.softmax(dim=-1)) @ v

    def _axial_forward(self, x, grid):
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._qkv(x)
        row_bias, col_bias = self.spatial.axial_biases(x, grid, self.num_prefix_tokens)
        # Same q, k in both passes (SPEC §2): along the row first, then along the column
        # over the row pass's output, so the effective attention is A_col @ A_row.
        out = self._attend(q, k, v, row_bias.to(q.dtype))
        out = self._attend(q, k, out, col_bias.to(q.dtype))
        out = out.transpose(1, 2).reshape(B, N, C)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))
