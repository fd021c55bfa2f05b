"""Do the probes' 95% intervals cover? The held-out-scene study, and a simulation of known answer.

**Scenes** (``--scenes``): a bundled reference model probed on ``--sets`` disjoint sets of
``--per-set`` held-out scenes. Each set's interval should contain the mean of the *other* sets'
estimates (the expected R² at that number of images) about 95% of the time. Counted over every
layer and quantity (``r2``, ``r2_row``, ``r2_col``), for the delete-one-fold jackknife that
``layerwise_probes`` reports (``*_ci``) and, for comparison, the old t interval over the folds
(:func:`asg_probe.probes.fold_interval`).

**Simulation** (``--simulate``): synthetic tokens = a per-image random linear code of the
coordinates + noise (D small), many draws; coverage of the expected CV R² at that sample size
(the mean over draws), for both intervals. ``tests/test_probe_intervals.py`` runs a small
version of it.

Usage::

    python benchmarks/bench_interval_coverage.py --scenes guidance --sets 16 --per-set 64
    python benchmarks/bench_interval_coverage.py --simulate --draws 400
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def simulate(draws, n_images=40, grid=(4, 4), dim=8, image_sd=0.5, noise=0.5, n_folds=5, seed=0):
    """``(estimates (draws, 2), jackknife (draws, 2, 2), fold (draws, 2, 2))`` of row and column."""
    from asg_probe.probes import coordinate_targets

    gen = torch.Generator().manual_seed(seed)
    Y = coordinate_targets(grid, dtype=torch.float64)                       # (N, 2)
    base = torch.zeros(2, dim, dtype=torch.float64)
    base[0, 0] = base[1, 1] = 1.0
    est, jack, fold = [], [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # problems this small only lose time to a thread pool
    try:
        for _ in range(draws):
            _draw(gen, Y, base, n_images, dim, image_sd, noise, n_folds, est, jack, fold)
    finally:
        torch.set_num_threads(threads)
    return np.array(est), np.array(jack), np.array(fold)


def _draw(gen, Y, base, n_images, dim, image_sd, noise, n_folds, est, jack, fold):
    """One synthetic data set, its CV R² and both intervals, appended to ``est``, ``jack``, ``fold``."""
    from asg_probe.probes import (RidgeStats, fold_interval, jackknife_cv_r2, jackknife_interval,
                                  solve_ridge_cv)

    # every image codes position with its own perturbed map: between-image variance, as in real images
    maps = base + image_sd * torch.randn(n_images, 2, dim, generator=gen, dtype=torch.float64)
    X = torch.einsum("nt,btd->bnd", Y, maps) + noise * torch.randn(n_images, Y.shape[0], dim, generator=gen,
                                                                  dtype=torch.float64)
    stats = RidgeStats(n_folds=n_folds)
    stats.update(X, Y, torch.arange(n_images))
    res = solve_ridge_cv(stats, alphas=[0.1, 10.0])
    reps = jackknife_cv_r2(stats, res.alpha_, [0, 1])
    est.append(res.cv_r2_)
    jack.append([jackknife_interval(res.cv_r2_[c], reps[:, c]) for c in range(2)])
    fold.append([fold_interval(res.fold_cv_r2_[:, c]) for c in range(2)])


def coverage(intervals, truth):
    """Fraction of ``intervals`` (..., 2) containing ``truth`` (broadcast)."""
    return float(((intervals[..., 0] <= truth) & (truth <= intervals[..., 1])).mean())


def scenes(name, sets, per_set, batch_size=64):
    import asg_probe
    from asg_probe.probes import fold_interval
    from asg_probe.scenes import SceneDataset

    model = asg_probe.load_reference_model(name)
    images = SceneDataset(sets * per_set, split="val").images()
    keys = ("r2", "r2_row", "r2_col")
    est, jack, fold = [], [], []
    for s in range(sets):
        res = asg_probe.layerwise_probes(model, images[s * per_set:(s + 1) * per_set], num_images=per_set,
                                         batch_size=batch_size, progress=False, init_baseline=False)
        est.append([[row[k] for k in keys] for row in res.rows])
        jack.append([[row[f"{k}_ci"] for k in keys] for row in res.rows])
        per_layer = []
        for row in res.rows:
            f = res.probe(row["layer"]).cv_results_.fold_cv_r2_
            per_layer.append([fold_interval(0.5 * (f[:, 0] + f[:, 1])), fold_interval(f[:, 0]),
                              fold_interval(f[:, 1])])
        fold.append(per_layer)
    est, jack, fold = np.array(est), np.array(jack), np.array(fold)       # (sets, layers, 3[, 2])
    others = (est.sum(0, keepdims=True) - est) / (sets - 1)               # the other sets' mean
    return est, jack, fold, others


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", metavar="MODEL", help="a bundled reference model, e.g. guidance")
    p.add_argument("--sets", type=int, default=16)
    p.add_argument("--per-set", type=int, default=64)
    p.add_argument("--simulate", action="store_true")
    p.add_argument("--draws", type=int, default=400)
    args = p.parse_args(argv)
    if args.simulate:
        t = time.perf_counter()
        est, jack, fold = simulate(args.draws)
        truth = est.mean(0)
        print(f"simulation: {args.draws} draws, expected CV R² row/col {truth.round(3).tolist()} "
              f"(sd over draws {est.std(0).round(3).tolist()}), {time.perf_counter() - t:.0f} s")
        print(f"  jackknife 95% coverage {coverage(jack, truth[None]):.3f}, "
              f"mean width {float((jack[..., 1] - jack[..., 0]).mean()):.3f}")
        print(f"  fold t    95% coverage {coverage(fold, truth[None]):.3f}, "
              f"mean width {float((fold[..., 1] - fold[..., 0]).mean()):.3f}")
    if args.scenes:
        t = time.perf_counter()
        est, jack, fold, others = scenes(args.scenes, args.sets, args.per_set)
        print(f"{args.scenes}: {args.sets} disjoint sets of {args.per_set} held-out scenes, "
              f"{est.shape[1]} layers x (r2, r2_row, r2_col), {time.perf_counter() - t:.0f} s")
        for name, iv in (("jackknife (r2_ci)", jack), ("fold t (old)", fold)):
            last_col = coverage(iv[:, -1, 2], others[:, -1, 2])
            print(f"  {name}: coverage {coverage(iv, others):.3f} over all; last layer column "
                  f"{int(round(last_col * args.sets))}/{args.sets}")
        spread = est[:, -1, 2].std(ddof=1)
        se_jack = float(np.mean((jack[:, -1, 2, 1] - jack[:, -1, 2, 0]) / 2 / 2.776))
        print(f"  last-layer r2_col: sd across sets {spread:.4f}, mean jackknife se {se_jack:.4f}")


if __name__ == "__main__":
    main()
