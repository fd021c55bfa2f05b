"""Attention-logit biases that encode 2D position: ALiBi-2D, relative table, RMT and SDT decay.

Every module here answers one question, ``bias(x, grid, num_prefix_tokens)``:
the additive term for the attention logits, shape ``(1 or B, heads, N_all, N_all)``,
where ``N_all`` counts prefix tokens (which get bias 0). The attention layer
(:mod:`asg_probe.layers.attention`) adds it before the softmax, fused or not.
Definitions follow ``SPEC.md`` §2–3.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grid import axis_offsets, euclidean_distances, manhattan_distances, pad_prefix


def alibi2d_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes ``m_h = 2^(-8 (h+1) / n)`` for heads ``h = 0..n-1`` (SPEC §3).

    The same geometric rule is used for every head count (no special case for
    non-powers of two), so the slopes always span ``2^(-8/n)`` to ``2^-8``.

    Examples
    --------
    >>> alibi2d_slopes(4).tolist()
    [0.25, 0.0625, 0.015625, 0.00390625]
    """
    h = torch.arange(1, num_heads + 1, dtype=torch.float64)
    return torch.pow(2.0, -8.0 * h / num_heads).float()


def rmt_log_gamma(num_heads: int, r: float = 4.0) -> torch.Tensor:
    """RMT per-head log decay ``log γ_h = log(1 - 2^(-2 - r h / n))`` (SPEC §2).

    Examples
    --------
    >>> rmt_log_gamma(4).exp().tolist()
    [0.75, 0.875, 0.9375, 0.96875]
    """
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, -2.0 - r * h / num_heads)).float()


