"""Cross-validated ridge regression from streamed statistics: :func:`solve_ridge_cv`.

Given a :class:`~asg_probe.probes.stats.RidgeStats`, every fold and every alpha
is fitted from the sums alone (no tokens), as scikit-learn's
``StandardScaler`` + ``Ridge(alpha)`` would on the tokens, and scored by held-out R².
The linear algebra (``(C + alpha I)^{-1} B`` for every alpha) has two
interchangeable implementations, chosen by ``method``:

* ``"fast"`` (default): :class:`asg_probe.probes._lapack.Tridiagonal`, one
  tridiagonalisation per fold, each fold's path and scores in a GIL-free thread;
* ``"eigh"``: a plain ``scipy.linalg.eigh`` per fold, the reference the tests hold
  the fast path to.

Examples
--------
>>> import torch
>>> from asg_probe.probes import RidgeStats, coordinate_targets
>>> g = torch.Generator().manual_seed(0)
>>> Y = coordinate_targets((3, 3))
>>> X = Y @ torch.randn(2, 5, generator=g) + 0.01 * torch.randn(6, 9, 5, generator=g)
>>> stats = RidgeStats(n_folds=3); stats.update(X, Y, torch.arange(6))
>>> fast, ref = solve_ridge_cv(stats), solve_ridge_cv(stats, method="eigh")
>>> bool(abs(fast.cv_r2_ - ref.cv_r2_).max() < 1e-9)
True
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ._inputs import as_tensor
from ._lapack import Tridiagonal, _single_threaded_blas, solver_threads
from .stats import RidgeStats

__all__ = ["DEFAULT_ALPHAS", "METHODS", "RidgeCVResult", "solve_ridge_cv", "check_alphas"]

#: Default ridge grid. Alpha is in units of standardised features summed over
#: training tokens (sklearn ``Ridge`` convention), so the grid reaches far enough
#: up to regularise ``D`` larger than the number of tokens.
DEFAULT_ALPHAS = np.logspace(-3, 6, 19)

#: Implementations of the per-alpha solves: the LAPACK fast path and the eigh reference.
METHODS = ("fast", "eigh")


def check_alphas(alphas) -> np.ndarray:
    """``alphas`` (None: :data:`DEFAULT_ALPHAS`) as a 1-D float64 array of positive finite numbers."""
    a = np.atleast_1d(np.asarray(DEFAULT_ALPHAS if alphas is None else alphas, dtype=np.float64))
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"alphas must be a non-empty 1-D sequence of positive finite numbers, got {alphas!r}")
    return a


@dataclass
class RidgeCVResult:
    """Output of :func:`solve_ridge_cv`. Arrays are float64 numpy; ``T`` target columns.

    Attributes
    ----------
    alphas : (A,) the grid searched.
    fold_r2 : (F, A, T) held-out R² of each fold, alpha and column (NaN where a fold's target is constant).
    cv_r2_path : (A, T) mean of ``fold_r2`` over folds.
    alpha_ : (T,) alpha chosen per column; ``best_index`` its position in ``alphas``.
    cv_r2_ : (T,) cross-validated R² at ``alpha_`` (the held-out estimate to report).
    alpha_at_edge : (T,) True where ``alpha_`` is the smallest or largest alpha searched.
    coef_ : (T, D), intercept_ : (T,) refit on all folds at ``alpha_``, in the original feature units.
    fold_coef_ : (F, T, D), fold_intercept_ : (F, T) the models that scored each fold, at ``alpha_``.
    x_mean_, x_scale_ : (D,) mean and std of the features over all tokens (used by the refit).
    n_tokens, n_images : (F,) per fold.
    """

    alphas: np.ndarray
    target_names: tuple
    fold_r2: np.ndarray
    cv_r2_path: np.ndarray
    best_index: np.ndarray
    alpha_: np.ndarray
    cv_r2_: np.ndarray
    alpha_at_edge: np.ndarray
    coef_: np.ndarray
    intercept_: np.ndarray
    fold_coef_: np.ndarray
    fold_intercept_: np.ndarray
    x_mean_: np.ndarray
    x_scale_: np.ndarray
    n_tokens: np.ndarray
    n_images: np.ndarray = field(default=None)

    @property
    def fold_cv_r2_(self) -> np.ndarray:
        """``(F, T)`` held-out R² of each fold at the chosen ``alpha_`` (``cv_r2_`` is their nan-mean).

        Exact, from the streamed statistics: fold ``k``'s R² is scikit-learn's ``r2_score`` on
        fold ``k``'s tokens for the model fit on the other folds. Spread over folds gives
        :func:`~asg_probe.probes.metrics.fold_interval`.
        """
        return self.fold_r2[:, self.best_index, np.arange(self.fold_r2.shape[2])]

    def predict(self, X) -> torch.Tensor:
        """``X (..., D) @ coef_.T + intercept_`` in float64 on ``X``'s device."""
        X = as_tensor(X)
        W = torch.as_tensor(self.coef_, device=X.device)
        b = torch.as_tensor(self.intercept_, device=X.device)
        return X.to(torch.float64) @ W.T + b


def _moments(n, sx, sy, G, H):
    """Means and centred (co)variances from raw sums (float64 numpy).

    numpy rather than torch: these are a few small (D, D) operations per fold, where torch's
    intra-op threads cost more than the work (10x on a busy 2-core machine)."""
    mx, my = sx / n, sy / n
    C = G - n * np.outer(mx, mx)
    C = 0.5 * (C + C.T)  # the subtraction can break exact symmetry, which the solvers assume
    Cxy = H - n * np.outer(mx, my)
    return mx, my, C, Cxy


def _finite(t: torch.Tensor) -> bool:
    # numpy on the CPU: one pass, none of torch's intra-op thread start-up for a small tensor
    return bool(np.isfinite(t.numpy()).all()) if t.device.type == "cpu" else bool(torch.isfinite(t).all())


def _eigh_paths(systems, alphas) -> list:
    """Reference for :meth:`~asg_probe.probes._lapack.Tridiagonal.path`: ``U diag(1 / (lam + alpha)) U^T B``.

    One ``scipy.linalg.eigh`` per system, eigenvalues clipped at 0 (a covariance is
    PSD: negative ones are rounding). Slower, and simple enough to trust by reading.
    Returns one ``(D, A, T)`` tensor per system.
    """
    from scipy.linalg import eigh

    a = np.asarray(alphas, dtype=np.float64)
    out = []
    for C, B in systems:
        lam, U = eigh(np.asarray(C))
        lam = np.clip(lam, 0, None)
        P = U.T @ np.asarray(B)                                            # (D, T)
        W = U @ (P[None] / (lam[None, :, None] + a[:, None, None]))     # (A, D, T)
        out.append(torch.from_numpy(np.ascontiguousarray(W.transpose(1, 0, 2))))
    return out


def _standardise(n, sx, sy, G, H):
    """One ridge problem from raw sums ``(n, sx, sy, G, H)`` (float64, CPU) on standardised features.

    Returns ``(mx, my, scale, Cs, Bs)``: means, feature scales, the standardised covariance
    ``Cs`` (D, D) and cross-covariance ``Bs`` (D, T), whose weights apply to ``(x - mx) / scale``.
    Features whose variance is lost in rounding count as constant (scale 1, zero rows and
    columns, so zero weight): they cannot inject noise.
    """
    mx, my, C, Cxy = _moments(n, sx, sy, G, H)
    var = np.clip(np.diagonal(C), 0, None) / n
    second = np.diagonal(G) / n
    constant = var <= 1e-12 * np.maximum(second, np.finfo(np.float64).tiny)
    scale = np.where(constant, 1.0, np.sqrt(var))
    keep = (~constant).astype(np.float64)
    Cs = np.ascontiguousarray(C / np.outer(scale, scale) * np.outer(keep, keep))
    return mx, my, scale, Cs, Cxy / scale[:, None] * keep[:, None]


class _HeldOut:
    """A fold's model, trained on the other folds, and the held-out fold's centred statistics it is scored on."""

    def __init__(self, train, n, sx, sy, G, H, sy2):
        mx, my, scale, self.Cs, self.Bs = _standardise(*train)
        self.mx, self.my, self.scale = mx, my, scale
        self.m = float(n)
        hx, hy, Ch, Chy = _moments(n, sx, sy, G, H)
        self.sst = sy2 - n * hy * hy
        self.degenerate = self.sst <= 1e-12 * np.maximum(sy2, np.finfo(np.float64).tiny)
        self.Ch_s = Ch / np.outer(scale, scale)
        self.Chy_s = Chy / scale[:, None]
        self.gap_x = (hx - self.mx) / scale                     # held-out minus training mean, standardised
        self.gap_y = hy - self.my
        self.tridiagonal = None

    def sse(self, W: np.ndarray) -> np.ndarray:
        """Held-out sum of squared errors ``(T, A)`` of the weights ``W`` (T, A, D) on standardised features.

        ``SSE = SST - 2 w·Chy + w^T Ch w + m d²`` from the held-out fold's centred statistics, with
        ``d`` the gap between its mean target and the mean prediction (the cross terms vanish).
        """
        T, A, D = W.shape
        rows = W.reshape(T * A, D)
        quad = np.einsum("jd,jd->j", rows, rows @ self.Ch_s).reshape(T, A)       # w^T Ch w
        cross = np.einsum("tad,dt->ta", W, self.Chy_s)                           # w · Chy
        d = self.gap_y[:, None] - (rows @ self.gap_x).reshape(T, A)
        return self.sst[:, None] - 2 * cross + quad + self.m * d * d

    def r2(self, W: np.ndarray) -> np.ndarray:
        """Held-out R² ``(A, T)`` of the weights ``W`` (T, A, D) (:meth:`sse`); NaN where the target is constant."""
        r2 = 1 - self.sse(W) / np.where(self.degenerate, 1.0, self.sst)[:, None]
        r2[self.degenerate] = np.nan
        return r2.T

    def path(self, alphas, method) -> np.ndarray:
        """Weights ``(T, A, D)`` for ``alphas``; the fast method tridiagonalises once, at the first call."""
        if method == "eigh":
            return np.ascontiguousarray(_eigh_paths([(self.Cs, self.Bs)], alphas)[0].numpy().transpose(2, 1, 0))
        if self.tridiagonal is None:
            self.tridiagonal, self.Cs = Tridiagonal(self.Cs), None   # overwrites Cs, no longer needed
        return self.tridiagonal.path(self.Bs, alphas)


class _GridSolver:
    """What a cross-validated solve needs besides the alphas, kept while the grid grows.

    Per fold a :class:`_HeldOut` (with ``method="fast"`` its training covariance is
    tridiagonalised once, however many alphas are added later); the refit problem on all
    folds. :meth:`paths` scores new alphas; :meth:`result` chooses and refits.
    """

    def __init__(self, stats: RidgeStats, method: str):
        self.method = method
        # the solve runs on the CPU in float64 (LAPACK); the statistics are O(F D^2), a cheap copy off a GPU
        n, sx, sy, G, H, sy2 = (t.cpu().numpy() for t in (stats.n, stats.sum_x, stats.sum_y, stats.xtx,
                                                            stats.xty, stats.sum_y2))
        tot = [t.sum(0) for t in (n, sx, sy, G, H)]
        # every fold's training set is all the folds but k
        self.folds = [_HeldOut([t - t_k for t, t_k in zip(tot, (n[k], sx[k], sy[k], G[k], H[k]))],
                               n[k], sx[k], sy[k], G[k], H[k], sy2[k]) for k in range(stats.n_folds)]
        self.final = _standardise(*tot)
        self._final_tridiagonal = None
        self.n_tokens, self.n_images = n, stats.n_images.cpu().numpy()
        self.target_names = stats.target_names or tuple(f"y{i}" for i in range(stats.n_targets))

    def paths(self, alphas):
        """``(fold_r2 (F, A, T), [weights (T, A, D) per fold])`` for ``alphas``."""
        def fold(k):
            W = self.folds[k].path(alphas, self.method)
            return self.folds[k].r2(W), W

        F = len(self.folds)
        with _single_threaded_blas():
            workers = solver_threads(F + 1) if self.method == "fast" else 1
            if workers == 1:
                out = [fold(k) for k in range(F)]
            else:
                # the folds in parallel threads (LAPACK and numpy release the GIL); the refit problem is
                # tridiagonalised meanwhile, before its alphas are known
                with ThreadPoolExecutor(workers) as pool:
                    jobs = [pool.submit(fold, k) for k in range(F)]
                    if self._final_tridiagonal is None:
                        final = pool.submit(Tridiagonal, self.final[3])
                    out = [job.result() for job in jobs]
                    if self._final_tridiagonal is None:
                        self._final_tridiagonal = final.result()
        return np.stack([r2 for r2, _ in out]), [W for _, W in out]

    def refit(self, alphas_per_column):
        """Weights ``(T, D)`` on standardised features, refit on all folds, one alpha per column."""
        _, _, _, Cs, Bs = self.final
        if self.method == "eigh":
            chosen, where = np.unique(alphas_per_column, return_inverse=True)
            W = _eigh_paths([(Cs, Bs)], chosen)[0].numpy()                 # (D, A, T)
            return W[:, where.reshape(-1), np.arange(W.shape[2])].T
        with _single_threaded_blas():
            if self._final_tridiagonal is None:
                self._final_tridiagonal = Tridiagonal(Cs)
            return self._final_tridiagonal.solve(Bs, alphas_per_column).T

    def result(self, alphas, fold_r2, paths) -> RidgeCVResult:
        F, A, T = fold_r2.shape
        valid = ~np.isnan(fold_r2)
        counts = valid.sum(0)
        path = np.where(counts > 0, np.where(valid, fold_r2, 0).sum(0) / np.maximum(counts, 1), np.nan)
        best = np.empty(T, dtype=np.int64)
        for t in range(T):
            col = path[:, t]
            if np.all(np.isnan(col)):
                best[t] = A - 1  # nothing to predict: the strongest penalty gives weights ~0
            else:
                best[t] = A - 1 - int(np.nanargmax(col[::-1]))
        cols = np.arange(T)
        fold_coef = np.stack([W[cols, best] / held.scale[None] for W, held in zip(paths, self.folds)])   # (F, T, D)
        fold_icpt = np.stack([held.my - coef @ held.mx for coef, held in zip(fold_coef, self.folds)])
        # the final refit on all folds needs only the chosen alpha of each column
        mx, my, scale = self.final[:3]
        coef = self.refit(alphas[best]) / scale[None]
        return RidgeCVResult(
            alphas=alphas, target_names=self.target_names, fold_r2=fold_r2, cv_r2_path=path, best_index=best,
            alpha_=alphas[best], cv_r2_=path[best, cols], alpha_at_edge=(best == 0) | (best == A - 1),
            coef_=coef, intercept_=my - coef @ mx, fold_coef_=fold_coef, fold_intercept_=fold_icpt,
            x_mean_=mx, x_scale_=scale, n_tokens=self.n_tokens, n_images=self.n_images)


def solve_ridge_cv(stats: RidgeStats, alphas=None, *, method: str = "fast", extend: bool = False) -> RidgeCVResult:
    """Cross-validated ridge regression from streamed statistics, every fold and alpha at once.

    For each fold ``k``, the model is fit on the summed statistics of the other
    folds and scored on fold ``k``'s statistics alone, without predictions:

    * **Intercept** unpenalised: features and targets are centred on the training mean.
    * **Standardisation**: features are divided by their training-fold standard
      deviation (population, ``ddof=0``), so alpha does not depend on feature
      units. The loss is ``||y - b - Z w||² + alpha ||w||²`` on standardised ``Z``,
      summed over tokens, i.e. scikit-learn's ``StandardScaler`` + ``Ridge(alpha)``.
    * **All alphas at once**: one Householder tridiagonalisation of the standardised
      training covariance per fold, then one cheap tridiagonal solve per alpha, every
      target column at once; each fold's path and scores run in a thread of their own
      (as many as torch's thread count), and the refit problem on all folds is
      tridiagonalised meanwhile, then solved at each column's chosen alpha
      (``method="fast"``). Works when D exceeds the number of tokens. Runs on the CPU in
      float64 whatever the statistics' device.
    * **Held-out R²** per fold and column: ``1 - SSE / SST`` with SST around the
      held-out fold's *own* mean (as ``sklearn.metrics.r2_score`` on that fold),
      ``SSE = SST - 2 w·Cxy + w^T C w + m d²`` from the fold's centred statistics,
      ``d`` the offset between its mean target and the mean prediction. NaN where a
      fold's target is constant.
    * **CV R²** = mean over folds of the per-fold R² (NaN folds left out).
    * **Alpha** chosen *per target column* as the maximiser of CV R² (the largest
      alpha on ties); each column is an independent ridge problem, so this is
      exact. The final ``coef_`` / ``intercept_`` are refit on all folds. A choice
      on an end of the grid is flagged (``alpha_at_edge``) or, with ``extend``, the
      grid grows past it.

    Parameters
    ----------
    stats : RidgeStats
    alphas : array-like, optional
        Positive penalties; :data:`DEFAULT_ALPHAS` by default.
    method : {"fast", "eigh"}, default="fast"
        How the per-alpha systems are solved: the LAPACK fast path
        (:mod:`asg_probe.probes._lapack`) or the ``scipy.linalg.eigh`` reference.
        They agree to rounding.
    extend : bool, default=False
        While a column's CV R² still climbs towards an end of the grid, extend the grid
        past it and solve again (see :func:`_extend_edges`), so the grid does not
        silently truncate the choice; ``alphas`` is then the grid finally searched.

    Returns
    -------
    RidgeCVResult

    Examples
    --------
    >>> from asg_probe.probes import coordinate_targets
    >>> g = torch.Generator().manual_seed(0)
    >>> stats = RidgeStats(n_folds=3)
    >>> Y = coordinate_targets((3, 3))
    >>> X = Y @ torch.randn(2, 5, generator=g) + 0.01 * torch.randn(6, 9, 5, generator=g)
    >>> stats.update(X, Y, torch.arange(6))
    >>> res = solve_ridge_cv(stats)
    >>> bool(res.cv_r2_.min() > 0.99)
    True
    """
    alphas = check_alphas(alphas)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not stats.initialised:
        raise ValueError("the statistics are empty: call update() before solving")
    F = stats.n_folds
    empty = (stats.n <= 0).nonzero().reshape(-1).tolist()
    if empty:
        raise ValueError(f"fold(s) {empty} received no tokens: need at least n_folds={F} images "
                         f"(fold = image_index % {F})")
    if not all(_finite(t) for t in stats._tensors()[:-1]):
        raise ValueError("the statistics contain NaN or inf: the features fed to update() were not finite")
    solver = _GridSolver(stats, method)
    fold_r2, paths = solver.paths(alphas)
    result = solver.result(alphas, fold_r2, paths)
    return _extend_edges(solver, result, paths) if extend else result


#: Automatic grid extension: grid steps added at an edge per round, rounds per solve, the
#: smallest CV R² gain of a round that justifies another, and the CV R² above which a fit
#: counts as converged (not extended).
EXTEND_STEPS, EXTEND_ROUNDS, EXTEND_MIN_GAIN, EXTEND_CONVERGED = 4, 3, 1e-6, 1 - 1e-4


def _extend_edges(solver, result, paths):
    """Re-solve on a grid extended past an end where a column's CV R² still climbs towards it.

    Downwards where a column's R² rises from the grid's second-smallest alpha to its
    smallest by at least :data:`EXTEND_MIN_GAIN`, whether or not the smallest is the
    best yet: a signal carried by a faint direction (a weak injection) can be shrunk to
    nothing at the grid's floor, leaving the best alpha at the top with R² ~ 0 and only
    the climb at the bottom to show it. Upwards where the best alpha is the largest and
    its R² is positive. Each round adds :data:`EXTEND_STEPS` alphas beyond the edge,
    spaced like the grid's end (a factor of 10 for a one-alpha grid); rounds stop when
    no column asks for more, when the best CV R² of the columns extended gained less
    than :data:`EXTEND_MIN_GAIN`, or after :data:`EXTEND_ROUNDS` rounds.

    Not extended: a converged column (CV R² above :data:`EXTEND_CONVERGED`: less than
    1e-4 left to gain, and at smaller alphas such a fit's R², computed from sums, is
    dominated by rounding; on ViT-S layer 0 it read above 1). A round whose R² exceeds
    1 anyway is dropped and the extension stops. What is still on an edge stays flagged
    in ``alpha_at_edge``.

    Only the new alphas are solved (the folds' tridiagonalisations are kept); every column is
    scored on them, so the choice is the one a solve on the extended grid from the start makes.
    """
    for _ in range(EXTEND_ROUNDS):
        a, path = result.alphas, result.cv_r2_path
        r2 = np.nan_to_num(result.cv_r2_, nan=-np.inf)  # an all-NaN column has no best alpha
        open_fit = np.isfinite(r2) & (r2 <= EXTEND_CONVERGED)
        if a.size > 1:
            climbing = np.nan_to_num(path[0] - path[1], nan=-np.inf) >= EXTEND_MIN_GAIN
        else:
            climbing = result.best_index == 0
        low = open_fit & climbing
        high = open_fit & (result.best_index == a.size - 1) & (r2 > 0)
        if not (low.any() or high.any()):
            break
        down = a[1] / a[0] if a.size > 1 else 10.0
        up = a[-1] / a[-2] if a.size > 1 else 10.0
        steps = np.arange(1, EXTEND_STEPS + 1, dtype=np.float64)

        def tidy(values):  # 1e-07, not 9.999999999999994e-08
            return np.array([float(f"{v:.12g}") for v in values])

        below = tidy(a[0] / down ** steps[::-1]) if low.any() else a[:0]
        above = tidy(a[-1] * up ** steps) if high.any() else a[:0]
        new = np.concatenate([below, above])
        new_r2, new_paths = solver.paths(new)
        lo = below.size
        grid = np.concatenate([below, a, above])
        fold_r2 = np.concatenate([new_r2[:, :lo], result.fold_r2, new_r2[:, lo:]], axis=1)
        grown = [np.concatenate([W_new[:, :lo], W, W_new[:, lo:]], axis=1) for W, W_new in zip(paths, new_paths)]
        extended = solver.result(grid, fold_r2, grown)
        if np.any(extended.cv_r2_path > 1):
            break
        edge = low | high
        gain = np.max(extended.cv_r2_[edge] - result.cv_r2_[edge])
        result, paths = extended, grown
        if not gain >= EXTEND_MIN_GAIN:
            break
    return result
