"""asg_probe.probes.stats: streamed ridge statistics are exact sums, whatever the batching."""
import numpy as np
import pytest
import torch

from asg_probe.probes import FactoredTargets, RidgeStats, probe_targets, solve_ridge_cv
from probe_data import GRID, N, planted, stats_of


def test_the_statistics_are_the_per_fold_sums():
    X = planted(n_images=6)
    Y = probe_targets(GRID).double()
    stats = stats_of(X, Y, torch.arange(6), batch=4, n_folds=3, exact=True)
    for f in range(3):
        rows = X[f::3].reshape(-1, X.shape[-1])
        ys = Y.repeat(2, 1)
        assert stats.n[f] == 2 * N and stats.n_images[f] == 2
        torch.testing.assert_close(stats.sum_x[f], rows.sum(0))
        torch.testing.assert_close(stats.xtx[f], rows.T @ rows)
        torch.testing.assert_close(stats.xty[f], rows.T @ ys)
        torch.testing.assert_close(stats.sum_y2[f], (ys * ys).sum(0))


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


def test_token_updates_equal_image_updates():
    X = planted(n_images=8)
    Y = probe_targets(GRID).double()
    by_image = stats_of(X, Y, torch.arange(8), batch=3, exact=True)
    by_token = RidgeStats(n_folds=4)
    by_token.update_tokens(X.reshape(-1, X.shape[-1]), Y.repeat(8, 1), torch.arange(8).repeat_interleave(N))
    for name in ("n", "sum_x", "sum_y", "xtx", "xty", "sum_y2"):
        torch.testing.assert_close(getattr(by_token, name), getattr(by_image, name), rtol=1e-12, atol=1e-9)
    assert by_token.n_images.sum() == 0  # token updates cannot tell images apart


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


def test_all_reduce_runs_under_torch_distributed(tmp_path):
    import torch.distributed as dist

    stats = stats_of(planted(n_images=8), probe_targets(GRID), torch.arange(8), batch=8)
    before = [t.clone() for t in stats._tensors()]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        stats.all_reduce()
    finally:
        dist.destroy_process_group()
    for a, b in zip(before, stats._tensors()):
        torch.testing.assert_close(a, b)  # one rank: the sum is itself


@pytest.mark.parametrize("call, message", [
    (lambda: RidgeStats(2).update(torch.randn(2, N, 4), torch.zeros(N + 1, 2), torch.arange(2)), "Y must be"),
    (lambda: RidgeStats(2).update(torch.randn(2, N, 4), torch.zeros(N, 2), torch.arange(3)), "image_index must hold 2"),
    (lambda: RidgeStats(2).update(torch.randn(2, N, 4), torch.zeros(N, 2), torch.zeros(2)), "integers"),
    (lambda: RidgeStats(1), "n_folds must be >= 2"),
    (lambda: RidgeStats(2, n_features=3), "pass both n_features and n_targets"),
])
def test_bad_input_raises_a_one_line_value_error(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_second_shape_is_refused():
    stats = RidgeStats(2)
    stats.update(torch.randn(2, N, 4), torch.zeros(N, 2), torch.arange(2))
    with pytest.raises(ValueError, match="D=5, T=2 but the statistics hold D=4, T=2"):
        stats.update(torch.randn(2, N, 5), torch.zeros(N, 2), torch.arange(2))


# --------------------------------------------------------------------------- factored per-image targets

def _factored(n_images, n_labels, n_shared, n_lookup=5, seed=0):
    """Random per-image targets kept factored: ``n_shared`` shared columns, then a lookup of per-patch labels."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(N, n_shared, generator=g, dtype=torch.float64) if n_shared else None
    labels = torch.randint(n_labels, (n_images, N), generator=g)
    return FactoredTargets(shared, labels, torch.randn(n_labels, n_lookup, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("n_labels, n_shared", [(7, 3), (7, 0), (500, 2)])  # 500 labels: more than a fold's rows
def test_factored_targets_give_the_statistics_of_their_dense_form(n_labels, n_shared, exact):
    """The shortcut (shared columns from summed images, lookups from per-label token sums) against the plain
    per-image product X^T Y of the dense targets, batch by batch, in a shuffled image order."""
    n_images = 11
    g = torch.Generator().manual_seed(n_labels + n_shared)
    X = (3 + torch.randn(n_images, N, 24, generator=g)).to(torch.float64 if exact else torch.float32)
    Y = _factored(n_images, n_labels, n_shared)
    order = torch.randperm(n_images, generator=g)   # non-consecutive indices: gathered folds
    factored, dense = RidgeStats(n_folds=3, exact=exact), RidgeStats(n_folds=3, exact=exact)
    for batch in (order[:4], order[4:5], order[5:]):
        factored.update(X[batch], Y[batch], batch)
        dense.update(X[batch], Y.dense()[batch], batch)
    for name in ("n", "n_images", "sum_x", "sum_y", "sum_y2", "xtx", "xty"):
        a, b = getattr(factored, name), getattr(dense, name)
        assert a.shape == b.shape, name
        scale = float(b.abs().max()) or 1.0
        assert float((a - b).abs().max()) <= 1e-12 * scale, name
    # and the plain sums themselves, fold by fold
    rows, targets = X.double().reshape(n_images, N, -1), Y.dense(torch.float64)
    for f in range(3):
        xf, yf = rows[f::3].reshape(-1, 24), targets[f::3].reshape(-1, Y.shape[-1])
        torch.testing.assert_close(factored.xty[f], xf.T @ yf, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(factored.sum_y2[f], (yf * yf).sum(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(solve_ridge_cv(factored).cv_r2_, solve_ridge_cv(dense).cv_r2_, rtol=0, atol=1e-10)


def test_factored_targets_check_their_parts_and_stream_through_the_probe():
    from asg_probe.probes import CoordinateProbe

    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        FactoredTargets(None, torch.tensor([[0, 3]]), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="shared must be"):
        FactoredTargets(torch.zeros(3, 1), torch.tensor([[0, 1]]), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="Y must be"):
        RidgeStats(2).update(torch.randn(3, N, 4), _factored(2, 5, 1), torch.arange(3))
    Y = _factored(9, 6, 2)
    assert Y.shape == (9, N, 7) and Y[2:4].shape == (2, N, 7) and torch.equal(Y[2:4].dense(), Y.dense()[2:4])
    X = planted(n_images=9)
    a = CoordinateProbe(n_folds=3, batch_size=4).fit(X, y=Y)        # fit slices the factored targets per chunk
    b = CoordinateProbe(n_folds=3, batch_size=4).fit(X, y=Y.dense())
    np.testing.assert_allclose(a.cv_r2_, b.cv_r2_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-9, atol=1e-12)
