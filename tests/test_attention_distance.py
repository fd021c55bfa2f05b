"""Mean attention distance: analytic answers, streaming, result contract, timm end to end."""
import itertools
import os

import numpy as np
import pytest
import timm
import torch

import asg_probe
from asg_probe.extract import Accumulator
from asg_probe.analysis.attention_distance import (AttentionDistanceAccumulator, AttentionDistanceResult,
                                                   attention_distance, mean_attention_distance,
                                                   pairwise_distances, patch_centres, uniform_distance)


def _brute_centres(grid, patch):
    """Independent numpy reference: (y, x) pixel centres, row-major."""
    return np.array([((r + 0.5) * patch, (c + 0.5) * patch) for r in range(grid[0]) for c in range(grid[1])])


def _brute_distance(attn, grid, patch, prefix):
    """Per-head mean distance by loops over images and queries (numpy, float64)."""
    pts = _brute_centres(grid, patch)
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    a = attn.double().numpy()[:, :, prefix:, prefix:]
    out = np.zeros(a.shape[1])
    for b, h, q in itertools.product(range(a.shape[0]), range(a.shape[1]), range(a.shape[2])):
        w = a[b, h, q] / a[b, h, q].sum()
        out[h] += (w * d[q]).sum()
    return out / (a.shape[0] * a.shape[2])


def test_centres_and_distances_on_a_non_square_grid():
    np.testing.assert_allclose(patch_centres((3, 5), 8).numpy(), _brute_centres((3, 5), 8))
    d = pairwise_distances((3, 5), 8)
    assert d.shape == (15, 15) and torch.equal(d, d.T) and d.diagonal().abs().max() == 0
    assert d[0, 14].item() == pytest.approx(np.hypot(2 * 8, 4 * 8))
    assert patch_centres((2, 1), (4, 10)).tolist() == [[2.0, 5.0], [6.0, 5.0]]  # (h, w) patches


def test_uniform_attention_on_14x14_grid_gives_116_5_px():
    pts = _brute_centres((14, 14), 16)
    brute = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).mean()
    assert brute == pytest.approx(116.5, abs=0.1)
    assert uniform_distance((14, 14), 16) == pytest.approx(brute, rel=1e-12)
    n = 1 + 196
    attn = torch.full((2, 3, n, n), 1.0 / n, dtype=torch.float64)  # uniform over the cls token too
    total, count = mean_attention_distance(attn, (14, 14), 16, num_prefix_tokens=1)
    assert count == 2 * 196 and total.dtype == torch.float64
    np.testing.assert_allclose((total / count).numpy(), brute, rtol=1e-12)
    total32, _ = mean_attention_distance(attn.float(), (14, 14), 16, num_prefix_tokens=1)
    np.testing.assert_allclose((total32 / count).numpy(), brute, rtol=1e-5)


def test_identity_attention_gives_zero():
    n = 2 + 12
    total, count = mean_attention_distance(torch.eye(n).expand(2, 3, n, n), (3, 4), 8, num_prefix_tokens=2)
    assert count == 24 and total.abs().max() == 0


def test_prefix_tokens_are_dropped_and_patch_weights_renormalised():
    grid, prefix, patch = (3, 4), 2, 8
    g = torch.Generator().manual_seed(0)
    patch_part = torch.rand(1, 2, 12, 12, generator=g, dtype=torch.float64)
    patch_part = patch_part / patch_part.sum(-1, keepdim=True)
    # each query puts 90% of its mass on the first prefix token, 10% spread as patch_part
    attn = torch.zeros(1, 2, prefix + 12, prefix + 12, dtype=torch.float64)
    attn[..., 0] = 0.9
    attn[..., prefix:, prefix:] = 0.1 * patch_part
    attn[..., :prefix, :] = 1.0 / (prefix + 12)  # prefix queries: ignored whatever they do
    total, count = mean_attention_distance(attn, grid, patch, prefix)
    expected = _brute_distance(patch_part, grid, patch, 0)  # the renormalised patch part alone
    np.testing.assert_allclose((total / count).numpy(), expected, rtol=1e-12)


