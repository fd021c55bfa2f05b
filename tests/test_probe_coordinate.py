"""asg_probe.probes.coordinate: the CoordinateProbe estimator, in memory and streamed."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from asg_probe.probes import TARGET_NAMES, CoordinateProbe, RidgeStats, coordinate_targets, probe_targets
from probe_data import GRID, N, planted

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


def test_more_features_than_tokens_is_fine():
    g = torch.Generator().manual_seed(0)
    coords = coordinate_targets((3, 4), dtype=torch.float64)
    X = coords @ torch.randn(2, 300, generator=g, dtype=torch.float64)
    X = X + 0.05 * torch.randn(6, 12, 300, generator=g, dtype=torch.float64)  # 72 tokens, D=300
    probe = CoordinateProbe(n_folds=3, control=False).fit(X, grid=(3, 4))
    assert np.all(np.isfinite(probe.coef_))
    assert probe.cv_r2_.min() > 0.9


def test_a_grid_without_rows_gives_an_undefined_row_score():
    grid = (1, 8)
    g = torch.Generator().manual_seed(0)
    X = coordinate_targets(grid) @ torch.randn(2, 6, generator=g) + 0.01 * torch.randn(6, 8, 6, generator=g)
    probe = CoordinateProbe(n_folds=3, control=False).fit(X, grid=grid)
    assert np.isnan(probe.cv_r2_[0]) and probe.cv_r2_[1] > 0.99
    assert np.all(np.isfinite(probe.coef_))


# --------------------------------------------------------------------------- three routes, one model

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partial_fit_in_any_batch_order_equals_fit(seed):
    X = planted(n_images=11, noise=0.3).float()
    whole = CoordinateProbe(n_folds=4).fit(X, grid=GRID)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(11, generator=g)
    sizes = torch.randint(1, 5, (11,), generator=g).tolist()
    streamed, start = CoordinateProbe(n_folds=4), 0
    for size in sizes:
        part = order[start:start + size]
        if len(part):
            assert streamed.partial_fit(X[part], part, grid=GRID) is streamed
        start += size
    assert not hasattr(streamed, "coef_")  # nothing solved until finalize
    streamed.all_reduce().finalize()      # all_reduce: a no-op in one process
    assert streamed.n_images_ == 11 and streamed.grid_ == GRID
    for name in ("cv_r2_", "control_cv_r2_", "alpha_"):
        np.testing.assert_allclose(getattr(streamed, name), getattr(whole, name), rtol=1e-9, atol=1e-12)
    for name in ("coef_", "intercept_", "fold_coef_", "fold_intercept_"):
        np.testing.assert_allclose(getattr(streamed, name), getattr(whole, name), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(streamed.predict(X), whole.predict(X), rtol=1e-7, atol=1e-9)


def test_partial_fit_with_per_image_targets():
    X = planted(n_images=8)
    Y = probe_targets(GRID, control=False).double().expand(8, N, 2)
    probe = CoordinateProbe(n_folds=4, control=False)
    for s in (0, 3, 6):
        probe.partial_fit(X[s:s + 3], torch.arange(s, min(s + 3, 8)), y=Y[s:s + 3], target_names=("r", "c"))
    probe.finalize()
    reference = CoordinateProbe(n_folds=4, control=False).fit(X, grid=GRID)
    assert probe.target_names_ == ("r", "c")
    np.testing.assert_allclose(probe.cv_r2_, reference.cv_r2_, rtol=1e-9)


def test_fit_stats_equals_fit():
    X = planted(n_images=10)
    probe = CoordinateProbe(n_folds=5).fit(X, grid=GRID)
    stats = RidgeStats(n_folds=5, target_names=TARGET_NAMES)
    for s in range(0, 10, 3):
        stats.update(X[s:s + 3], probe_targets(GRID), torch.arange(s, min(s + 3, 10)))
    streamed = CoordinateProbe(n_folds=5).fit_stats(stats)
    np.testing.assert_allclose(streamed.coef_, probe.coef_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(streamed.control_cv_r2_, probe.control_cv_r2_, rtol=1e-9, atol=1e-12)
    assert streamed.stats_ is stats and streamed.cell_accuracy_ is None


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


# --------------------------------------------------------------------------- column subsets and held-out use

def test_a_probe_per_column_subset_of_one_solve():
    X = planted(n_images=10, noise=0.3)
    probe = CoordinateProbe(n_folds=5).fit(X, grid=GRID)
    control = probe.select([2, 3])
    res = probe.cv_results_
    assert control.target_names_ == ("control_row", "control_col") and control.control_cv_r2_ is None
    np.testing.assert_array_equal(control.cv_r2_, probe.control_cv_r2_)
    np.testing.assert_array_equal(control.coef_, res.coef_[2:])
    # the control task fitted on its own (the permuted targets as plain y) is the same model
    alone = CoordinateProbe(n_folds=5, control=False).fit(X, probe_targets(GRID)[:, 2:])
    np.testing.assert_allclose(control.cv_r2_, alone.cv_r2_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(control.predict(X), alone.predict(X), rtol=1e-7, atol=1e-9)
    rebuilt = CoordinateProbe.from_cv_results(res, columns=[0, 1], control_columns=[2, 3], grid=GRID)
    assert rebuilt.n_folds == 5 and rebuilt.grid_ == GRID
    np.testing.assert_array_equal(rebuilt.selectivity_, probe.selectivity_)
    with pytest.raises(ValueError, match="column 4 does not exist"):
        probe.select([3, 4])
    light = probe.without_stats()
    assert not hasattr(light, "stats_") and probe.stats_ is not None  # a copy: the original keeps them
    np.testing.assert_array_equal(light.predict(X), probe.predict(X))


def test_held_out_predictions_come_from_the_fold_that_never_saw_the_image():
    X = planted(n_images=8, noise=0.3)
    probe = CoordinateProbe(n_folds=4).fit(X, grid=GRID)
    index = torch.tensor([5, 2])
    pred = probe.predict_heldout(X[index], index)
    for i, image in enumerate(index.tolist()):
        f = image % 4
        expected = X[image] @ torch.as_tensor(probe.fold_coef_[f]).T + torch.as_tensor(probe.fold_intercept_[f])
        torch.testing.assert_close(pred[i], expected)
    assert not torch.allclose(pred, probe.predict(X[index]))  # the refit on all images differs


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


def test_refitting_forgets_the_previous_data():
    X = planted(n_images=8)
    noise = torch.randn(8, N, X.shape[-1], dtype=torch.float64)
    probe = CoordinateProbe(n_folds=4).fit(noise, grid=GRID)
    probe.fit(X, grid=GRID)
    np.testing.assert_array_equal(probe.coef_, CoordinateProbe(n_folds=4).fit(X, grid=GRID).coef_)
    probe.partial_fit(X[:2], torch.arange(2), grid=GRID)  # new data: the old solve is dropped
    assert not hasattr(probe, "coef_") and probe.stats_.n_images.sum() == 10


def test_one_dimensional_targets():
    X = planted(n_images=8)
    rows = coordinate_targets(GRID)[:, 0]
    probe = CoordinateProbe(n_folds=4).fit(X, rows)
    assert probe.predict(X).shape == (8, N)
    assert probe.score(X, rows) > 0.99


def test_all_reduce_under_torch_distributed_happens_once(tmp_path):
    import torch.distributed as dist

    X = planted(n_images=8)
    probe = CoordinateProbe(n_folds=4).partial_fit(X, torch.arange(8), grid=GRID)
    before = [t.clone() for t in probe.stats_._tensors()]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        probe.all_reduce().all_reduce()
        with pytest.raises(ValueError, match="already summed over processes"):
            probe.partial_fit(X, torch.arange(8), grid=GRID)
    finally:
        dist.destroy_process_group()
    for a, b in zip(before, probe.stats_._tensors()):
        torch.testing.assert_close(a, b)  # one rank: the sum is itself


@pytest.mark.parametrize("call, message", [
    (lambda: CoordinateProbe(n_folds=5).fit(torch.randn(3, N, 4), grid=GRID), "at least 5 images, got 3"),
    (lambda: CoordinateProbe().fit(torch.randn(6, N, 4, 2)), "must be 2-D or 3-D"),
    (lambda: CoordinateProbe().fit(torch.randn(6, N, 4)), "cannot infer a grid from 48"),
    (lambda: CoordinateProbe().fit(torch.randn(6, N, 4), grid=(7, 7)), "grid 7x7 has 49 cells"),
    (lambda: CoordinateProbe().fit(torch.randn(60, 4), np.zeros(60)), "needs both y and groups"),
    (lambda: CoordinateProbe(alphas=[0.0, 1.0]).fit(torch.randn(6, N, 4), grid=GRID), "positive"),
    (lambda: CoordinateProbe(n_folds=1).fit(torch.randn(6, N, 4), grid=GRID), "n_folds must be >= 2"),
    (lambda: CoordinateProbe(method="qr").fit(torch.randn(6, N, 4), grid=GRID), "method must be one of"),
    (lambda: CoordinateProbe().fit(torch.randn(6, N, 4), torch.zeros(5, 2)), "y must be"),
    (lambda: CoordinateProbe().predict(torch.randn(2, 4)), "not fitted"),
    (lambda: CoordinateProbe().finalize(), "call partial_fit first"),
    (lambda: CoordinateProbe().all_reduce(), "call partial_fit first"),
    (lambda: CoordinateProbe().partial_fit(torch.randn(2, N, 4), torch.arange(2), grid=GRID)
     .partial_fit(torch.randn(2, 16, 4), torch.arange(2)), "every batch must match"),
])
def test_bad_input_raises_a_one_line_value_error(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)
    assert "\n" not in str(err.value)
