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


def test_shuffled_control_draws_a_fresh_permutation_per_image(monkeypatch):
    import torch.nn.functional as F

    captured, orig = [], F.smooth_l1_loss
    monkeypatch.setattr(F, "smooth_l1_loss", lambda pred, target: captured.append(target) or orig(pred, target))
    head, grid, true = GuidanceHead(8, target="shuffled"), (4, 6), coordinate_targets((4, 6))
    for _ in range(2):
        torch.manual_seed(0)
        head(torch.randn(3, 24, 8), grid)
    rows = captured[0]  # (B, N) row targets of the first call (then its col targets, then the second call)
    assert torch.equal(rows, captured[2])  # reproducible from torch's RNG (what resume restores)
    assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[0], true[:, 0])
    for b in range(3):  # each image's targets are a permutation of the true coordinates
        assert torch.equal(rows[b].sort().values, true[:, 0].sort().values)


def _fit_then_score(make_features, grid, steps=300, target="true"):
    """Train a head on one draw of features, report its loss on a fresh draw."""
    head = GuidanceHead(16, hidden_dim=64, target=target)
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


def test_shuffled_control_cannot_use_perfect_position_information():
    # Features that encode the coordinates exactly: the true target is learnt to ~0,
    # the per-image shuffled target stays at the variance floor (nothing to learn).
    grid = (5, 7)
    torch.manual_seed(0)
    mix = torch.randn(2, 16)
    planted = lambda: (coordinate_targets(grid) @ mix).expand(4, -1, -1) + 1e-3 * torch.randn(4, 35, 16)
    assert _fit_then_score(planted, grid, target="true") < 1e-3
    assert _fit_then_score(planted, grid, target="shuffled") > 0.04


def test_wrong_token_count_is_a_clear_error():
    with pytest.raises(ValueError, match="patch tokens only"):
        GuidanceHead(8)(torch.randn(1, 13, 8), (3, 4))
    with pytest.raises(ValueError, match="target"):
        GuidanceHead(8, target="shufled")


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