def test_random_attention_on_a_non_square_grid_matches_brute_force():
    grid, prefix, patch = (3, 5), 1, 8
    attn = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).softmax(-1)
    total, count = mean_attention_distance(attn, grid, patch, prefix)
    np.testing.assert_allclose((total / count).numpy(), _brute_distance(attn, grid, patch, prefix), rtol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        mean_attention_distance(attn, (4, 4), patch, prefix)


def test_accumulator_streams_and_combines_batches():
    grid, prefix = (3, 5), 1
    attn = torch.rand(4, 2, 16, 16, generator=torch.Generator().manual_seed(2)).softmax(-1)
    whole = AttentionDistanceAccumulator(8, prefix)
    whole.add({1: attn, 2: attn.flip(-1)}, grid)
    split = AttentionDistanceAccumulator(8, prefix)
    for part in attn.split(1):  # batch by batch, reduced right away as run_analyses does
        split.add({1: split.attention(part, grid), 2: split.attention(part.flip(-1), grid)}, grid)
    whole.all_reduce()  # one process: nothing to combine, nothing changes
    a, b = whole.result("x"), split.result("x")
    assert a.num_images == b.num_images == 4
    for layer in (1, 2):
        np.testing.assert_allclose(a.heads_px[layer], b.heads_px[layer], rtol=1e-6)
    np.testing.assert_allclose(a.heads_px[1], _brute_distance(attn, grid, 8, prefix), rtol=1e-5)
    with pytest.raises(ValueError, match="grid changed"):
        whole.add({1: torch.rand(1, 2, 17, 17)}, (4, 4))
    with pytest.raises(ValueError, match="nothing to summarise"):
        AttentionDistanceAccumulator(8, 1).result()


def test_result_contract_frame_and_plot(tmp_path):
    res = AttentionDistanceResult({2: [30.0, 50.0], 1: [10.0, 20.0]}, patch_size=16, grid=(4, 6),
                                  checkpoint="tiny", num_images=3)
    doc = res.to_dict()
    assert {"checkpoint", "patch_size", "layers"} <= set(doc)
    assert doc["checkpoint"] == "tiny" and doc["patch_size"] == 16
    assert doc["uniform_px"] == pytest.approx(uniform_distance((4, 6), 16))
    assert doc["layers"] == [
        {"layer": 1, "heads_px": [10.0, 20.0], "mean_px": 15.0, "heads_grid": [0.625, 1.25]},
        {"layer": 2, "heads_px": [30.0, 50.0], "mean_px": 40.0, "heads_grid": [1.875, 3.125]},
    ]
    frame = res.to_frame()
    assert list(frame.columns) == ["layer", "head", "distance_px", "distance_grid"] and len(frame) == 4
    assert frame.iloc[3].tolist() == [2, 1, 50.0, 50.0 / 16]
    fig = res.plot()
    ax = fig.axes[0]
    assert ax.get_ylabel() == "mean attention distance (px)"
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(res.uniform_px)
    import matplotlib.pyplot as plt

    plt.close(fig)
    assert [p.name for p in res.save(tmp_path)] == ["attention_distance.json", "attention_distance.csv",
                                                    "attention_distance.png"]


def _timm_model(name):
    if name == "vit":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2)
    if name == "vit-nocls":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                                 class_token=False, global_pool="avg")
    kw = dict(use_rot_pos_emb=True) if name == "eva-rope" else dict(use_abs_pos_emb=True, use_rot_pos_emb=False)
    return timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=64, depth=2,
                             embed_dim=96, num_heads=3, **kw)


@pytest.mark.parametrize("name", ["vit", "vit-nocls", "eva-rope", "eva-ape"])
def test_timm_end_to_end_fused_equals_unfused(name):
    model = _timm_model(name).train()  # attention_distance evaluates in eval mode, then restores
    x = torch.randn(2, 3, 64, 64)
    fused = attention_distance(model, x, progress=False, label=name)
    assert model.training
    attn_modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert all(m.fused_attn for m in attn_modules)
    for m in attn_modules:
        m.fused_attn = False
    unfused = attention_distance(model, x, batch_size=1, progress=False).to_dict()  # two batches of 1
    doc = fused.to_dict()
    assert doc["checkpoint"] == name and doc["patch_size"] == 16 and doc["num_images"] == 2
    assert [r["layer"] for r in doc["layers"]] == [1, 2]
    heads = model.blocks[0].attn.num_heads
    for a, b in zip(doc["layers"], unfused["layers"]):
        assert len(a["heads_px"]) == heads
        assert all(0 < v < 4 * 16 * 2 ** 0.5 for v in a["heads_px"])  # within the 4x4 grid's diagonal
        np.testing.assert_allclose(a["heads_px"], b["heads_px"], atol=1e-4)


@pytest.mark.parametrize("pos", ["none", "alibi2d", "sdt-decay"])
def test_spatialvit_fused_equals_unfused(pos):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos=pos, depth=2)
    x = torch.randn(2, 3, 32, 32)
    fused = attention_distance(model, x, progress=False).to_dict()
    for block in model.blocks:
        block.attn.fused_attn = False
    unfused = attention_distance(model, x, progress=False).to_dict()
    for a, b in zip(fused["layers"], unfused["layers"]):
        np.testing.assert_allclose(a["heads_px"], b["heads_px"], atol=1e-4)


def test_zero_queries_give_the_uniform_baseline_and_decay_shortens_it():
    x = torch.randn(2, 3, 32, 32)
    flat = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    decay = asg_probe.create_model("vit_tiny_patch4_32", pos="rmt-decay", depth=1)
    for model in (flat, decay):
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight.zero_()  # q = k = 0: attention = softmax(bias)
            model.blocks[0].attn.q_bias.zero_()
    uniform = attention_distance(flat, x, progress=False).to_dict()["layers"][0]
    assert uniform["mean_px"] == pytest.approx(uniform_distance((8, 8), 4), rel=1e-5)
    heads = attention_distance(decay, x, progress=False).to_dict()["layers"][0]["heads_px"]
    assert all(h < uniform["mean_px"] for h in heads)
    assert heads == sorted(heads)  # larger γ (later heads) decays more slowly: looks further


