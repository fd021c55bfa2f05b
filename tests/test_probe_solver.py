"""asg_probe.probes.solver: cross-validated ridge from statistics, against scikit-learn and the eigh reference."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from asg_probe.probes import CoordinateProbe, RidgeStats, coordinate_targets, probe_targets, solve_ridge_cv
from asg_probe.probes._lapack import (Tridiagonal, _lapack_dsytrd, _lapack_function, _ridge_path, _ridge_solve,
                                      _tridiagonal_path_eigen, _tridiagonalise, ridge_paths)
from probe_data import GRID, N, planted, stats_of

# --------------------------------------------------------------------------- agreement with scikit-learn


@pytest.mark.parametrize("method", ["fast", "eigh"])
def test_fixed_alpha_matches_sklearn_ridge_on_standardised_features(method):
    X = planted(n_images=8, noise=0.3)
    Y = probe_targets(GRID)
    alpha = 3.0
    res = solve_ridge_cv(stats_of(X, Y, torch.arange(8), batch=3), alphas=[alpha], method=method)
    tokens = X.reshape(-1, X.shape[-1]).numpy()
    y = Y.double().expand(8, N, 4).reshape(-1, 4).numpy()
    scaler = StandardScaler().fit(tokens)
    ref = Ridge(alpha=alpha).fit(scaler.transform(tokens), y)
    np.testing.assert_allclose(res.coef_ * scaler.scale_, ref.coef_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.predict(tokens).numpy(), ref.predict(scaler.transform(tokens)),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["fast", "eigh"])
def test_cv_r2_matches_a_manual_grouped_loop(method):
    n_images, n_folds = 10, 4
    X = planted(n_images=n_images, noise=0.3, seed=2)
    Y = probe_targets(GRID)
    alphas = [0.1, 10.0, 1000.0, 3e4, 1e5]  # five: the tridiagonal path, not the few-alpha Cholesky
    res = solve_ridge_cv(stats_of(X, Y, torch.arange(n_images), batch=4, n_folds=n_folds), alphas=alphas,
                         method=method)
    tokens = X.reshape(-1, X.shape[-1]).numpy()
    y = Y.double().expand(n_images, N, 4).reshape(-1, 4).numpy()
    fold = np.repeat(np.arange(n_images) % n_folds, N)  # the same folds: image index % n_folds
    for a_i, alpha in enumerate(alphas):
        per_fold = []
        for k in range(n_folds):
            model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(tokens[fold != k], y[fold != k])
            per_fold.append(r2_score(y[fold == k], model.predict(tokens[fold == k]), multioutput="raw_values"))
        np.testing.assert_allclose(res.fold_r2[:, a_i], np.array(per_fold), atol=1e-7)
        np.testing.assert_allclose(res.cv_r2_path[a_i], np.mean(per_fold, axis=0), atol=1e-7)
    assert np.all(res.cv_r2_ == res.cv_r2_path.max(axis=0))
    assert list(res.alpha_at_edge) == [a in (alphas[0], alphas[-1]) for a in res.alpha_]


# --------------------------------------------------------------------------- fast path vs eigh reference

def _random_problem(n_images, d, rank, seed):
    """Tokens of rank ``rank`` in ``d`` dimensions (rank < d: collinear features) with a planted code."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g, dtype=torch.float64)
    latent = torch.randn(n_images, N, rank, generator=g, dtype=torch.float64)
    latent[..., :2] += 10 * coordinate_targets(GRID, dtype=torch.float64)
    return latent @ basis + 0.5 * torch.randn(d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n_images, d, rank", [
    (10, 24, 24),    # full rank
    (10, 40, 12),    # rank-deficient: 28 exactly collinear directions
    (5, 300, 300),   # more features than training tokens (4 x 48 = 192)
])
def test_fast_path_equals_the_eigh_reference(n_images, d, rank):
    X = _random_problem(n_images, d, rank, seed=d)
    stats = stats_of(X, probe_targets(GRID), torch.arange(n_images), batch=3, n_folds=4, exact=True)
    fast, ref = solve_ridge_cv(stats, method="fast"), solve_ridge_cv(stats, method="eigh")
    np.testing.assert_allclose(fast.fold_r2, ref.fold_r2, atol=1e-8)
    np.testing.assert_allclose(fast.cv_r2_path, ref.cv_r2_path, atol=1e-8)
    assert np.array_equal(fast.alpha_, ref.alpha_)
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(fast.coef_, ref.coef_, rtol=1e-6, atol=1e-8 * scale)
    np.testing.assert_allclose(fast.fold_coef_, ref.fold_coef_, rtol=1e-6, atol=1e-8 * np.abs(ref.fold_coef_).max())
    np.testing.assert_allclose(fast.intercept_, ref.intercept_, rtol=1e-6, atol=1e-8)
    assert fast.cv_r2_[:2].min() > 0.5  # the planted code is found, so the comparison is not of zeros


