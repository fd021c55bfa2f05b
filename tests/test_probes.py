"""Known-answer tests for the streamed ridge coordinate probe (asg_probe.probes)."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from asg_probe.probes import (TARGET_NAMES, CellAccuracy, CoordinateProbe, MLPProbe, RidgeStats,
                              TokenReservoir, control_permutation, coordinate_targets, probe_targets,
                              solve_ridge_cv)

GRID = (6, 8)  # non-square on purpose: catches row/col mix-ups
N = GRID[0] * GRID[1]


def planted(n_images=20, d_signal=16, d_noise=16, noise=0.01, seed=0):
    """Tokens that encode (row, col) linearly, plus irrelevant random dimensions."""
    g = torch.Generator().manual_seed(seed)
    coords = coordinate_targets(GRID, dtype=torch.float64)
    W = torch.randn(2, d_signal, generator=g, dtype=torch.float64)
    signal = coords @ W + noise * torch.randn(n_images, N, d_signal, generator=g, dtype=torch.float64)
    junk = torch.randn(n_images, N, d_noise, generator=g, dtype=torch.float64)
    return torch.cat([signal, junk], dim=-1)


def stats_of(X, Y, index, batch, n_folds=4, exact=False):
    stats = RidgeStats(n_folds=n_folds, exact=exact)
    for s in range(0, X.shape[0], batch):
        stats.update(X[s:s + batch], Y, index[s:s + batch])
    return stats


# --------------------------------------------------------------------------- targets

def test_targets_on_a_non_square_grid():
    t = coordinate_targets((2, 3))
    assert t.shape == (6, 2)
    assert t.tolist() == [[0, 0], [0, .5], [0, 1], [1, 0], [1, .5], [1, 1]]
    tall = coordinate_targets((5, 2))
    assert tall[:, 0].tolist() == [0, 0, .25, .25, .5, .5, .75, .75, 1, 1]
    assert tall[:, 1].tolist() == [0, 1] * 5


def test_a_grid_side_of_one_gives_zero():
    t = coordinate_targets((1, 4))
    assert t[:, 0].tolist() == [0, 0, 0, 0]
    assert t[:, 1].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_control_targets_are_a_fixed_permutation_of_the_true_ones():
    perm = control_permutation(N, seed=3)
    assert torch.equal(perm, control_permutation(N, seed=3))
    assert not torch.equal(perm, control_permutation(N, seed=4))
    assert sorted(perm.tolist()) == list(range(N))
    y = probe_targets(GRID, control_seed=3)
    assert y.shape == (N, 4)
    assert torch.equal(y[:, 2:], coordinate_targets(GRID)[perm])


# --------------------------------------------------------------------------- known answers

def test_planted_linear_coordinates_are_recovered():
    probe = CoordinateProbe(n_folds=5).fit(planted(), grid=GRID)
    assert probe.target_names_ == ("row", "col")
    assert probe.cv_r2_.min() > 0.99
    assert probe.cell_accuracy_ > 0.95
    assert probe.cell_accuracy_map_.shape == GRID
    # the control task has nothing linear to latch onto: selectivity is high
    assert probe.control_cv_r2_.max() < 0.1
    assert probe.selectivity_.min() > 0.9
    s = probe.summary()
    assert s["r2_mean"] == pytest.approx(probe.cv_r2_.mean())
    assert s["selectivity"] == pytest.approx(s["r2_mean"] - s["control_r2_mean"])


def test_pure_noise_scores_nothing():
    X = torch.randn(20, N, 32, generator=torch.Generator().manual_seed(1))
    probe = CoordinateProbe(n_folds=5).fit(X, grid=GRID)
    assert probe.cv_r2_.max() <= 0.05
    assert probe.control_cv_r2_.max() <= 0.05
    assert probe.cell_accuracy_ < 0.1


def test_split_is_by_image_not_by_token():
    # Each image codes position through its own random linear map: memorisable within
    # an image, useless across images. A token-level split leaks; ours must not.
    g = torch.Generator().manual_seed(1)
    n_images, D = 12, 64
    coords = coordinate_targets(GRID, dtype=torch.float64)
    per_image_map = torch.randn(n_images, 2, D, generator=g, dtype=torch.float64)
    per_image_offset = torch.randn(n_images, 1, D, generator=g, dtype=torch.float64)
    X = coords @ per_image_map + per_image_offset + 0.01 * torch.randn(n_images, N, D, generator=g,
                                                                        dtype=torch.float64)
    probe = CoordinateProbe(n_folds=4, control=False).fit(X, grid=GRID)
    assert np.abs(probe.cv_r2_).max() < 0.05

    # same penalty both ways, so only the split differs
    alpha = 1e-3
    tokens = X.reshape(-1, D).numpy()
    y = coords.expand(n_images, N, 2).reshape(-1, 2).numpy()
    leaky = cross_val_score(make_pipeline(StandardScaler(), Ridge(alpha=alpha)), tokens, y,
                            cv=KFold(4, shuffle=True, random_state=0), scoring="r2")
    assert leaky.min() > 0.9
    honest = CoordinateProbe(n_folds=4, control=False, alphas=[alpha]).fit(X, grid=GRID)
    assert honest.cv_r2_.max() < 0.05


# --------------------------------------------------------------------------- agreement with scikit-learn

def test_fixed_alpha_matches_sklearn_ridge_on_standardised_features():
    X = planted(n_images=8, noise=0.3)
    Y = probe_targets(GRID)
    alpha = 3.0
    res = solve_ridge_cv(stats_of(X, Y, torch.arange(8), batch=3), alphas=[alpha])
    tokens = X.reshape(-1, X.shape[-1]).numpy()
    y = Y.double().expand(8, N, 4).reshape(-1, 4).numpy()
    scaler = StandardScaler().fit(tokens)
    ref = Ridge(alpha=alpha).fit(scaler.transform(tokens), y)
    np.testing.assert_allclose(res.coef_ * scaler.scale_, ref.coef_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.predict(tokens).numpy(), ref.predict(scaler.transform(tokens)),
                               rtol=1e-6, atol=1e-9)


def test_cv_r2_matches_a_manual_grouped_loop():
    n_images, n_folds = 10, 4
    X = planted(n_images=n_images, noise=0.3, seed=2)
    Y = probe_targets(GRID)
    alphas = [0.1, 10.0, 1000.0]
    res = solve_ridge_cv(stats_of(X, Y, torch.arange(n_images), batch=4, n_folds=n_folds), alphas=alphas)
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


def test_more_features_than_tokens_is_fine():
    g = torch.Generator().manual_seed(0)
    coords = coordinate_targets((3, 4), dtype=torch.float64)
    X = coords @ torch.randn(2, 300, generator=g, dtype=torch.float64)
    X = X + 0.05 * torch.randn(6, 12, 300, generator=g, dtype=torch.float64)  # 72 tokens, D=300
    probe = CoordinateProbe(n_folds=3, control=False).fit(X, grid=(3, 4))
    assert np.all(np.isfinite(probe.coef_))
    assert probe.cv_r2_.min() > 0.9


def test_constant_features_are_ignored():
    X = planted(n_images=10)
    X = torch.cat([X, torch.full(X.shape[:2] + (3,), 7.0, dtype=X.dtype)], dim=-1)
    probe = CoordinateProbe(n_folds=5).fit(X, grid=GRID)
    assert probe.cv_r2_.min() > 0.99
    assert np.all(probe.coef_[:, -3:] == 0)


# --------------------------------------------------------------------------- the solver's linear algebra

def _psd(d, rank, seed):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return F @ F.T * torch.logspace(0, 3, d, dtype=torch.float64)[:rank].sum() / rank


@pytest.mark.parametrize("d, rank", [(2, 2), (37, 37), (120, 40)])  # full rank and rank-deficient
def test_ridge_path_equals_one_direct_solve_per_alpha(d, rank):
    from asg_probe.probes import _ridge_path, _ridge_solve, _tridiagonal_path_eigen, _tridiagonalise

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

    from asg_probe.probes import _lapack_dsytrd, _tridiagonalise

    assert _lapack_dsytrd() is not None  # else the folds are tridiagonalised one at a time
    C = _psd(50, 50, seed=3).numpy()
    ours = _tridiagonalise(C.copy())
    theirs = lapack.dsytrd(C.copy().T, lower=1)
    for a, b in zip(ours, theirs[:4]):  # equal up to the rounding of a different work-space blocking
        a, b = (np.tril(a), np.tril(b)) if a.ndim == 2 else (a, b)
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * np.abs(b).max())


@pytest.mark.parametrize("d", [3, 200, 384])  # one, two and four column blocks
@pytest.mark.parametrize("exact", [True, False])
def test_block_triangular_gram_is_the_full_symmetric_product(d, exact):
    g = torch.Generator().manual_seed(d)
    X = (torch.randn(7, 30, d, generator=g) * 2 + 5).float()
    stats = RidgeStats(n_folds=2, exact=exact)
    stats.update(X[:4], torch.zeros(30, 1), torch.arange(4))
    stats.update(X[4:], torch.zeros(30, 1), torch.arange(4, 7))
    for f in range(2):
        rows = X[f::2].reshape(-1, d).double()
        expected = rows.T @ rows
        assert float((stats.xtx[f] - expected).abs().max() / expected.abs().max()) < (1e-12 if exact else 1e-6)
        assert torch.equal(stats.xtx[f], stats.xtx[f].T)


def test_near_perfect_layer0_fit_stays_at_most_one_by_default():
    """Layer 0 of an APE model decodes the slot from the learned table: R² just below 1, ill-conditioned.

    The float32 Gram path reads 1.00001 here (3e-4 off); the float64 default must not exceed 1."""
    import asg_probe

    torch.manual_seed(0)
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    images = torch.randn(20, 3, 32, 32)
    row = asg_probe.layerwise_probes(model, images, layers=[0], progress=False).rows[0]
    assert 0.999 < row["r2_row"] <= 1.0 and 0.999 < row["r2_col"] <= 1.0


# --------------------------------------------------------------------------- streaming invariance

def test_batching_and_order_do_not_change_the_statistics():
    X = planted(n_images=12).float()
    Y = probe_targets(GRID)
    index = torch.arange(12)
    whole = stats_of(X, Y, index, batch=12, exact=True)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    for batch in (1, 5):
        other = stats_of(X[order], Y, index[order], batch=batch, exact=True)
        for a, b in zip(whole._tensors(), other._tensors()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
        r_whole, r_other = solve_ridge_cv(whole), solve_ridge_cv(other)
        np.testing.assert_allclose(r_whole.cv_r2_, r_other.cv_r2_, rtol=1e-9)
        np.testing.assert_allclose(r_whole.coef_, r_other.coef_, rtol=1e-7, atol=1e-9)


def test_fast_float32_path_matches_float64_on_offset_activations():
    # ViT-like activations: a large shared offset (|mean| ~ 50) on top of the signal, which is
    # where an uncentred float32 Gram matrix would lose the signal to cancellation.
    X64 = planted(n_images=40) + 50.0 * torch.randn(32, dtype=torch.float64)
    X32 = X64.float()
    Y = probe_targets(GRID)
    index = torch.arange(40)
    exact = stats_of(X32, Y, index, batch=40, exact=True)
    for batch in (3, 40):
        fast = stats_of(X32, Y, index, batch=batch)
        rel = (fast.xtx - exact.xtx).abs().max() / exact.xtx.abs().max()
        assert rel < 1e-6
        r_exact, r_fast = solve_ridge_cv(exact), solve_ridge_cv(fast)
        np.testing.assert_allclose(r_fast.cv_r2_, r_exact.cv_r2_, atol=1e-5)
        assert r_fast.cv_r2_[:2].min() > 0.99  # the planted coordinates are still found
    # float64 input always takes the exact path
    torch.testing.assert_close(stats_of(X64, Y, index, batch=3).xtx, stats_of(X64, Y, index, batch=40).xtx,
                               rtol=1e-12, atol=1e-9)


def test_merging_halves_equals_the_whole():
    X = planted(n_images=12)
    Y = probe_targets(GRID)
    index = torch.arange(12)
    whole = stats_of(X, Y, index, batch=4)
    first = stats_of(X[:7], Y, index[:7], batch=4)
    second = stats_of(X[7:], Y, index[7:], batch=4)
    merged = RidgeStats(n_folds=4).merge(first).merge(second)
    for a, b in zip(whole._tensors(), merged._tensors()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
    assert merged.all_reduce() is merged  # not distributed: a no-op
    restored = RidgeStats.from_state_dict(merged.state_dict())
    np.testing.assert_allclose(solve_ridge_cv(restored).cv_r2_, solve_ridge_cv(whole).cv_r2_)


def test_token_input_gives_the_same_probe_as_image_input():
    X = planted(n_images=10)
    Y = coordinate_targets(GRID)
    by_image = CoordinateProbe(n_folds=5, control=False).fit(X, grid=GRID)
    by_token = CoordinateProbe(n_folds=5).fit(X.reshape(-1, X.shape[-1]).numpy(),
                                              Y.expand(10, N, 2).reshape(-1, 2).numpy(),
                                              groups=np.repeat(np.arange(10) * 3, N))
    np.testing.assert_allclose(by_token.cv_r2_, by_image.cv_r2_, rtol=1e-9)
    np.testing.assert_allclose(by_token.coef_, by_image.coef_, rtol=1e-6, atol=1e-9)
    assert by_token.cell_accuracy_ is None


def test_fit_stats_equals_fit_and_cell_accuracy_streams():
    X = planted(n_images=10)
    probe = CoordinateProbe(n_folds=5).fit(X, grid=GRID)
    stats = RidgeStats(n_folds=5, target_names=TARGET_NAMES)
    for s in range(0, 10, 3):
        stats.update(X[s:s + 3], probe_targets(GRID), torch.arange(s, min(s + 3, 10)))
    streamed = CoordinateProbe(n_folds=5).fit_stats(stats)
    np.testing.assert_allclose(streamed.coef_, probe.coef_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(streamed.control_cv_r2_, probe.control_cv_r2_, rtol=1e-9, atol=1e-12)
    acc = CellAccuracy(streamed.cv_results_, GRID)
    for s in range(0, 10, 4):
        acc.update(X[s:s + 4], torch.arange(s, min(s + 4, 10)))
    assert acc.accuracy == pytest.approx(probe.cell_accuracy_)
    assert acc.accuracy_within_one >= acc.accuracy
    assert acc.total.sum() == 10 * N


# --------------------------------------------------------------------------- estimator contract

def test_estimator_contract_predict_and_score():
    from sklearn.base import clone

    probe = CoordinateProbe(n_folds=4, alphas=[0.1, 1.0])
    assert clone(probe).get_params() == probe.get_params()
    assert not hasattr(probe, "coef_")
    X = planted(n_images=8)
    probe.fit(X.numpy(), grid=GRID)
    pred = probe.predict(X.numpy())
    assert isinstance(pred, np.ndarray) and pred.shape == (8, N, 2)
    assert isinstance(probe.predict(X), torch.Tensor)
    assert probe.score(X, grid=GRID) > 0.99
    assert probe.score(X, coordinate_targets(GRID)) == pytest.approx(probe.score(X, grid=GRID))
    assert set(probe.alpha_) <= {0.1, 1.0}


def test_one_dimensional_targets():
    X = planted(n_images=8)
    rows = coordinate_targets(GRID)[:, 0]
    probe = CoordinateProbe(n_folds=4).fit(X, rows)
    assert probe.predict(X).shape == (8, N)
    assert probe.score(X, rows) > 0.99


@pytest.mark.parametrize("call, message", [
    (lambda: CoordinateProbe(n_folds=5).fit(torch.randn(3, N, 4), grid=GRID), "at least 5 images, got 3"),
    (lambda: CoordinateProbe().fit(torch.randn(6, N, 4, 2)), "must be 2-D or 3-D"),
    (lambda: CoordinateProbe().fit(torch.randn(6, N, 4)), "cannot infer a grid from 48"),
    (lambda: CoordinateProbe().fit(torch.randn(6, N, 4), grid=(7, 7)), "grid 7x7 has 49 cells"),
    (lambda: CoordinateProbe().fit(torch.randn(60, 4), np.zeros(60)), "needs both y and groups"),
    (lambda: CoordinateProbe(alphas=[0.0, 1.0]).fit(torch.randn(6, N, 4), grid=GRID), "positive"),
    (lambda: CoordinateProbe(n_folds=1).fit(torch.randn(6, N, 4), grid=GRID), "n_folds must be >= 2"),
    (lambda: CoordinateProbe().fit(torch.randn(6, N, 4), torch.zeros(5, 2)), "y must be"),
    (lambda: CoordinateProbe().predict(torch.randn(2, 4)), "not fitted"),
    (lambda: RidgeStats(2).update(torch.randn(2, N, 4), torch.zeros(N + 1, 2), torch.arange(2)), "Y must be"),
    (lambda: solve_ridge_cv(RidgeStats(2)), "empty"),
])
def test_bad_input_raises_a_one_line_value_error(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)
    assert "\n" not in str(err.value)


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


# --------------------------------------------------------------------------- non-linear probe

def test_token_reservoir_is_bounded_and_order_free():
    X = planted(n_images=6).float()
    Y = coordinate_targets(GRID)
    a, b = TokenReservoir(max_tokens=50, seed=1), TokenReservoir(max_tokens=50, seed=1)
    a.update(X, Y, torch.arange(6))
    for i in (5, 2, 0, 4, 1, 3):
        b.update(X[i:i + 1], Y, torch.tensor([i]))
    assert a.features.shape == (50, X.shape[-1])
    order_a, order_b = a.keys.argsort(), b.keys.argsort()
    torch.testing.assert_close(a.features[order_a], b.features[order_b])
    torch.testing.assert_close(a.image_index[order_a], b.image_index[order_b])


def test_mlp_probe_learns_a_non_linear_code_on_held_out_images():
    # position enters through sin/cos of the coordinates: not linear in (row, col)
    g = torch.Generator().manual_seed(0)
    c = coordinate_targets(GRID)
    code = torch.cat([torch.sin(4 * c), torch.cos(4 * c)], dim=1) @ torch.randn(4, 12, generator=g)
    X = code + 0.02 * torch.randn(15, N, 12, generator=g)
    mlp = MLPProbe(hidden=64, steps=300, max_tokens=600).fit(X, grid=GRID)
    assert mlp.heldout_r2_.min() > 0.95
    assert mlp.predict(X).shape == (15, N, 2)
    assert mlp.score(X, grid=GRID) > 0.95


def test_a_grid_without_rows_gives_an_undefined_row_score():
    grid = (1, 8)
    g = torch.Generator().manual_seed(0)
    X = coordinate_targets(grid) @ torch.randn(2, 6, generator=g) + 0.01 * torch.randn(6, 8, 6, generator=g)
    probe = CoordinateProbe(n_folds=3, control=False).fit(X, grid=grid)
    assert np.isnan(probe.cv_r2_[0]) and probe.cv_r2_[1] > 0.99
    assert np.all(np.isfinite(probe.coef_))


def test_all_reduce_runs_under_torch_distributed(tmp_path):
    import torch.distributed as dist

    X = planted(n_images=8)
    stats = stats_of(X, probe_targets(GRID), torch.arange(8), batch=8)
    before = [t.clone() for t in stats._tensors()]
    acc = CellAccuracy(solve_ridge_cv(stats), GRID)
    acc.update(X, torch.arange(8))
    correct = acc.correct.clone()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        stats.all_reduce()
        acc.all_reduce()
    finally:
        dist.destroy_process_group()
    for a, b in zip(before, stats._tensors()):
        torch.testing.assert_close(a, b)  # one rank: the sum is itself
    torch.testing.assert_close(acc.correct, correct)
