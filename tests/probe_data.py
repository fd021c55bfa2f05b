"""Planted data shared by the probe tests (tests/test_probe_*.py): tokens with a known position code."""
import torch

from asg_probe.probes import RidgeStats, coordinate_targets

GRID = (6, 8)  # non-square on purpose: catches row/col mix-ups
N = GRID[0] * GRID[1]


def planted(n_images=20, d_signal=16, d_noise=16, noise=0.01, seed=0):
    """Tokens that encode (row, col) linearly, plus irrelevant random dimensions, float64."""
    g = torch.Generator().manual_seed(seed)
    coords = coordinate_targets(GRID, dtype=torch.float64)
    W = torch.randn(2, d_signal, generator=g, dtype=torch.float64)
    signal = coords @ W + noise * torch.randn(n_images, N, d_signal, generator=g, dtype=torch.float64)
    junk = torch.randn(n_images, N, d_noise, generator=g, dtype=torch.float64)
    return torch.cat([signal, junk], dim=-1)


def stats_of(X, Y, index, batch, n_folds=4, exact=False):
    """:class:`RidgeStats` of ``X`` streamed in batches of ``batch`` images."""
    stats = RidgeStats(n_folds=n_folds, exact=exact)
    for s in range(0, X.shape[0], batch):
        stats.update(X[s:s + batch], Y, index[s:s + batch])
    return stats