def test_ridge_paths_equals_a_direct_solve_for_several_systems():
    g = torch.Generator().manual_seed(0)
    systems = []
    for d in (5, 9):
        F = torch.randn(d, 3, generator=g, dtype=torch.float64)
        systems.append((F @ F.T, torch.randn(d, 2, generator=g, dtype=torch.float64)))
    alphas = np.logspace(-2, 2, 6)
    expected = [torch.stack([torch.linalg.solve(C + a * torch.eye(C.shape[0], dtype=C.dtype), B) for a in alphas], 1)
                for C, B in systems]
    for W, E in zip(ridge_paths([(C.clone(), B) for C, B in systems], alphas), expected):
        torch.testing.assert_close(W, E, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- the fast path's linear algebra

def _psd(d, rank, seed):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return F @ F.T * torch.logspace(0, 3, d, dtype=torch.float64)[:rank].sum() / rank


@pytest.mark.parametrize("d, rank", [(2, 2), (37, 37), (120, 40)])  # full rank and rank-deficient
def test_ridge_path_equals_one_direct_solve_per_alpha(d, rank):
    C = _psd(d, rank, seed=d)
    B = torch.randn(d, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alphas = np.logspace(-3, 6, 19)
    W = _ridge_path(C.clone(), B, alphas)                                  # (D, A, T)
    assert W.shape == (d, 19, 3)
    for i, a in enumerate(alphas):
        direct = torch.linalg.solve(C + a * torch.eye(d, dtype=torch.float64), B)
        torch.testing.assert_close(W[:, i], direct, rtol=1e-6, atol=1e-9 * float(direct.abs().max()))
    # the eigenvector fallback (for a pivot that is exactly zero) and the Cholesky route agree
    packed, diag, off, tau = _tridiagonalise(C.clone().numpy())
    Qt = torch.eye(d, dtype=torch.float64)
    Qt[1:] = torch.ormqr(torch.from_numpy(packed)[1:, :-1], torch.from_numpy(tau), Qt[1:], transpose=True)
    Y = torch.from_numpy(_tridiagonal_path_eigen(diag, off, (Qt @ B).numpy(), alphas)).reshape(19, d, 3)
    torch.testing.assert_close(Qt.T @ Y, W.permute(1, 0, 2), rtol=1e-6, atol=1e-9 * float(W.abs().max()))
    torch.testing.assert_close(_ridge_solve(C.clone(), B, alphas[[0, 9]]), W[:, [0, 9]], rtol=1e-6, atol=1e-9)


def test_tridiagonalisation_without_the_gil_equals_scipys_wrapper():
    from scipy.linalg import lapack

    assert _lapack_dsytrd() is not None  # else the folds are tridiagonalised one at a time
    C = _psd(50, 50, seed=3).numpy()
    ours = _tridiagonalise(C.copy())
    theirs = lapack.dsytrd(C.copy().T, lower=1)
    for a, b in zip(ours, theirs[:4]):  # equal up to the rounding of a different work-space blocking
        a, b = (np.tril(a), np.tril(b)) if a.ndim == 2 else (a, b)
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * np.abs(b).max())


@pytest.mark.parametrize("d, rank", [(1, 1), (37, 37), (120, 40)])
def test_the_refit_solves_each_column_at_its_own_alpha(d, rank):
    C = _psd(d, rank, seed=d)
    B = torch.randn(d, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    alphas = np.array([1e-3, 10.0, 1e-3, 1e5])
    W = Tridiagonal(C.clone().numpy()).solve(B.numpy(), alphas)                         # (D, T)
    for t, a in enumerate(alphas):
        direct = torch.linalg.solve(C + a * torch.eye(d, dtype=torch.float64), B[:, t])
        torch.testing.assert_close(torch.from_numpy(W[:, t]), direct, rtol=1e-6, atol=1e-9 * float(direct.abs().max()))
    path = Tridiagonal(C.clone().numpy()).path(B.numpy(), alphas)                      # (T, A, D)
    np.testing.assert_allclose(W.T, path[np.arange(4), np.arange(4)], rtol=1e-12, atol=1e-14 * np.abs(W).max())


def test_without_scipys_lapack_pointers_the_wrappers_give_the_same_path(monkeypatch):
    from asg_probe.probes import _lapack

    C = _psd(40, 40, seed=5)
    B = torch.randn(40, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    alphas = np.logspace(-3, 6, 19)
    fast = _ridge_path(C.clone(), B, alphas)
    monkeypatch.setattr(_lapack, "_lapack_function", lambda name: None)   # f2py dsytrd/dgtsv, torch.ormqr
    assert _lapack._lapack_dsytrd() is None
    slow = _ridge_path(C.clone(), B, alphas)
    torch.testing.assert_close(slow, fast, rtol=1e-9, atol=1e-12 * float(fast.abs().max()))


def test_a_zero_pivot_falls_back_to_clipped_eigenvalues():
    # -1 stands for a negative eigenvalue from rounding: at alpha 1 the shifted system has an exact zero pivot
    C = np.diag([-1.0, 2.0, 3.0])
    B = np.ones((3, 2))
    alphas = np.array([0.5, 1.0, 4.0])
    expected = B[None] / (np.clip(np.diag(C), 0, None)[None, :, None] + alphas[:, None, None])   # (A, D, T)
    np.testing.assert_allclose(Tridiagonal(C.copy()).path(B, alphas), expected.transpose(2, 0, 1), rtol=1e-12)
    np.testing.assert_allclose(Tridiagonal(C.copy()).solve(B, alphas[[1, 2]]), expected[[1, 2], :, [0, 1]].T,
                               rtol=1e-12)


def test_a_solve_with_many_targets_equals_one_column_at_a_time():
    """22 columns share one tridiagonalisation per fold; each column alone gives the same scores and weights."""
    X = _random_problem(12, 30, 30, seed=4)
    Y = torch.randn(N, 22, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    Y[:, :2] = coordinate_targets(GRID, dtype=torch.float64)
    stats = stats_of(X, Y, torch.arange(12), batch=5, n_folds=4, exact=True)
    together = solve_ridge_cv(stats, extend=True)
    for t in (0, 1, 7, 21):
        alone = RidgeStats(n_folds=4)
        for s in range(0, 12, 5):
            alone.update(X[s:s + 5], Y[:, [t]], torch.arange(s, min(s + 5, 12)))
        one = solve_ridge_cv(alone, alphas=together.alphas)
        np.testing.assert_allclose(together.fold_r2[..., t], one.fold_r2[..., 0], rtol=0, atol=1e-10)
        assert together.alpha_[t] == one.alpha_[0]
        np.testing.assert_allclose(together.coef_[t], one.coef_[0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(together.fold_coef_[:, t], one.fold_coef_[:, 0], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- edge cases and errors

def test_constant_features_get_zero_weight():
    X = planted(n_images=10)
    X = torch.cat([X, torch.full(X.shape[:2] + (3,), 7.0, dtype=X.dtype)], dim=-1)
    res = solve_ridge_cv(stats_of(X, probe_targets(GRID), torch.arange(10), batch=5, n_folds=5))
    assert res.cv_r2_[:2].min() > 0.99
    assert np.all(res.coef_[:, -3:] == 0)


def test_a_constant_target_scores_nan_not_a_number_from_rounding():
    X = planted(n_images=6)
    Y = torch.cat([probe_targets(GRID, control=False), torch.full((N, 1), 0.5)], dim=1)
    res = solve_ridge_cv(stats_of(X, Y, torch.arange(6), batch=6, n_folds=3))
    assert np.isnan(res.cv_r2_[2]) and res.cv_r2_[:2].min() > 0.99
    assert np.all(np.isfinite(res.coef_))


def test_empty_fold_and_non_finite_features_are_reported():
    stats = RidgeStats(n_folds=3)
    stats.update(torch.randn(2, N, 4), probe_targets(GRID), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"fold\(s\) \[2\] received no tokens"):
        solve_ridge_cv(stats)
    bad = torch.randn(3, N, 4)
    bad[0, 0, 0] = float("nan")
    stats.update(bad, probe_targets(GRID), torch.tensor([2, 3, 4]))
    with pytest.raises(ValueError, match="not finite"):
        solve_ridge_cv(stats)


@pytest.mark.parametrize("call, message", [
    (lambda: solve_ridge_cv(RidgeStats(2)), "empty"),
    (lambda: solve_ridge_cv(RidgeStats(2), alphas=[0.0, 1.0]), "positive"),
    (lambda: solve_ridge_cv(RidgeStats(2), method="qr"), "method must be one of fast, eigh"),
])
def test_bad_input_raises_a_one_line_value_error(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- the alpha grid's edges

def _faint_code(n_images=8, delta=1e-3, noise=1e-6, seed=0):
    """Position in the faint difference of two nearly equal features: the best penalty is far below 1e-3.

    Features ``z + delta row`` and ``z`` (``z`` large and random per token): standardised, the
    position direction has an eigenvalue of about ``n_tokens delta^2 / 10``, 5e-5 here, so
    the grid's smallest alpha (1e-3) shrinks it twenty-fold.
    """
    g = torch.Generator().manual_seed(seed)
    coords = coordinate_targets(GRID, dtype=torch.float64).expand(n_images, N, 2)
    z = torch.randn(n_images, N, 2, generator=g, dtype=torch.float64)
    junk = torch.randn(n_images, N, 4, generator=g, dtype=torch.float64)
    X = torch.cat([z + delta * coords, z, junk], -1)
    return X + noise * torch.randn(X.shape, generator=g, dtype=torch.float64)


def test_the_default_grid_extends_past_an_edge_the_choice_sits_on():
    stats = stats_of(_faint_code(), probe_targets(GRID, control=False), torch.arange(8), batch=8, exact=True)
    plain = solve_ridge_cv(stats)
    # truncated by the grid: the row's best alpha is its floor (R² 0.01), the column's signal is
    # shrunk to nothing there, so its best alpha is the top (R² just below 0)
    assert list(plain.alpha_) == [1e-3, 1e6] and plain.alpha_at_edge.all()
    assert plain.cv_r2_.max() < 0.05
    extended = solve_ridge_cv(stats, extend=True)
    assert extended.alpha_.max() < 1e-4 and extended.alphas.min() < 1e-4
    assert np.all(extended.cv_r2_ > 0.99) and np.all(extended.cv_r2_ <= 1)  # what the grid had hidden
    assert set(plain.alphas) <= set(extended.alphas)  # the grid grew, its old points stayed
    assert extended.alphas.min() >= 1e-3 / 10 ** 6  # three rounds of two decades at the most
    # what the larger grid finds is what that grid searched directly finds
    direct = solve_ridge_cv(stats, alphas=extended.alphas)
    np.testing.assert_array_equal(direct.cv_r2_, extended.cv_r2_)


def test_a_converged_fit_is_flagged_not_extended():
    g = torch.Generator().manual_seed(0)
    coords = coordinate_targets(GRID, dtype=torch.float64)
    X = torch.cat([coords, torch.randn(N, 6, generator=g, dtype=torch.float64)], 1).expand(8, N, 8)
    X = X + 1e-6 * torch.randn(8, N, 8, generator=g, dtype=torch.float64)
    stats = stats_of(X, probe_targets(GRID, control=False), torch.arange(8), batch=8, exact=True)
    plain, extended = solve_ridge_cv(stats), solve_ridge_cv(stats, extend=True)
    assert plain.cv_r2_.min() > 1 - 1e-4 and plain.alpha_at_edge.all()
    np.testing.assert_array_equal(extended.alphas, plain.alphas)


def test_a_column_without_signal_is_not_extended():
    X = torch.randn(20, N, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    stats = stats_of(X, probe_targets(GRID, control=False), torch.arange(20), batch=20, exact=True)
    plain, extended = solve_ridge_cv(stats), solve_ridge_cv(stats, extend=True)
    assert plain.alpha_at_edge.all() and np.all(plain.cv_r2_ <= 0)  # the strongest penalty, R² just below 0
    np.testing.assert_array_equal(extended.alphas, plain.alphas)


def test_the_estimator_extends_only_the_default_grid():
    X = _faint_code()
    default = CoordinateProbe(n_folds=4, control=False).fit(X, grid=GRID)
    given = CoordinateProbe(n_folds=4, control=False, alphas=[1e-3, 1e-2, 1e-1]).fit(X, grid=GRID)
    assert default.alpha_.max() < 1e-3 and default.alphas_.min() < 1e-3
    assert list(given.alpha_) == [1e-3, 1e-3] and given.alpha_at_edge_.all()  # flagged, searched as given
    off = CoordinateProbe(n_folds=4, control=False, extend_alphas=False).fit(X, grid=GRID)
    assert off.alphas_.min() == 1e-3 and off.alpha_at_edge_.all()
