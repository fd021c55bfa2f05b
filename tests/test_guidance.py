"""Active Spatial Guidance head: targets, loss on planted and noise features, control, export."""
import pytest
import torch

import asg_probe
from asg_probe.layers.guidance import GuidanceHead, coordinate_targets


def test_targets_for_non_square_grid():
    t = coordinate_targets((2, 3))
    assert t.tolist() == [[0, 0], [0, 0.5], [0, 1], [1, 0], [1, 0.5], [1, 1]]
    t = coordinate_targets((3, 5))
    assert t[7].tolist() == [0.5, 0.5] and t[-1].tolist() == [1.0, 1.0]
    assert coordinate_targets((1, 4))[:, 0].abs().sum() == 0  # a single row sits at 0


def test_random_control_is_a_fixed_permutation():
    head = GuidanceHead(8, target="random", seed=3)
    a, b = head.targets((4, 6)), head.targets((4, 6))
    true = coordinate_targets((4, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a, true)
    # same multiset of coordinates, only reassigned to other slots
    assert torch.equal(a[torch.argsort(a[:, 0] * 10 + a[:, 1])], true[torch.argsort(true[:, 0] * 10 + true[:, 1])])
    assert not torch.equal(GuidanceHead(8, target="random", seed=4).targets((4, 6)), a)


def _fit_then_score(make_features, grid, steps=300):
    """Train a head on one draw of features, report its loss on a fresh draw."""
    head = GuidanceHead(16, hidden_dim=64)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    train = make_features()
    for _ in range(steps):
        loss = head(train, grid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return head(make_features(), grid).item()


def test_loss_near_zero_on_linear_coordinates_and_large_on_noise():
    grid = (5, 7)
    mix = torch.randn(2, 16)
    coords = coordinate_targets(grid)
    loss_planted = _fit_then_score(lambda: (coords @ mix).expand(4, -1, -1) + 1e-3 * torch.randn(4, 35, 16), grid)
    loss_noise = _fit_then_score(lambda: torch.randn(4, 35, 16), grid)
    assert loss_planted < 1e-3
    # Noise carries no position: on fresh noise the loss is at least the variance floor
    # (SmoothL1 ≈ ½·Var ≈ 0.04 for evenly spread coordinates on [0, 1]).
    assert loss_noise > 0.04 and loss_noise > 40 * loss_planted


def test_wrong_token_count_is_a_clear_error():
    with pytest.raises(ValueError, match="patch tokens only"):
        GuidanceHead(8)(torch.randn(1, 13, 8), (3, 4))
    with pytest.raises(ValueError, match="target"):
        GuidanceHead(8, target="shuffled")


def test_exported_model_has_no_guidance_parameters(tmp_path):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    head = GuidanceHead(model.embed_dim)
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    head(feats[:, model.num_prefix_tokens:], (8, 8)).backward()
    path = asg_probe.save_checkpoint(tmp_path / "m", model)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("row_head" in k or "col_head" in k for k in keys)
    assert asg_probe.load_checkpoint(path).pos == "none"
