"""The probes' 95% intervals cover: the delete-one-fold jackknife with refits (asg_probe.probes.intervals)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from asg_probe.probes import RidgeStats, coordinate_targets, jackknife_cv_r2, jackknife_interval

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_interval_coverage.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_interval_coverage", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_replicate_is_the_cv_r2_recomputed_by_scikit_learn_without_that_fold():
    """Replicate g: every other fold j scored by a Ridge refit on the images outside {j, g}."""
    g = torch.Generator().manual_seed(0)
    Y = coordinate_targets((3, 4), dtype=torch.float64)
    X = Y @ torch.randn(2, 5, generator=g, dtype=torch.float64) + 0.3 * torch.randn(12, 12, 5, generator=g,
                                                                                      dtype=torch.float64)
    stats = RidgeStats(n_folds=4)
    stats.update(X, Y, torch.arange(12))
    alphas = np.array([0.5, 3.0])
    reps = jackknife_cv_r2(stats, alphas, [0, 1])
    folds = np.arange(12) % 4
    for gone in range(4):
        for col, alpha in enumerate(alphas):
            scores = []
            for j in set(range(4)) - {gone}:
                train, test = ~np.isin(folds, [j, gone]), folds == j
                model = make_pipeline(StandardScaler(), Ridge(alpha=alpha))
                model.fit(X[train].reshape(-1, 5).numpy(), Y.repeat(int(train.sum()), 1)[:, col].numpy())
                pred = model.predict(X[test].reshape(-1, 5).numpy())
                y = Y.repeat(int(test.sum()), 1)[:, col].numpy()
                scores.append(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())
            assert reps[gone, col] == pytest.approx(np.mean(scores), abs=1e-9)
    assert np.isnan(jackknife_cv_r2(RidgeStats(n_folds=2), alphas, [0, 1])).all()   # 2 folds: nothing left
    lo, hi = jackknife_interval(0.5, [0.4, 0.5, 0.6])
    assert (lo + hi) / 2 == pytest.approx(0.5) and np.isnan(jackknife_interval(0.5, [0.4])).all()


def test_the_95_percent_interval_covers_the_expected_r2_in_simulation():
    """Synthetic tokens: a per-image random code of (row, col) plus noise, 150 draws of 40 images.

    The target is the expected CV R² at 40 images (its mean over the draws; the population R² of
    an infinitely trained probe is higher, as R² rises with the number of images). Coverage of
    the 300 intervals (row and column) must lie in [0.92, 0.98]; the old t interval over the
    folds is reported beside it by benchmarks/bench_interval_coverage.py.
    """
    bench = _bench()
    est, jack, fold = bench.simulate(150, seed=0)
    truth = est.mean(0)
    cov = bench.coverage(jack, truth[None])
    assert 0.92 <= cov <= 0.98, cov
    assert bench.coverage(fold, truth[None]) < cov          # the old interval, narrower, covers less