class ALiBi2D(nn.Module):
    """Fixed ``-m_h · euclidean(i, j)`` bias in patch units; nothing learned."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.register_buffer("slopes", alibi2d_slopes(num_heads), persistent=False)

    def bias(self, x, grid, num_prefix_tokens):
        dist = euclidean_distances(grid, device=x.device)
        b = -self.slopes.to(x.device)[:, None, None] * dist  # (H, N, N)
        return pad_prefix(b, num_prefix_tokens)[None]


class RelPosBias(nn.Module):
    """Learned per-head bias indexed by the 2D offset ``(Δrow, Δcol)`` (Swin/BEiT style).

    The table covers offsets up to ``ref_grid - 1``; on larger grids, offsets are
    clipped to that range (Shaw et al.), so any input size works without retraining.
    """

    def __init__(self, num_heads: int, ref_grid):
        super().__init__()
        self.num_heads = num_heads
        self.ref_grid = (int(ref_grid[0]), int(ref_grid[1]))
        rows, cols = 2 * self.ref_grid[0] - 1, 2 * self.ref_grid[1] - 1
        self.rel_pos_table = nn.Parameter(torch.zeros(num_heads, rows, cols))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.trunc_normal_(self.rel_pos_table, std=0.02)

    def bias(self, x, grid, num_prefix_tokens):
        gh, gw = int(grid[0]), int(grid[1])
        rh, rw = self.ref_grid
        rows = torch.arange(gh, device=x.device)
        cols = torch.arange(gw, device=x.device)
        d_row = (rows[:, None] - rows[None, :]).clamp(-(rh - 1), rh - 1) + rh - 1  # (gh, gh)
        d_col = (cols[:, None] - cols[None, :]).clamp(-(rw - 1), rw - 1) + rw - 1  # (gw, gw)
        # (i, j) pairs in row-major order: row offsets vary with i//gw, col offsets with i%gw
        idx_r = d_row[:, None, :, None].expand(gh, gw, gh, gw).reshape(gh * gw, gh * gw)
        idx_c = d_col[None, :, None, :].expand(gh, gw, gh, gw).reshape(gh * gw, gh * gw)
        b = self.rel_pos_table[:, idx_r, idx_c]  # (H, N, N)
        return pad_prefix(b, num_prefix_tokens)[None]


class ManhattanDecay(nn.Module):
    """RMT's fixed spatial decay: ``B_h[i, j] = log γ_h · (|Δrow| + |Δcol|)``; γ is not learned."""

    def __init__(self, num_heads: int, r: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.r = float(r)
        self.register_buffer("log_gamma", rmt_log_gamma(num_heads, r), persistent=False)

    def bias(self, x, grid, num_prefix_tokens):
        dist = manhattan_distances(grid, device=x.device)
        b = self.log_gamma.to(x.device)[:, None, None] * dist
        return pad_prefix(b, num_prefix_tokens)[None]

    def axial_biases(self, x, grid, num_prefix_tokens):
        """Row-pass and column-pass biases of the decomposed form, ``-inf`` off the line.

        Row pass: a patch attends to patches of its own row with ``log γ · |Δcol|``;
        column pass: to its own column with ``log γ · |Δrow|``. Prefix tokens take part
        in both passes with bias 0 so that the cls/register tokens still see everything.
        """
        d_row, d_col = axis_offsets(grid, device=x.device)
        lg = self.log_gamma.to(x.device)[:, None, None]
        inf = torch.tensor(float("-inf"), device=x.device)
        row_pass = torch.where(d_row == 0, lg * d_col, inf)
        col_pass = torch.where(d_col == 0, lg * d_row, inf)
        return pad_prefix(row_pass, num_prefix_tokens)[None], pad_prefix(col_pass, num_prefix_tokens)[None]


class ContextAwareDecay(ManhattanDecay):
    """SDT's data-dependent decay (Context-Aware Gating) fused with the Manhattan prior.

    ``G = logsigmoid(x W_g + b)`` gives one scalar per token and head (computed in
    fp32), and ``M[i, j] = -| α_h · ½ (G_i + G_j) · d_M(i, j) |`` is added to the
    logits. Initialised at RMT (``W_g = 0``, ``b_h = log(γ_h / (1 - γ_h))``, ``α = 1``)
    so that ``logsigmoid(b_h) = log γ_h`` and the bias starts equal to
    :class:`ManhattanDecay`. Which tensor ``x`` is (the block's normed input) and
    the per-head learned α are our reading of the paper (SPEC §2).
    """

    def __init__(self, dim: int, num_heads: int, r: float = 4.0):
        super().__init__(num_heads, r)
        self.gate = nn.Linear(dim, num_heads, bias=True)
        self.alpha = nn.Parameter(torch.ones(num_heads))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.gate.weight)
        gamma = self.log_gamma.exp()
        with torch.no_grad():
            self.gate.bias.copy_(torch.log(gamma / (1 - gamma)))
            self.alpha.fill_(1.0)

    def gates(self, x, num_prefix_tokens):
        """Per-token log-gates ``G`` of the patch tokens, ``(B, H, N)`` in fp32."""
        patches = x[:, num_prefix_tokens:].float()
        g = F.logsigmoid(F.linear(patches, self.gate.weight.float(), self.gate.bias.float()))
        return g.transpose(1, 2)

    def _fuse(self, g, dist):
        pair = 0.5 * (g[:, :, :, None] + g[:, :, None, :])  # (B, H, N, N)
        return -(self.alpha.float()[None, :, None, None] * pair * dist).abs()

    def bias(self, x, grid, num_prefix_tokens):
        g = self.gates(x, num_prefix_tokens)
        b = self._fuse(g, manhattan_distances(grid, device=x.device))
        return pad_prefix(b, num_prefix_tokens).to(x.dtype)

    def axial_biases(self, x, grid, num_prefix_tokens):
        g = self.gates(x, num_prefix_tokens)
        d_row, d_col = axis_offsets(grid, device=x.device)
        inf = torch.tensor(float("-inf"), device=x.device)
        row_pass = torch.where(d_row == 0, self._fuse(g, d_col), inf)
        col_pass = torch.where(d_col == 0, self._fuse(g, d_row), inf)
        return (pad_prefix(row_pass, num_prefix_tokens).to(x.dtype),
                pad_prefix(col_pass, num_prefix_tokens).to(x.dtype))

