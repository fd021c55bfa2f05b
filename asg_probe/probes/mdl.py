"""How *easily* position is read: minimum description length by the online code (Voita & Titov 2020).

R² says how well a probe decodes; it cannot say how much data, or capacity, the decoding
took. Voita & Titov ("Information-Theoretic Probing with Minimum Description Length", 2020)
measure that as a code length: send the targets block by block, each block with a probe
trained on the blocks before it. A representation from which position is read easily
compresses the targets after a few images; one that needs many images (or none helps)
compresses little. ``compression = uniform code length / online code length``: 1 when the
probe never beats sending each target uniformly, large when a few images suffice.

Our version, from the streamed ridge statistics alone (no tokens kept):

* **Targets.** A coordinate takes ``K`` values (``K`` = grid rows for ``row``, columns for
  ``col``), ``Δ = 1 / (K - 1)`` apart: the uniform code costs ``log2 K`` bits a token.
* **Blocks.** Whole images, in a fixed order: fold 0's images of rank 0, 1, 2-3, 4-7, ...
  (:attr:`RidgeStats.head`, ``rank = image_index // n_folds``), the rest of fold 0, then
  folds 1, 2, ..., each block's statistics a difference or prefix sum of what was streamed.
  The first block is sent uniformly (Voita & Titov's first block is 0.1% of the data; ours is
  one image).
* **Each later block** is sent with the ridge probe fit on every block before it, at the
  alpha the cross-validated solve chose for that column, as a Gaussian around the prediction
  with the training residual variance ``σ²``; a target's probability is its cell's density
  times ``Δ``, so a token costs ``log2(σ √(2π) / Δ) + r² / (2 σ² ln 2)`` bits, ``r`` its
  residual (summed from the block's statistics: ``Σ r²`` is its held-out SSE). ``σ`` is kept
  at or above ``Δ / √(2π)`` so that no cell gets probability above 1.
* **Whichever is shorter**: each block goes with that code or the uniform one, plus one bit
  saying which, so a useless probe costs one bit a block more than the uniform code
  (compression just under 1), never more.

Examples
--------
>>> import torch
>>> from asg_probe.probes import RidgeStats, coordinate_targets
>>> g = torch.Generator().manual_seed(0)
>>> Y = coordinate_targets((4, 4))
>>> X = Y @ torch.randn(2, 8, generator=g) + 0.01 * torch.randn(40, 16, 8, generator=g)
>>> stats = RidgeStats(n_folds=5, online_blocks=4); stats.update(X, Y, torch.arange(40))
>>> code = online_code(stats, alphas=[1e-3, 1e-3], columns=[0, 1], levels=[4, 4])
>>> bool(code["compression"].min() > 10)
True
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["online_code", "online_blocks"]


def online_blocks(stats, columns=None) -> list:
    """The online code's blocks in sending order: ``[[n, sx, sy, G, H, sy2]]`` of float64 numpy sums.

    Fold 0's head blocks (:attr:`RidgeStats.head`), the rest of fold 0, then folds 1.. ``n_folds - 1``;
    target columns restricted to ``columns`` (default: all). Empty blocks are left out.
    """
    from .intervals import block_sums

    if stats.head is None:
        raise ValueError("these statistics keep no online-code blocks: build RidgeStats(online_blocks=k), "
                         "or CoordinateProbe(online_code=True)")
    columns = range(stats.n_targets) if columns is None else columns
    folds, head = block_sums(stats, columns), block_sums(stats.head, columns)
    blocks = [[t[b] for t in head] for b in range(stats.head.n_folds)]
    blocks.append([f[0] - h.sum(0) for f, h in zip(folds, head)])       # the rest of fold 0
    blocks += [[t[k] for t in folds] for k in range(1, stats.n_folds)]
    return [b for b in blocks if float(b[0]) > 0.5]


def online_code(stats, alphas, columns, levels) -> dict:
    """Online (prequential) code length of target ``columns``, in bits, and the compression it gives.

    Parameters
    ----------
    stats : RidgeStats
        With online-code blocks (``online_blocks >= 2``).
    alphas : (C,) ridge penalties, one per column (e.g. the cross-validated ``alpha_``).
    columns : (C,) target columns of ``stats``.
    levels : (C,) number of values ``K`` each column's target takes, ``Δ = 1/(K-1)`` apart
        (targets in ``[0, 1]``, e.g. grid rows for the normalised row).

    Returns
    -------
    dict
        ``uniform_bits``, ``online_bits``, ``compression`` (C,) arrays (NaN where ``K < 2``) and
        ``n_blocks``.
    """
    from ._lapack import _single_threaded_blas
    from .intervals import ridge_fit, squared_error

    alphas = np.asarray(alphas, dtype=np.float64).reshape(-1)
    K = np.asarray(levels, dtype=np.float64).reshape(-1)
    blocks = online_blocks(stats, columns)
    delta = np.where(K > 1, 1.0 / np.maximum(K - 1, 1), np.nan)
    bits_uniform = np.log2(np.maximum(K, 1))                             # per token
    total_tokens = sum(float(b[0]) for b in blocks)
    online = float(blocks[0][0]) * bits_uniform
    prefix = [t.copy() for t in blocks[0]]
    for block in blocks[1:]:
        m = float(block[0])
        with _single_threaded_blas():
            v, b = ridge_fit(prefix, alphas)
            var = np.maximum(squared_error(v, b, prefix) / float(prefix[0]), delta ** 2 / (2 * math.pi))
            sse = squared_error(v, b, block)
        with np.errstate(invalid="ignore"):
            gauss = m * 0.5 * np.log2(2 * math.pi * var / delta ** 2) + sse / (2 * var * math.log(2))
        online = online + np.minimum(gauss, m * bits_uniform) + 1.0        # + one bit: which code
        prefix = [p + q for p, q in zip(prefix, block)]
    uniform = total_tokens * bits_uniform
    with np.errstate(invalid="ignore", divide="ignore"):
        compression = np.where(K > 1, uniform / online, np.nan)
    return {"uniform_bits": uniform, "online_bits": np.where(K > 1, online, np.nan),
            "compression": compression, "n_blocks": len(blocks)}
