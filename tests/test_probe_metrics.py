"""asg_probe.probes.metrics: held-out cell accuracy and the R² helper."""
import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score

from asg_probe.probes import CellAccuracy, CoordinateProbe, coordinate_targets, r2_columns
from probe_data import GRID, N, planted


def test_r2_columns_is_sklearns_r2_per_column():
    g = torch.Generator().manual_seed(0)
    y, pred = torch.randn(50, 3, generator=g), torch.randn(50, 3, generator=g)
    np.testing.assert_allclose(r2_columns(y, pred), r2_score(y, pred, multioutput="raw_values"), rtol=1e-6)


def test_streamed_cell_accuracy_equals_the_fits_and_counts_every_token_once():
    X = planted(n_images=10)
    probe = CoordinateProbe(n_folds=5).fit(X, grid=GRID)
    for source in (probe, probe.cv_results_):  # a fitted probe or its solve
        acc = CellAccuracy(source, GRID)
        for s in range(0, 10, 4):
            acc.update(X[s:s + 4], torch.arange(s, min(s + 4, 10)))
        assert acc.accuracy == pytest.approx(probe.cell_accuracy_)
        assert acc.accuracy_within_one >= acc.accuracy
        assert acc.total.sum() == 10 * N
        np.testing.assert_allclose(acc.accuracy_map(), probe.cell_accuracy_map_)
    assert acc.chance == 1 / N


def test_a_known_decoding_gives_a_known_accuracy():
    # one feature per axis carrying the cell index exactly, except that image 0's first patch
    # reads the wrong row: 1 token of 6 * 48 is off by one cell
    X = (coordinate_targets(GRID, dtype=torch.float64) * torch.tensor([5.0, 7.0], dtype=torch.float64))
    X = X.expand(6, N, 2).clone()
    probe = CoordinateProbe(n_folds=3, control=False, alphas=[1e-9]).fit(X, grid=GRID)
    X[0, 0, 0] += 1.0
    acc = CellAccuracy(probe, GRID)
    acc.update(X, torch.arange(6))
    assert acc.accuracy == pytest.approx(1 - 1 / (6 * N))
    assert acc.accuracy_within_one == 1.0
    assert acc.accuracy_map()[0, 0] == pytest.approx(5 / 6)


def test_merge_and_all_reduce_add_counts(tmp_path):
    import torch.distributed as dist

    X = planted(n_images=8)
    probe = CoordinateProbe(n_folds=4).fit(X, grid=GRID)
    a, b, whole = CellAccuracy(probe, GRID), CellAccuracy(probe, GRID), CellAccuracy(probe, GRID)
    a.update(X[:3], torch.arange(3))
    b.update(X[3:], torch.arange(3, 8))
    whole.update(X, torch.arange(8))
    torch.testing.assert_close(a.merge(b).correct, whole.correct)
    correct = whole.correct.clone()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        whole.all_reduce()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(whole.correct, correct)  # one rank: the sum is itself


def test_a_wrong_shape_is_a_clear_error():
    probe = CoordinateProbe(n_folds=2).fit(planted(n_images=4), grid=GRID)
    with pytest.raises(ValueError, match=r"X must be \(B, 48, 32\) for grid 6x8"):
        CellAccuracy(probe, GRID).update(torch.randn(2, 16, 32), torch.arange(2))


def test_fold_intervals_are_the_t_interval_of_sklearns_fold_scores():
    from scipy import stats as sps
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from asg_probe.probes import fold_interval

    X = planted(n_images=12, noise=0.5)
    probe = CoordinateProbe(n_folds=4).fit(X, grid=GRID)
    res = probe.cv_results_
    y = coordinate_targets(GRID, dtype=torch.float64).repeat(12, 1).numpy()
    tokens = X.reshape(-1, X.shape[-1]).numpy()
    fold = np.repeat(np.arange(12) % 4, N)
    for col, alpha in enumerate(probe.alpha_):
        scores = []
        for k in range(4):
            model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(tokens[fold != k], y[fold != k, col])
            scores.append(r2_score(y[fold == k, col], model.predict(tokens[fold == k])))
        np.testing.assert_allclose(res.fold_cv_r2_[:, col], scores, rtol=1e-7, atol=1e-9)
        half = sps.t.ppf(0.975, 3) * np.std(scores, ddof=1) / np.sqrt(4)
        lo, hi = fold_interval(res.fold_cv_r2_[:, col])
        np.testing.assert_allclose([lo, hi], [np.mean(scores) - half, np.mean(scores) + half], rtol=1e-7)
        assert lo < probe.cv_r2_[col] < hi and hi - lo > 1e-4   # noisy enough to have a width


def test_a_fold_interval_leaves_out_nan_folds_and_needs_two():
    from asg_probe.probes import fold_interval

    assert fold_interval([0.5, np.nan, 0.7]) == pytest.approx(fold_interval([0.5, 0.7]))
    assert np.isnan(fold_interval([0.5, np.nan])).all()
    assert fold_interval([0.3, 0.3, 0.3]) == [0.3, 0.3]
