"""asg_probe.probes.mlp and .reservoir: the non-linear probe and its bounded token sample."""
import torch

from asg_probe.probes import MLPProbe, TokenReservoir, coordinate_targets
from probe_data import GRID, N, planted


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


def test_merged_reservoirs_equal_one_that_saw_everything():
    X = planted(n_images=6).float()
    Y = coordinate_targets(GRID)
    whole, first, second = (TokenReservoir(max_tokens=40, seed=2) for _ in range(3))
    whole.update(X, Y, torch.arange(6))
    first.update(X[:2], Y, torch.arange(2))
    second.update(X[2:], Y, torch.arange(2, 6))
    merged = first.merge(second)
    torch.testing.assert_close(merged.keys.sort().values, whole.keys.sort().values)


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
