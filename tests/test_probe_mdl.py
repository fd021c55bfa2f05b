"""Minimum description length by the online code, from streamed statistics (asg_probe.probes.mdl)."""
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from asg_probe.probes import RidgeStats, coordinate_targets, online_code, solve_ridge_cv
from asg_probe.probes.mdl import online_blocks

GRID = (4, 4)


def _stats(X, Y, n_folds=5, blocks=6, order=None):
    stats = RidgeStats(n_folds=n_folds, online_blocks=blocks)
    idx = torch.arange(X.shape[0]) if order is None else order
    for part in torch.split(idx, 7):
        stats.update(X[part], Y if Y.ndim == 2 else Y[part], part)
    return stats


def test_planted_position_compresses_far_beyond_one_and_shuffled_targets_do_not():
    g = torch.Generator().manual_seed(0)
    Y = coordinate_targets(GRID)
    planted = Y @ torch.randn(2, 8, generator=g) + 0.01 * torch.randn(60, 16, 8, generator=g)
    stats = _stats(planted, Y)
    code = online_code(stats, solve_ridge_cv(stats).alpha_, [0, 1], GRID)
    assert code["compression"].min() > 20                  # first image sent uniformly, the rest almost free
    # targets shuffled afresh in every image: nothing to learn, every block falls back on the uniform code
    shuffled = torch.stack([Y[torch.randperm(16, generator=g)] for _ in range(60)])
    stats = _stats(torch.randn(60, 16, 8, generator=g), shuffled)
    code = online_code(stats, solve_ridge_cv(stats).alpha_, [0, 1], GRID)
    assert 0.97 < code["compression"].min() and code["compression"].max() <= 1.0
    # one flag bit for each block after the first (which is always sent uniformly)
    assert code["online_bits"] == pytest.approx(code["uniform_bits"] + code["n_blocks"] - 1)


def test_code_lengths_are_the_ones_scikit_learn_ridges_give_block_by_block():
    """Each block sent with a Ridge fit (StandardScaler + Ridge(alpha)) on every block before it."""
    g = torch.Generator().manual_seed(1)
    Y = coordinate_targets(GRID, dtype=torch.float64)
    X = Y @ torch.randn(2, 6, generator=g, dtype=torch.float64) + 0.4 * torch.randn(30, 16, 6, generator=g,
                                                                                      dtype=torch.float64)
    order = torch.randperm(30, generator=g)                 # arrival order does not matter
    stats = _stats(X, Y, blocks=4, order=order)
    alphas = np.array([2.0, 5.0])
    code = online_code(stats, alphas, [0, 1], GRID)
    # the blocks by image index: fold 0's ranks 0 | 1 | 2-3 | 4-7, rest of fold 0, folds 1..4
    idx = np.arange(30)
    rank, fold = idx // 5, idx % 5
    head = [(fold == 0) & (rank == 0), (fold == 0) & (rank == 1), (fold == 0) & (rank >= 2) & (rank < 4),
            (fold == 0) & (rank >= 4) & (rank < 8)]
    blocks = head + [(fold == 0) & (rank >= 8)] + [fold == k for k in range(1, 5)]
    blocks = [b for b in blocks if b.any()]
    assert len(online_blocks(stats)) == len(blocks) == code["n_blocks"]
    delta = 1 / 3
    for col, alpha in enumerate(alphas):
        bits = 16 * blocks[0].sum() * math.log2(4)
        seen = blocks[0].copy()
        for block in blocks[1:]:
            Xt, yt = X[seen].reshape(-1, 6).numpy(), Y.repeat(int(seen.sum()), 1)[:, col].numpy()
            model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(Xt, yt)
            var = max(np.mean((yt - model.predict(Xt)) ** 2), delta ** 2 / (2 * math.pi))
            y = Y.repeat(int(block.sum()), 1)[:, col].numpy()
            sse = ((y - model.predict(X[block].reshape(-1, 6).numpy())) ** 2).sum()
            gauss = y.size * 0.5 * math.log2(2 * math.pi * var / delta ** 2) + sse / (2 * var * math.log(2))
            bits += min(gauss, y.size * math.log2(4)) + 1
            seen |= block
        assert code["online_bits"][col] == pytest.approx(bits, rel=1e-9)
        assert code["compression"][col] == pytest.approx(16 * 30 * 2 / bits, rel=1e-9)


def test_online_blocks_merge_and_round_trip():
    g = torch.Generator().manual_seed(2)
    Y = coordinate_targets(GRID)
    X = torch.randn(25, 16, 5, generator=g)
    whole = _stats(X, Y)
    a, b = RidgeStats(online_blocks=6), RidgeStats(online_blocks=6)
    a.update(X[:11], Y, torch.arange(11))
    b.update(X[11:], Y, torch.arange(11, 25))
    a.merge(b)
    again = RidgeStats.from_state_dict(a.state_dict())
    for stats in (a, again):
        for mine, ref in zip(online_blocks(stats), online_blocks(whole)):
            for m, r in zip(mine, ref):
                torch.testing.assert_close(m, r, rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="keep no online-code blocks"):
        online_blocks(RidgeStats())
