"""Known-answer tests for every positional mechanism of the model family."""
import math

import pytest
import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat

import asg_probe
from asg_probe.layers.grid import manhattan_distances, permute_patches
from asg_probe.layers.spatial_bias import (ALiBi2D, ContextAwareDecay, ManhattanDecay, alibi2d_slopes,
                                           rmt_log_gamma)
from asg_probe.models import sincos_2d

POSITIONS = asg_probe.list_positions()
INJECTED = [p for p in POSITIONS if p != "none"]
TINY = "vit_tiny_patch4_32"


def tiny(pos, **kw):
    kw.setdefault("num_classes", 3)
    kw.setdefault("depth", 2)
    kw.setdefault("num_reg_tokens", 2)
    model = asg_probe.create_model(TINY, pos=pos, **kw)
    return model.eval()


def test_registry_lists_every_mechanism():
    assert set(POSITIONS) == {"none", "ape", "sincos", "rope-axial", "rope-mixed", "rope-dinov3",
                              "alibi2d", "relpos", "rmt-decay", "sdt-decay"}
    assert {"vit_tiny_patch4_32", "vit_small_patch16_dinov3", "vit_base_patch16_dinov3"} <= set(
        asg_probe.list_models())


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("size", [(32, 32), (48, 24)])
def test_forward_backward_two_sizes(pos, size):
    model = tiny(pos).train()
    x = torch.randn(2, 3, *size)
    out = model(x)
    out.square().mean().backward()
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    feats = model.forward_features(x)
    assert feats.shape == (2, 3 + (size[0] // 4) * (size[1] // 4), 128)


@pytest.mark.parametrize("form", ["decomposed", "hybrid"])
@pytest.mark.parametrize("pos", ["rmt-decay", "sdt-decay"])
def test_decomposed_decay_runs_on_non_square_grids(pos, form):
    model = tiny(pos, decay_form=form)
    out = model.forward_features(torch.randn(2, 3, 24, 40))
    assert torch.isfinite(out).all()


def test_bad_positional_settings_raise():
    with pytest.raises(ValueError, match="unknown pos"):
        asg_probe.create_model(TINY, pos="rope")
    with pytest.raises(ValueError, match="set by pos"):
        asg_probe.create_model(TINY, pos="none", use_rot_pos_emb=True)
    with pytest.raises(ValueError, match="unknown model"):
        asg_probe.create_model("vit_huge", pos="none")


def _shuffled_outputs(model, perm, size=(32, 24)):
    x = torch.randn(2, 3, *size)
    p = model.num_prefix_tokens
    with torch.no_grad():
        ref = model.forward_features(x)[:, p:]
        out = model.forward_features(permute_patches(x, 4, perm))[:, p:]
    return ref, out


@pytest.mark.parametrize("num_reg_tokens", [0, 2])
def test_no_injection_is_patch_permutation_equivariant(num_reg_tokens):
    model = tiny("none", num_reg_tokens=num_reg_tokens)
    perm = torch.randperm(8 * 6)
    ref, out = _shuffled_outputs(model, perm)
    torch.testing.assert_close(out, ref[:, perm], atol=1e-5, rtol=1e-5)


def test_guided_training_keeps_equivariance():
    model = tiny("none").train()
    head = asg_probe.GuidanceHead(model.embed_dim, hidden_dim=32)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-3)
    for _ in range(3):
        feats = model.forward_features(torch.randn(4, 3, 32, 32))
        loss = head(feats[:, model.num_prefix_tokens:], (8, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
    perm = torch.randperm(48)
    ref, out = _shuffled_outputs(model.eval(), perm)
    torch.testing.assert_close(out, ref[:, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", INJECTED)
def test_injected_mechanisms_break_equivariance(pos):
    model = tiny(pos)
    if pos == "relpos":  # a zero-ish table would be nearly equivariant; make it clearly positional
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.spatial.rel_pos_table, std=1.0)
    perm = torch.randperm(48)
    ref, out = _shuffled_outputs(model, perm)
    assert (out - ref[:, perm]).abs().max() > 1e-3


def test_rmt_bias_is_log_gamma_times_manhattan():
    decay = ManhattanDecay(num_heads=4, r=4)
    gamma = torch.tensor([0.75, 0.875, 0.9375, 0.96875])
    torch.testing.assert_close(rmt_log_gamma(4).exp(), gamma)
    bias = decay.bias(torch.zeros(1, 2 + 12, 8), (3, 4), num_prefix_tokens=2)[0]
    d = manhattan_distances((3, 4))
    expected = torch.log(gamma)[:, None, None] * d
    torch.testing.assert_close(bias[:, 2:, 2:], expected)
    assert bias[:, :2].abs().max() == 0 and bias[:, :, :2].abs().max() == 0
    # a concrete entry: patch (0,0) to patch (2,3) is 5 steps away
    assert math.isclose(bias[0, 2, 2 + 11].item(), 5 * math.log(0.75), rel_tol=1e-6)


def test_alibi_slopes_follow_the_rule():
    for n in (1, 3, 4, 6, 8, 12):
        expected = [2 ** (-8 * (h + 1) / n) for h in range(n)]
        torch.testing.assert_close(alibi2d_slopes(n), torch.tensor(expected, dtype=torch.float32))
    bias = ALiBi2D(2).bias(torch.zeros(1, 1 + 4, 8), (2, 2), num_prefix_tokens=1)[0]
    # patch (0,0) -> (1,1): euclidean sqrt(2), slope of head 0 with n=2 is 2^-4
    assert math.isclose(bias[0, 1, 4].item(), -(2 ** -4) * math.sqrt(2), rel_tol=1e-6)


def test_sdt_at_initialisation_equals_rmt():
    sdt = ContextAwareDecay(dim=16, num_heads=4)
    rmt = ManhattanDecay(num_heads=4)
    x = torch.randn(3, 1 + 20, 16)
    torch.testing.assert_close(sdt.bias(x, (4, 5), 1), rmt.bias(x, (4, 5), 1).expand(3, -1, -1, -1))
    # ... and a whole SDT model computes exactly what the RMT model with the same weights does
    m_sdt, m_rmt = tiny("sdt-decay"), tiny("rmt-decay")
    missing, unexpected = m_rmt.load_state_dict(m_sdt.state_dict(), strict=False)
    assert not missing and all(".spatial." in k for k in unexpected)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m_sdt(x), m_rmt(x))


def test_sdt_gates_are_data_dependent_after_training_signal():
    sdt = ContextAwareDecay(dim=8, num_heads=2)
    torch.nn.init.normal_(sdt.gate.weight)
    b = sdt.bias(torch.randn(2, 9, 8), (3, 3), 0)
    assert (b[0] - b[1]).abs().max() > 1e-4  # different images, different decay


@pytest.mark.parametrize("pos", ["rope-axial", "rope-mixed", "rope-dinov3"])
def test_rope_scores_depend_only_on_relative_offsets(pos):
    model = tiny(pos)
    grid = (5, 4)
    emb = model.rope.get_embed(shape=grid)
    if emb.dim() == 4:  # mixed: (depth, heads, N, dim) -> first block, first head
        emb = emb[0, 0]
    half = model.blocks[0].attn.rotate_half
    head_dim = emb.shape[-1] // 2
    q = torch.randn(head_dim).expand(20, head_dim)
    k = torch.randn(head_dim).expand(20, head_dim)
    scores = apply_rot_embed_cat(q, emb, half=half) @ apply_rot_embed_cat(k, emb, half=half).T
    rows, cols = torch.arange(20) // 4, torch.arange(20) % 4
    seen = {}
    for i in range(20):
        for j in range(20):
            key = (int(rows[i] - rows[j]), int(cols[i] - cols[j]))
            seen.setdefault(key, []).append(scores[i, j])
    spreads = [torch.stack(v).std().item() for v in seen.values() if len(v) > 1]
    assert max(spreads) < 1e-4
    # ... and they do depend on the offset
    assert torch.stack([torch.stack(v).mean() for v in seen.values()]).std() > 1e-3


def test_sincos_matches_closed_form():
    gh, gw, dim = 3, 5, 16
    emb = sincos_2d(gh, gw, dim)
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    for r in range(gh):
        for c in range(gw):
            expected = torch.cat([torch.sin(r * omega), torch.sin(c * omega),
                                  torch.cos(r * omega), torch.cos(c * omega)]).float()
            torch.testing.assert_close(emb[r, c], expected, atol=1e-6, rtol=1e-5)
    # the model adds exactly this to its patch tokens before block 0
    model = tiny("sincos", num_reg_tokens=0)
    x = torch.randn(1, 3, 12, 20)
    tokens = model.patch_embed(x)
    with_pos, _ = model._pos_embed(tokens)
    torch.testing.assert_close(with_pos[0, 1:] - tokens.reshape(1, -1, 128)[0], sincos_2d(3, 5, 128).reshape(15, 128))


@pytest.mark.parametrize("pos,form", [("alibi2d", "full"), ("relpos", "full"), ("rmt-decay", "full"),
                                      ("sdt-decay", "full"), ("rmt-decay", "decomposed"),
                                      ("sdt-decay", "decomposed")])
def test_fused_and_unfused_attention_agree(pos, form):
    model = tiny(pos, decay_form=form)
    x = torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        fused = model.forward_features(x)
        for block in model.blocks:
            block.attn.fused_attn = False
        unfused = model.forward_features(x)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-4)


def test_ape_interpolates_to_other_grids():
    model = tiny("ape")
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 64, 48))
    assert out.shape[1] == 3 + 16 * 12


def test_permute_patches_round_trip():
    x = torch.randn(2, 3, 16, 12)
    perm = torch.randperm(12)
    inverse = torch.argsort(perm)
    torch.testing.assert_close(permute_patches(permute_patches(x, 4, perm), 4, inverse), x)
