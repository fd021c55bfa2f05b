"""Attention distance within windows (Swin, SAM-ViT, NesT): known answers.

With q = k = 0 and no positional bias every logit of a window is equal, so each query's
attention is uniform over the keys it may see: its window, cut by Swin's shift mask into
regions, without padding. The reference distances here are computed from first principles
(which tokens share a window, in image coordinates), not with the code under test.
"""
import itertools
import math

import pytest
import timm
import torch

import asg_probe
from asg_probe.errors import InputError


def _groups(size, window, shift=0):
    """Index ranges a window layout splits ``range(size)`` into, in image coordinates.

    A cyclic shift by ``shift`` (Swin) moves the boundaries to ``shift + k * window``; the
    wrapped window is split by the mask, so ``[0, shift)`` is a group of its own.
    """
    cuts = sorted({0, size} | {b for b in range(shift, size, window)})
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def _uniform_reference(grid, stride, rows, cols, pool=1):
    """Mean distance (px) of uniform attention within ``rows x cols`` groups, averaged over queries.

    ``pool``: queries pooled over ``pool x pool`` tokens (Hiera), each at its cell's centre.
    """
    total, side = 0.0, (grid[0] // pool, grid[1] // pool)
    for i, j in itertools.product(range(side[0]), range(side[1])):
        qi, qj = (i + 0.5) * pool, (j + 0.5) * pool   # in token units, token centres at k + 0.5
        keys = [(a, b) for r in rows if i * pool in r for c in cols if j * pool in c for a in r for b in c]
        total += sum(math.hypot((a + 0.5 - qi) * stride, (b + 0.5 - qj) * stride) for a, b in keys) / len(keys)
    return total / (side[0] * side[1])


def _uniform_attention(model):
    """Zero every query/key projection and positional attention bias: all logits of a window equal."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "qkv" in name or "relative_position" in name or "rel_pos" in name:
                p.zero_()
    return model


def _swin(img_size=32):
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size, embed_dim=8,
                             depths=(2, 1), num_heads=(1, 2), window_size=4, num_classes=0).eval()


def _layers(result):
    return {row["layer"]: row for row in result.to_dict()["layers"]}


@pytest.mark.parametrize("mode", ["sdpa", "attn_drop"])
def test_swin_uniform_attention_gives_the_analytic_distance_within_windows_and_shifted_windows(mode):
    res = asg_probe.attention_distance(_uniform_attention(_swin()), torch.randn(2, 3, 32, 32), progress=False,
                                       mode=mode)
    rows = _layers(res)
    # stage 1: 8x8 tokens of 4 px; block 1 in 4x4 windows, block 2 shifted by 2; stage 2: 4x4 tokens of 8 px
    assert [(r["block"], r["window"], r["shift"], r["grid"], r["stride"]) for r in rows.values()] == [
        ("layers.0.blocks.0", [4, 4], [0, 0], [8, 8], [4, 4]),
        ("layers.0.blocks.1", [4, 4], [2, 2], [8, 8], [4, 4]),
        ("layers.1.blocks.0", [4, 4], [0, 0], [4, 4], [8, 8])]
    plain = _uniform_reference((8, 8), 4, _groups(8, 4), _groups(8, 4))
    shifted = _uniform_reference((8, 8), 4, _groups(8, 4, 2), _groups(8, 4, 2))
    stage2 = _uniform_reference((4, 4), 8, _groups(4, 4), _groups(4, 4))
    assert shifted < plain - 1  # the mask's regions are smaller than a window: the cases differ
    for layer, want in ((1, plain), (2, shifted), (3, stage2)):
        assert rows[layer]["heads_px"] == pytest.approx([want] * len(rows[layer]["heads_px"]), abs=1e-4)
        # the stated baseline is uniform attention over what each query may see (the shift mask's region)
        assert rows[layer]["uniform_px"] == pytest.approx(want, abs=1e-4)
    # grid units are the first layer's tokens (4 px) at every stage
    assert rows[1]["heads_grid"][0] == pytest.approx(plain / 4)
    assert rows[3]["heads_grid"][0] == pytest.approx(stage2 / 4)


def test_swin_attention_on_itself_measures_zero_not_the_uniform_distance():
    """q = k = 0 and a relative-position bias only at offset (0, 0): each token attends to itself."""
    model = _uniform_attention(_swin())
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "relative_position_bias_table"):
                same = module.relative_position_index.view(-1)[0]  # token 0 with itself: offset (0, 0)
                module.relative_position_bias_table[same] = 50.0
    res = asg_probe.attention_distance(model, torch.randn(2, 3, 32, 32), progress=False)
    for row in res.to_dict()["layers"]:
        assert max(row["heads_px"]) < 1e-6 and row["uniform_px"] > 5, row


@pytest.mark.parametrize("img_size", [64, 48])
def test_sam_vit_windowed_and_global_blocks_give_the_analytic_uniform_distance(img_size):
    """64 px: 4x4 tokens in 2x2 windows, then global; 48 px: 3x3 tokens, windows padded (padding left out)."""
    torch.manual_seed(0)
    model = timm.create_model("samvit_base_patch16", img_size=img_size, embed_dim=16, depth=2, num_heads=2,
                              window_size=2, global_attn_indexes=(1,), neck_chans=8, num_classes=0).eval()
    side = img_size // 16
    res = asg_probe.attention_distance(_uniform_attention(model), torch.randn(2, 3, img_size, img_size),
                                       progress=False)
    rows = _layers(res)
    assert (rows[1]["window"], rows[2]["window"]) == ([2, 2], "global")
    assert rows[1]["stride"] == rows[2]["stride"] == [16, 16] and rows[1]["grid"] == [side, side]
    windowed = _uniform_reference((side, side), 16, _groups(side, 2), _groups(side, 2))
    whole = _uniform_reference((side, side), 16, [range(side)], [range(side)])
    assert rows[1]["heads_px"] == pytest.approx([windowed] * 2, abs=1e-4)
    assert rows[2]["heads_px"] == pytest.approx([whole] * 2, abs=1e-4)
    assert (rows[1]["uniform_px"], rows[2]["uniform_px"]) == pytest.approx((windowed, whole), abs=1e-4)


def test_nest_blocks_give_the_analytic_uniform_distance_at_every_level():
    """NesT at 32 px, patch 4: levels of 8x8, 4x4 and 2x2 tokens (strides 4, 8, 16), blocks of 2x2 tokens."""
    from timm.models.nest import Nest

    torch.manual_seed(0)
    model = Nest(img_size=32, patch_size=4, num_levels=3, embed_dims=(8, 16, 16), num_heads=(1, 2, 2),
                 depths=(1, 1, 1), num_classes=0).eval()
    rows = _layers(asg_probe.attention_distance(_uniform_attention(model), torch.randn(2, 3, 32, 32),
                                                progress=False))
    for layer, side, stride in ((1, 8, 4), (2, 4, 8), (3, 2, 16)):
        assert (rows[layer]["grid"], rows[layer]["stride"], rows[layer]["window"]) == ([side, side], [stride] * 2,
                                                                                        [2, 2])
        want = _uniform_reference((side, side), stride, _groups(side, 2), _groups(side, 2))
        assert rows[layer]["heads_px"] == pytest.approx([want] * len(rows[layer]["heads_px"]), abs=1e-4)
        assert rows[layer]["uniform_px"] == pytest.approx(want, abs=1e-4)


def test_hiera_mask_units_and_pooled_queries_give_the_analytic_uniform_distance():
    """Hiera at 64 px: 16x16 tokens of 4 px in 8x8 mask units; blocks 2-4 pool queries 2x2 (cell centres)."""
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", img_size=64, embed_dim=8, num_heads=1, stages=(1, 1, 1, 1),
                              num_classes=0).eval()
    rows = _layers(asg_probe.attention_distance(_uniform_attention(model), torch.randn(2, 3, 64, 64),
                                                progress=False))
    assert [(r["grid"], r["stride"], r["window"], r["query_pool"]) for r in rows.values()] == [
        ([16, 16], [4, 4], [8, 8], 1), ([16, 16], [4, 4], [8, 8], 4), ([8, 8], [8, 8], [4, 4], 4),
        ([4, 4], [16, 16], "global", 4)]
    cases = {1: ((16, 16), 4, _groups(16, 8), 1), 2: ((16, 16), 4, _groups(16, 8), 2),
             3: ((8, 8), 8, _groups(8, 4), 2), 4: ((4, 4), 16, [range(4)], 2)}
    for layer, (grid, stride, groups, pool) in cases.items():
        want = _uniform_reference(grid, stride, groups, groups, pool)
        assert rows[layer]["heads_px"] == pytest.approx([want] * len(rows[layer]["heads_px"]), abs=1e-4), layer
        assert rows[layer]["uniform_px"] == pytest.approx(want, abs=1e-4), layer


def _pooled_keys_reference(side, stride, sr):
    """Uniform attention from every token of a ``side x side`` grid to keys pooled over ``sr x sr``
    cells (a strided convolution), each key at its cell's centre; px."""
    cells = side // sr
    keys = [((a + 0.5) * sr * stride, (b + 0.5) * sr * stride) for a in range(cells) for b in range(cells)]
    total = sum(math.hypot(ky - (i + 0.5) * stride, kx - (j + 0.5) * stride) / len(keys)
                for i in range(side) for j in range(side) for ky, kx in keys)
    return total / side ** 2


def test_pvt_v2_spatial_reduction_keys_at_their_cell_centres_give_the_analytic_uniform_distance():
    """PVTv2 at 64 px: grids 16, 8, 4, 2 (strides 4-32), keys pooled 8x8, 4x4, 2x2, 1x1."""
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", embed_dims=(8, 8, 8, 8), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                              num_classes=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.q.weight", "attn.q.bias")):
                p.zero_()
    rows = _layers(asg_probe.attention_distance(model, torch.randn(2, 3, 64, 64), progress=False))
    for layer, (side, stride, sr) in enumerate([(16, 4, 8), (8, 8, 4), (4, 16, 2), (2, 32, 1)], start=1):
        assert (rows[layer]["window"], rows[layer]["key_grid"]) == ("global", [side // sr] * 2)
        want = _pooled_keys_reference(side, stride, sr)
        assert rows[layer]["heads_px"] == pytest.approx([want], abs=1e-4), layer
        assert rows[layer]["uniform_px"] == pytest.approx(want, abs=1e-4), layer


def test_twins_local_windows_with_padding_and_global_subsampled_keys():
    """Twins-SVT at 64 px, stage 1 (16x16 tokens of 4 px): 3x3 windows (padded to 18x18), then keys pooled 8x8."""
    torch.manual_seed(0)
    model = timm.create_model("twins_svt_small", img_size=64, embed_dims=(8, 8, 8, 8), depths=(2, 1, 1, 1),
                              num_heads=(1, 1, 1, 1), wss=(3, 3, 3, 3), sr_ratios=(8, 4, 2, 1),
                              num_classes=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.q.weight", "attn.q.bias", "attn.qkv.weight", "attn.qkv.bias")):
                p.zero_()
    rows = _layers(asg_probe.attention_distance(model, torch.randn(2, 3, 64, 64), progress=False))
    assert (rows[1]["window"], rows[2]["window"], rows[2]["key_grid"]) == ([3, 3], "global", [2, 2])
    local = _uniform_reference((16, 16), 4, _groups(16, 3), _groups(16, 3))
    assert rows[1]["heads_px"] == pytest.approx([local], abs=1e-4)
    assert rows[2]["heads_px"] == pytest.approx([_pooled_keys_reference(16, 4, 8)], abs=1e-4)


def test_pooled_attention_is_refused_in_one_line_that_says_why():
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    model = MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=8, num_heads=1), img_size=64,
                          num_classes=0)
    with pytest.raises(InputError, match="queries and keys pooled") as err:
        asg_probe.attention_distance(model, torch.randn(1, 3, 64, 64), progress=False)
    assert "\n" not in str(err.value) and "Swin" in str(err.value)


def test_swin_shifted_windows_put_no_weight_across_the_wrap():
    """Random weights: in a shifted window the pairs rolled together from opposite edges are masked,
    so true image distances and offsets within the window agree (what the result reports)."""
    from asg_probe.analysis.attention_distance import window_distance_sums
    from asg_probe.capture import capture_attention

    model = _swin()
    x = torch.randn(2, 3, 32, 32)
    shifted = model.layers[0].blocks[1]
    with torch.no_grad(), capture_attention(model, blocks=[shifted.attn]) as rec:
        model.forward_features(x)
    probs = rec.attn[1].view(2, 4, 1, 16, 16)                      # (B, windows, heads, N, N)
    r, c = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    in_window = (torch.stack([r, c], -1).reshape(1, 16, 2) + 0.5).expand(4, 16, 2) * 4  # px, no roll
    total, count = window_distance_sums(probs, in_window)
    res = asg_probe.attention_distance(model, x, progress=False)
    assert _layers(res)[2]["heads_px"] == pytest.approx((total / count).tolist(), rel=1e-5)
    # and the measured value is not the uniform one: random weights attend unevenly
    assert abs(_layers(res)[2]["heads_px"][0] - _uniform_reference((8, 8), 4, _groups(8, 4, 2),
                                                                   _groups(8, 4, 2))) > 1e-3
