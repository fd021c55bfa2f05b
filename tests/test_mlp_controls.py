"""The MLP probe's controls (asg_probe.probes.mlp_controls, asg_probe.analysis.layerwise.mlp_layer_probe):
the slot control and the random-initialisation baseline, with the linear probe's meanings."""
import numpy as np
import pytest
import torch
from scipy.stats import t as student_t

import asg_probe
from asg_probe.analysis.layerwise import mlp_layer_probe
from asg_probe.probes import TokenReservoir, coordinate_targets, slot_control_targets
from asg_probe.probes.mlp import mlp_controls

GRID, IMAGES = (4, 4), 40


def _reservoir(X, seeds=(0, 1)):
    res = TokenReservoir()
    res.update(X, torch.cat([coordinate_targets(GRID), slot_control_targets(GRID, list(seeds))], 1),
               torch.arange(X.shape[0]))
    return res


def test_the_slot_control_is_solved_when_handed_slot_identity_and_not_when_it_is_taken_away():
    g = torch.Generator().manual_seed(0)
    N = GRID[0] * GRID[1]
    # handed the answer: each slot a one-hot code of its identity (no geometry), and a little noise
    identity = torch.eye(N).expand(IMAGES, N, N) + 0.01 * torch.randn(IMAGES, N, N, generator=g)
    # taken away: every token of an image the same random content vector, so nothing tells slots apart
    content = torch.randn(IMAGES, 1, N, generator=g).expand(IMAGES, N, N)
    handed = mlp_controls(_reservoir(identity), 2, steps=150)
    taken = mlp_controls(_reservoir(content), 2, steps=150)
    assert handed["mlp_n_control_seeds"] == 2 and handed["mlp_n_heldout_images"] == IMAGES // 5
    assert handed["mlp_r2_control"] > 0.95 and handed["mlp_r2"] > 0.95
    # near 0: with nothing to tell slots apart the best an MLP can do is the mean coordinate; what it
    # memorises of the training images' content costs it a little on held-out images (measured -0.14)
    assert abs(taken["mlp_r2_control"]) < 0.25 and abs(taken["mlp_r2"]) < 0.25
    for out in (handed, taken):
        assert out["mlp_selectivity"] == pytest.approx(out["mlp_r2"] - out["mlp_r2_control"])
        low, high = out["mlp_r2_control_ci"]
        assert low <= out["mlp_r2_control"] <= high
        assert "mlp_r2_init" not in out        # no init reservoirs, no init fields


def test_a_randomly_initialised_model_scores_its_own_mlp_init_baseline():
    """A model straight from its constructor is one more draw of the init distribution: its MLP R² lies in the
    99% prediction interval of the init seeds, mlp_r2_init ± t(0.995, S - 1) sd sqrt(1 + 1/S)."""
    torch.manual_seed(3)
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    images = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = mlp_layer_probe(model, images, n_control_seeds=0, n_init_seeds=3, steps=100)
    S = out["mlp_n_init_seeds"]
    assert (out["layer"], S, out["num_images"]) == (1, 3, 20) and "mlp_r2_control" not in out
    half = student_t.ppf(0.995, S - 1) * out["mlp_r2_init_std"] * np.sqrt(1 + 1 / S)
    assert abs(out["mlp_r2"] - out["mlp_r2_init"]) <= max(half, 1e-3)
    for name in ("mlp_r2", "mlp_r2_row", "mlp_r2_col"):
        assert out[f"{name}_gain"] == pytest.approx(out[name] - out[f"{name}_init"])
        low, high = out[f"{name}_init_ci"]
        assert low <= out[f"{name}_init"] <= high
