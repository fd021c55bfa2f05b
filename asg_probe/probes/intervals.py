"""Intervals for cross-validated R² that cover: the delete-one-fold jackknife with refits.

Why not the spread over folds. ``mean ± t·sd/√k`` over the ``k`` per-fold R² sees how the
held-out *test* images vary, but not how the *training* images do: the ``k`` fold models
share ``(k - 2)/(k - 1)`` of their training images, so their errors move together and the
spread across folds cannot show it. On held-out scenes that interval covered the expected
value at its sample size 86% of the time, not 95% (its standard error was 1.7x too small
for the last layer's column).

What we do instead. Fold ``g`` is an image-level cluster of the data (every ``k``-th image),
so deleting it deletes whole images from training *and* testing. The replicate
``R²_(g)`` is the cross-validated R² recomputed without fold ``g``: each other fold ``j``
is scored by a model refit on the images outside ``{j, g}``, at the alpha the full solve
chose (alpha selection is not re-run: a second-order effect). The jackknife variance
``(k - 1)/k · Σ_g (R²_(g) - mean)²`` then carries both sources of variance, and the
interval is ``R² ± t(0.975, k - 1) · se`` (Quenouille-Tukey jackknife; for cross-validation
as a function of image clusters see Bates, Hastie & Tibshirani 2023, "Cross-validation: what
does it estimate and how well does it do it?"). A replicate needs only the statistics already
streamed per fold: ``k (k - 1) / 2`` refits, each a Cholesky solve per distinct alpha, whatever
the number of images. Coverage is measured by simulation in ``tests/test_probe_intervals.py``
and ``benchmarks/bench_interval_coverage.py`` (BENCHMARKS.md).

What it covers: the expected held-out R² *at this number of images*. R² rises with the number
of training images (a probe fit on more images is better), so intervals at different image
counts are not intervals for one quantity; every report prints the image count beside them.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from ._lapack import _single_threaded_blas

__all__ = ["jackknife_cv_r2", "jackknife_interval", "weights_at"]


def weights_at(Cs: torch.Tensor, Bs: torch.Tensor, alphas) -> np.ndarray:
    """``(Cs + alpha_t I)^{-1} Bs[:, t]`` for each column ``t``: weights ``(T, D)`` (float64 numpy).

    ``Cs`` standardised, PSD; ``alpha > 0``. A Cholesky factorisation per distinct alpha (a
    third of a tridiagonalisation each), or one tridiagonalisation
    (:class:`~asg_probe.probes._lapack.Tridiagonal`) when more than three alphas differ.

    Examples
    --------
    >>> C, B = torch.eye(2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)
    >>> weights_at(C, B, [1.0, 3.0]).round(12).tolist()
    [[0.5, 0.5], [0.25, 0.25]]
    """
    from scipy.linalg import cho_factor, cho_solve

    from ._lapack import Tridiagonal

    C, B = np.asarray(Cs, dtype=np.float64), np.asarray(Bs, dtype=np.float64)
    alphas = np.asarray(alphas, dtype=np.float64).reshape(-1)
    distinct = np.unique(alphas)
    # OpenBLAS's own threads would fight torch's for the cores (see asg_probe.probes._lapack)
    with _single_threaded_blas():
        if distinct.size > 3:
            return Tridiagonal(np.array(C, order="F")).solve(B, alphas).T
        W = np.zeros((B.shape[1], C.shape[0]))
        for a in distinct:
            cols = np.flatnonzero(alphas == a)
            factor = cho_factor(C + a * np.eye(C.shape[0]), lower=True, check_finite=False)
            W[cols] = cho_solve(factor, B[:, cols], check_finite=False).T
    return W


def block_sums(stats, columns) -> list:
    """Per-fold raw sums ``[n, sx, sy, G, H, sy2]`` as float64 numpy (leading axis: fold), target
    columns restricted to ``columns``."""
    cols = list(columns)
    return [stats.n.cpu().numpy(), stats.sum_x.cpu().numpy(), stats.sum_y.cpu().numpy()[:, cols],
            stats.xtx.cpu().numpy(), stats.xty.cpu().numpy()[:, :, cols], stats.sum_y2.cpu().numpy()[:, cols]]


def ridge_fit(sums, alphas):
    """Ridge on standardised features from raw sums ``(n, sx, sy, G, H[, sy2])``, one alpha per column.

    The same problem as :func:`~asg_probe.probes.solve_ridge_cv`'s (features standardised on these
    sums, features whose variance is lost in rounding left out, intercept unpenalised), returned in
    raw units: ``(v (T, D), b (T,))``, prediction ``x @ v.T + b``.
    """
    n, sx, sy, G, H = sums[:5]
    mx, my = sx / n, sy / n
    C = G - n * np.outer(mx, mx)
    var = np.clip(np.diagonal(C), 0, None) / n
    constant = var <= 1e-12 * np.maximum(np.diagonal(G) / n, np.finfo(np.float64).tiny)
    scale = np.where(constant, 1.0, np.sqrt(var))
    Cs = C / np.outer(scale, scale)
    Cs = 0.5 * (Cs + Cs.T)
    B = (H - n * np.outer(mx, my)) / scale[:, None]
    Cs[constant] = 0
    Cs[:, constant] = 0
    B[constant] = 0
    v = weights_at(Cs, B, alphas) / scale[None]
    return v, my - v @ mx


def squared_error(v, b, sums) -> np.ndarray:
    """``Σ (y - x @ v.T - b)²`` per column over the tokens whose raw sums are ``(n, sx, sy, G, H, sy2)``."""
    n, sx, sy, G, H, sy2 = sums
    fitted2 = n * b * b + 2 * b * (v @ sx) + np.einsum("td,de,te->t", v, G, v, optimize=True)   # Σ ŷ²
    cross = b * sy + np.einsum("td,dt->t", v, H)                                                # Σ y ŷ
    return sy2 - 2 * cross + fitted2


def held_out_r2(v, b, sums) -> np.ndarray:
    """R² per column on those tokens, SST around their own mean (``r2_score``); NaN where ``y`` is constant."""
    n, sy, sy2 = sums[0], sums[2], sums[5]
    sst = sy2 - sy * sy / n
    degenerate = sst <= 1e-12 * np.maximum(sy2, np.finfo(np.float64).tiny)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1 - squared_error(v, b, sums) / sst
    return np.where(degenerate, np.nan, r2)


def jackknife_cv_r2(stats, alphas, columns) -> np.ndarray:
    """Delete-one-fold replicates of the cross-validated R²: ``(F, len(columns))``.

    Row ``g`` is the mean over folds ``j != g`` of fold ``j``'s held-out R², its model refit on
    the folds outside ``{j, g}`` at ``alphas`` (one per column, e.g. the solve's ``alpha_``).
    NaN where a fold's target is constant, or with fewer than 3 folds (nothing left to train).

    Parameters
    ----------
    stats : RidgeStats
    alphas : (len(columns),) penalties
    columns : sequence of int
        Target columns of ``stats``.
    """
    F = stats.n_folds
    T = len(columns)
    if F < 3:
        return np.full((F, T), np.nan)
    folds = block_sums(stats, columns)
    tot = [t.sum(0) for t in folds]
    scores = np.full((F, F, T), np.nan)       # scores[g, j]: fold j's R² without fold g
    with _single_threaded_blas():
        for j, g in itertools.combinations(range(F), 2):
            v, b = ridge_fit([t - f[j] - f[g] for t, f in zip(tot, folds)], alphas)
            for held, other in ((j, g), (g, j)):   # one refit, scored on both folds it left out
                scores[other, held] = held_out_r2(v, b, [f[held] for f in folds])
    valid = ~np.isnan(scores)
    counts = valid.sum(1)
    out = np.where(valid, scores, 0).sum(1) / np.maximum(counts, 1)
    out[counts == 0] = np.nan
    return out


def jackknife_interval(estimate, replicates, level: float = 0.95) -> list:
    """``[lo, hi]`` = ``estimate ± t(1 - (1 - level)/2, k - 1) · se``, ``se² = (k-1)/k · Σ (r_g - mean r)²``.

    ``replicates`` (k,) are delete-one-cluster values (:func:`jackknife_cv_r2`); NaN replicates
    are left out, and fewer than two valid ones (or a NaN estimate) give ``[nan, nan]``.

    Examples
    --------
    >>> lo, hi = jackknife_interval(0.5, [0.4, 0.5, 0.6])
    >>> round(hi - 0.5, 4)                   # se = sqrt(2/3 * 0.02) = 0.1155; t(0.975, 2) = 4.303
    0.4968
    """
    from scipy.stats import t as student_t

    r = np.asarray(replicates, dtype=np.float64).reshape(-1)
    r = r[~np.isnan(r)]
    if r.size < 2 or not np.isfinite(estimate):
        return [float("nan"), float("nan")]
    k = r.size
    se = float(np.sqrt((k - 1) / k * np.sum((r - r.mean()) ** 2)))
    half = float(student_t.ppf(0.5 + 0.5 * float(level), k - 1)) * se
    return [float(estimate) - half, float(estimate) + half]
