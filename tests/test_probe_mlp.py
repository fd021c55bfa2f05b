"""asg_probe.probes.mlp and .reservoir: the non-linear probe and its bounded token sample."""
import numpy as np
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


def test_the_mlp_probes_image_bootstrap_covers_a_fixed_predictors_r2():
    """Held-out R² of a fixed predictor whose error level varies by image: 200 draws of 30 images.

    Population R² = 1 - E[error²] / Var(y) = 1 - 0.3² E[s²] / (1/12), s ~ U(0.5, 1.5) per image."""
    from asg_probe.probes.mlp import image_bootstrap_r2

    g = torch.Generator().manual_seed(0)
    truth = 1 - 0.09 * (1 + 1 / 12) / (1 / 12)
    hits = 0
    for _ in range(200):
        image = torch.arange(30).repeat_interleave(16)
        y = torch.rand(480, 1, generator=g)
        scale = (0.5 + torch.rand(30, generator=g))[image][:, None]
        ci, n = image_bootstrap_r2(y, y + 0.3 * scale * torch.randn(480, 1, generator=g), image, n_boot=400)
        hits += int(ci[0, 0] <= truth <= ci[0, 1])
    assert n == 30 and 0.90 <= hits / 200 <= 0.98, hits


def test_the_mlp_probe_reports_its_held_out_interval_and_image_count():
    g = torch.Generator().manual_seed(0)
    c = coordinate_targets(GRID)
    X = c @ torch.randn(2, 8, generator=g) + 0.05 * torch.randn(20, N, 8, generator=g)
    mlp = MLPProbe(steps=20).fit(X, grid=GRID)
    assert mlp.n_heldout_images_ == 4 and mlp.heldout_r2_ci_.shape == (2, 2)
    assert np.all(mlp.heldout_r2_ci_[:, 0] <= mlp.heldout_r2_) and np.all(mlp.heldout_r2_ <= mlp.heldout_r2_ci_[:, 1])
