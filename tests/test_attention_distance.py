"""Attention capture and mean attention distance: analytic answers, fused = unfused, hygiene."""
import itertools
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import asg_probe
from asg_probe.analysis.attention_distance import attention_distance, mean_attention_distance, uniform_distance
from asg_probe.capture import capture_attention


def test_uniform_attention_on_14x14_grid_gives_116_5_px():
    pts = np.array(list(itertools.product(range(14), range(14))), dtype=float)
    brute = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).mean() * 16
    assert uniform_distance((14, 14), 16) == pytest.approx(brute, rel=1e-12)
    assert uniform_distance((14, 14), 16) == pytest.approx(116.5, abs=0.1)
    n = 1 + 196
    attn = torch.full((2, 3, n, n), 1.0 / n)  # uniform over prefix too: renormalised away
    total, count = mean_attention_distance(attn, (14, 14), 16, num_prefix_tokens=1)
    torch.testing.assert_close(total / count, torch.full((3,), brute, dtype=torch.float64))


def test_identity_attention_gives_zero_and_prefix_is_renormalised():
    n = 2 + 12
    eye = torch.eye(n).expand(1, 2, n, n)
    total, count = mean_attention_distance(eye, (3, 4), 8, num_prefix_tokens=2)
    assert total.abs().max() == 0
    # each query puts 90% on a prefix token and 10% on the patch one column to its right
    a = torch.zeros(1, 1, n, n)
    for q in range(12):
        a[0, 0, 2 + q, 0] = 0.9
        a[0, 0, 2 + q, 2 + (q // 4) * 4 + (q % 4 + 1) % 4] = 0.1
    total, count = mean_attention_distance(a, (3, 4), 8, num_prefix_tokens=2)
    # renormalised, each query looks 1 column away (3 columns for the wrap-around at the row end)
    expected = (9 * 1 + 3 * 3) / 12 * 8
    assert (total / count).item() == pytest.approx(expected)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _timm_models():
    return {
        "vit": timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2),
        "eva-rope": timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=64, depth=2,
                                      embed_dim=96, num_heads=3),
        "eva-ape": timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=64, depth=2,
                                     embed_dim=96, num_heads=3, use_abs_pos_emb=True, use_rot_pos_emb=False),
    }


@pytest.mark.parametrize("name", ["vit", "eva-rope", "eva-ape"])
def test_fused_and_unfused_capture_agree_on_timm_models(name):
    model = _timm_models()[name].eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        with capture_attention(model, mode="sdpa") as fused:
            out = model(x)
        torch.testing.assert_close(out, reference, rtol=0, atol=0)  # capturing changes nothing
        with capture_attention(model, mode="attn_drop") as unfused:
            model(x)
    assert sorted(fused.attn) == [1, 2]
    for layer in fused.attn:
        torch.testing.assert_close(fused.attn[layer].sum(-1), torch.ones_like(fused.attn[layer][..., 0]))
        torch.testing.assert_close(fused.attn[layer], unfused.attn[layer], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pos", ["none", "rope-mixed", "alibi2d", "relpos", "sdt-decay"])
def test_distance_fused_equals_unfused_for_every_kind_of_mechanism(pos):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos=pos, depth=2)
    x = torch.randn(3, 3, 32, 32)
    fused = attention_distance(model, x, progress=False).to_dict()
    for block in model.blocks:
        block.attn.fused_attn = False
    unfused = attention_distance(model, x, progress=False).to_dict()
    for a, b in zip(fused["layers"], unfused["layers"]):
        np.testing.assert_allclose(a["heads_px"], b["heads_px"], atol=1e-4)


def test_decomposed_decay_composes_two_passes():
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="rmt-decay", decay_form="decomposed", depth=1).eval()
    with capture_attention(model) as rec, torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    a = rec.attn[1]  # effective A_col @ A_row: still a distribution per query
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a[..., 0]))
    # a patch reaches patches outside its own row and column only through the composition
    assert (a[0, 0, 1 + 0, 1 + 5] > 0).item()  # (0,0) -> (1,1)


def test_decay_shortens_attention_and_uniform_model_matches_analytic():
    x = torch.randn(2, 3, 32, 32)
    flat = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    with torch.no_grad():
        flat.blocks[0].attn.qkv.weight.zero_()  # q = k = 0: uniform attention
        flat.blocks[0].attn.q_bias.zero_()
    res = attention_distance(flat, x, progress=False).to_dict()
    assert res["layers"][0]["mean_px"] == pytest.approx(uniform_distance((8, 8), 4), rel=1e-5)
    decay = asg_probe.create_model("vit_tiny_patch4_32", pos="rmt-decay", depth=1)
    with torch.no_grad():
        decay.blocks[0].attn.qkv.weight.zero_()
        decay.blocks[0].attn.q_bias.zero_()
    heads = attention_distance(decay, x, progress=False).to_dict()["layers"][0]["heads_px"]
    assert all(h < res["layers"][0]["mean_px"] for h in heads)
    assert heads == sorted(heads)  # larger γ (later heads) decays more slowly: looks further


def test_nothing_stays_attached():
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="alibi2d", depth=2)
    original = F.scaled_dot_product_attention
    before, flags = _hooks(model), [b.attn.fused_attn for b in model.blocks]
    with capture_attention(model, mode="attn_drop"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(model):
            raise RuntimeError("boom")
    with pytest.raises(ValueError):
        with capture_attention(model, mode="fast"):
            pass
    def explode(*args, **kwargs):
        raise RuntimeError("inside the forward")

    model.blocks[1].mlp.forward = explode  # fails after block 1's attention was captured
    with pytest.raises(RuntimeError, match="inside the forward"):
        with capture_attention(model):
            model(torch.randn(1, 3, 32, 32))
    assert F.scaled_dot_product_attention is original
    assert _hooks(model) == before and [b.attn.fused_attn for b in model.blocks] == flags


def test_result_json_contract_and_plot(tmp_path):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2, num_reg_tokens=2)
    res = attention_distance(model, torch.randn(2, 3, 32, 32), progress=False, checkpoint="tiny")
    doc = res.to_dict()
    assert doc["checkpoint"] == "tiny" and doc["patch_size"] == 4
    assert [r["layer"] for r in doc["layers"]] == [1, 2]
    row = doc["layers"][0]
    assert len(row["heads_px"]) == 4 and row["heads_grid"][0] == pytest.approx(row["heads_px"][0] / 4)
    assert row["mean_px"] == pytest.approx(sum(row["heads_px"]) / 4)
    assert len(res.save(tmp_path)) == 3