_WORKER = """
import os, sys, torch, torch.distributed as dist
from asg_probe.analysis.attention_distance import AttentionDistanceAccumulator
dist.init_process_group("gloo")
attn = torch.load(sys.argv[1])
acc = AttentionDistanceAccumulator(8, 1)
if dist.get_rank() == 0:  # rank 1 sees no image at all (more processes than batches)
    acc.add({1: attn[:1]}, (3, 5))
    acc.add({1: attn[1:]}, (3, 5))
acc.all_reduce()
torch.save(acc.result().heads_px, sys.argv[2] + f"/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


def test_all_reduce_sums_over_processes(tmp_path):
    import socket
    import subprocess
    import sys

    attn = torch.rand(2, 2, 16, 16, generator=torch.Generator().manual_seed(3)).softmax(-1)
    torch.save(attn, tmp_path / "attn.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / "attn.pt"), str(tmp_path)],
                                      env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    single = AttentionDistanceAccumulator(8, 1)
    single.add({1: attn}, (3, 5))
    expected = single.result().heads_px[1]
    for rank in (0, 1):
        np.testing.assert_allclose(torch.load(tmp_path / f"rank{rank}.pt")[1], expected, rtol=1e-9)


def test_attention_distance_equals_a_hand_written_capture_loop():
    # attention_distance goes through extract.run_analyses; the same numbers must come
    # from full maps recorded by capture_attention and reduced afterwards.
    from asg_probe.capture import capture_attention

    model = _timm_model("eva-rope").eval()
    x = torch.randn(3, 3, 64, 64)
    by_hand = AttentionDistanceAccumulator(16, model.num_prefix_tokens)
    for part in x.split(2):
        with torch.no_grad(), capture_attention(model) as rec:
            model.forward_features(part)
        by_hand.add(rec.attn, (4, 4))
    direct = attention_distance(model, x, batch_size=2, progress=False)
    assert direct.num_images == 3 and sorted(direct.heads_px) == [1, 2]
    for layer in (1, 2):
        np.testing.assert_allclose(direct.heads_px[layer], by_hand.result().heads_px[layer], rtol=1e-6)


class _AttentionShape(Accumulator):
    """Reduces each map to (shape, total mass): every row of a probability map sums to 1."""

    def __init__(self):
        self.seen = {}

    def attention(self, attn, grid):
        return tuple(attn.shape), float(attn.sum())

    def update(self, batch):
        for layer, value in batch.attn.items():
            self.seen.setdefault(layer, []).append(value)

    def all_reduce(self, group=None):
        pass


class _ShuffledTokens(Accumulator):
    view = "shuffled"
    shuffle_seed = 3

    def __init__(self):
        self.batches = 0

    def update(self, batch):
        assert batch.perm is not None and batch.attn == {}
        self.batches += 1

    def all_reduce(self, group=None):
        pass


def test_every_accumulator_asking_for_attention_gets_its_own_reduced_maps():
    from asg_probe.extract import run_analyses

    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2)
    x = torch.randn(5, 3, 32, 32)
    distance, shapes, shuffled = (AttentionDistanceAccumulator(4, model.num_prefix_tokens), _AttentionShape(),
                                  _ShuffledTokens())
    batches = [(x[:3], torch.arange(3)), (x[3:], torch.arange(3, 5))]
    returned = run_analyses(model, batches, [distance, shapes, shuffled], layers=[0], progress=False)
    assert returned[0] is distance and returned[1] is shapes and returned[2] is shuffled
    assert shuffled.batches == 2
    # original view only (the shuffled copy doubles the forward batch): B = 3, then 2 images;
    # 4 heads; 1 class token + 64 patches; mass = B * heads * queries
    for layer in (1, 2):
        assert shapes.seen[layer] == [((3, 4, 65, 65), pytest.approx(3 * 4 * 65, rel=1e-5)),
                                      ((2, 4, 65, 65), pytest.approx(2 * 4 * 65, rel=1e-5))]
    alone = attention_distance(model, x, batch_size=3, progress=False)
    for layer in (1, 2):
        np.testing.assert_allclose(distance.result().heads_px[layer], alone.heads_px[layer], rtol=1e-6)


def test_run_analyses_rejects_views_it_cannot_serve_in_one_line():
    from asg_probe.extract import run_analyses

    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    batches = [(torch.randn(2, 3, 32, 32), torch.arange(2))]
    other_seed = _ShuffledTokens()
    other_seed.shuffle_seed = 4
    with pytest.raises(ValueError, match="share one shuffle_seed"):
        run_analyses(model, batches, [_ShuffledTokens(), other_seed], layers=[0], progress=False)
    sideways = _AttentionShape()
    sideways.view = "flipped"
    with pytest.raises(ValueError, match="view must be one of"):
        run_analyses(model, batches, [sideways], layers=[0], progress=False)
