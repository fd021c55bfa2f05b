"""Causal erasure of position (LEACE): known answers on planted models."""
import json
import types

import pytest
import timm
import torch

import asg_probe
from asg_probe.analysis.erasure import (LeaceAccumulator, erase_patch_tokens, erase_position, eraser_rank,
                                        random_eraser)
from asg_probe.extract import ForwardBatch, image_permutations
from asg_probe.hooks import resid_name, run_with_cache
from asg_probe.layers.grid import coordinate_targets, permute_patches

GRID = (8, 8)


def planted_vit(head=False, width=48, content=0.3):
    """A timm ViT whose position table is a (row, col) ramp in channels 0 and 1 (content is small there).

    With ``head``: its one block passes tokens through unchanged (attention and MLP outputs zeroed), and a
    4-class head reads the coordinates, weighted by each patch's brightness (channel 2): where the bright
    content is. Only the planted position can answer that.
    """
    torch.manual_seed(0)
    # narrow (48 channels) by default: LEACE is exact on its fit tokens and generalises to held-out images
    # with an error that shrinks like width / fit tokens (12 images x 64 patches here)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, num_classes=0,
                          embed_dim=width, num_heads=3).eval()
    coords = coordinate_targets(GRID) - 0.5
    with torch.no_grad():
        m.pos_embed.zero_()
        m.pos_embed[0, 1:, :2] = 4 * coords
        # content writes every channel a little: a channel of pure position, or a constant one, would
        # once erased hold only float rounding, which the probe's standardisation amplifies
        m.patch_embed.proj.weight *= content
        m.patch_embed.proj.bias[:3] = 0
        if head:
            m.patch_embed.proj.weight[2] = 10.0 / 48         # channel 2: brightness (sum of the patch's pixels)
            for lin in (m.blocks[0].attn.proj, m.blocks[0].mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    if head:
        m.norm = torch.nn.Identity()
        signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])

        def forward_head(self, x, pre_logits=False):
            patches = x[:, 1:]
            weight = patches[..., 2:3]                         # brightness
            return torch.einsum("bnc,kc->bk", weight * patches[..., :2], signs)

        m.num_classes = 4
        m.forward_head = types.MethodType(forward_head, m)
    return m


def test_planted_ramp_erased_at_layer_0_while_a_random_subspace_keeps_it():
    res = erase_position(planted_vit(), torch.randn(24, 3, 32, 32), layers=[0], n_folds=3, n_control_seeds=2,
                         progress=False)
    (row0,) = [r for r in res.recovery if r["read_layer"] == 0]
    assert row0["r2_clean"] > 0.95
    assert row0["r2"] <= 0.05
    assert row0["r2_control"] >= 0.8
    assert res.effect[0]["rank"] == 2 and res.effect[0]["agreement"] is None   # headless: no agreement
    assert res.effect[0]["relative_change"] > 3 * res.effect[0]["relative_change_control"]
    doc = json.loads(res.to_json())
    assert set(doc["recovery"][0]) >= {"erase_layer", "read_layer", "r2", "r2_row", "r2_col", "r2_ci", "r2_control"}
    assert set(doc["effect"][0]) >= {"erase_layer", "agreement", "agreement_control", "kl", "kl_control",
                                     "accuracy", "accuracy_control"}
    assert doc["provenance"]["images"]["num_images"] == 24


def test_head_that_reads_position_changes_under_erasure_not_under_the_control():
    labels = torch.arange(24) % 4
    # wide (192 channels) with full-size content: a random plane (whitened) then rarely falls on the three
    # channels the head reads
    res = erase_position(planted_vit(head=True, width=192, content=1.0), torch.randn(24, 3, 32, 32), layers=[0],
                         n_folds=3, n_control_seeds=1, labels=labels, progress=False)
    for eff in res.effect:
        assert eff["agreement_control"] >= 0.8
        assert eff["agreement"] <= 0.4                     # 4 classes: chance is 0.25
        assert eff["kl"] > 10 * eff["kl_control"]
        assert eff["kl_diff_ci"][0] > 0                    # erased KL above the control's, paired over images
        assert eff["accuracy_control"] is not None and eff["accuracy"] is not None


def test_no_position_anywhere_gives_the_control_effect():
    """pos=none on patch-shuffled images: tokens carry no position, so the fitted eraser removes noise
    directions, and its effect is the random subspace's (while the planted head above differs >10x).

    The pixels are i.i.d. noise: shuffled photographs or ramps would leave each slot's content drawn
    from only as many values as there are images, a chance slot-content correlation LEACE would find."""
    torch.manual_seed(0)
    m = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1, num_classes=5).eval()
    torch.nn.init.normal_(m.head.weight, std=1.0)   # logits of a useful size, so that KL measures something
    images = torch.randn(24, 3, 32, 32)
    images = permute_patches(images, 4, image_permutations(torch.arange(24), 64, seed=1))
    res = erase_position(m, images, layers=[0], n_folds=3, n_control_seeds=3, progress=False)
    eff = res.effect[0]
    assert res.recovery[0]["r2_clean"] < 0.1
    assert 1 / 3 < eff["kl"] / eff["kl_control"] < 3
    assert 1 / 3 < eff["relative_change"] / eff["relative_change_control"] < 3
    assert abs(eff["agreement"] - eff["agreement_control"]) <= 0.15


def test_erasure_touches_only_its_subspace_and_never_prefix_tokens():
    m = planted_vit()
    x = torch.randn(8, 3, 32, 32)
    _, cache = run_with_cache(m, x, [resid_name(0, 1)], include_prefix=True)
    tokens = cache[resid_name(0, 1)]
    acc = LeaceAccumulator()
    acc.update(ForwardBatch(tokens={0: tokens[:, 1:]}, grid=GRID, image_index=torch.arange(8), images=x,
                            num_prefix_tokens=1, patch_size=4))
    eraser = acc.eraser(0)
    assert eraser_rank(eraser) == 2
    erased = erase_patch_tokens(tokens, eraser, num_prefix_tokens=1)
    assert torch.equal(erased[:, :1], tokens[:, :1])
    basis, _ = torch.linalg.qr(eraser.proj_left.float())                          # span of the edit
    change = (erased - tokens)[:, 1:]
    untouched = change - (change @ basis) @ basis.T
    assert untouched.abs().max() < 1e-4 * tokens.abs().max()
    assert change.abs().max() > 0.1
    control = random_eraser(acc.fitters[0], 2, seed=0)
    assert eraser_rank(control) == 2 and torch.equal(control.bias, eraser.bias)


def test_cli_erase_runs_and_refuses_bad_arguments(tmp_path, capsys):
    from asg_probe.checkpoint import save_checkpoint
    from asg_probe.cli import main

    ckpt = save_checkpoint(tmp_path / "m.safetensors",
                           asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1, num_classes=3))
    assert main(["erase", str(ckpt), "--control-seeds", "0"]) == 2
    assert main(["erase", str(ckpt), "--layers", "5", "--out", str(tmp_path / "o")]) == 2
    code = main(["erase", str(ckpt), "--layers", "-1", "--num-images", "8", "--folds", "2", "--control-seeds", "1",
                 "--images", "scenes", "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 0
    doc = json.loads((tmp_path / "out" / "erasure.json").read_text())
    assert [r["read_layer"] for r in doc["recovery"]] == [1] and doc["effect"][0]["erase_layer"] == 1
    assert "erase 1:" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [{"n_control_seeds": 0}, {"num_images": 6}])
def test_bad_arguments_fail_before_compute(bad):
    from asg_probe.errors import UsageError

    kwargs = {"num_images": 20, **bad}
    images = torch.randn(kwargs.pop("num_images"), 3, 32, 32)
    with pytest.raises(UsageError):
        erase_position(planted_vit(), images, progress=False, **kwargs)


def _outputs(model, x):
    from asg_probe.analysis.erasure import _outputs as outputs

    return outputs(model, x)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_resumed_from_a_layer_equals_the_full_forward_with_the_hook(layer):
    """run_from (blocks L..end on a cached, edited residual) is the full forward with a patching hook at L."""
    from asg_probe.hooks import run_from, run_with_hooks

    torch.manual_seed(0)
    m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2, num_classes=3).eval()
    torch.nn.init.normal_(m.head.weight)          # logits of a size the comparison can see
    x = torch.randn(3, 3, 32, 32)
    name = resid_name(layer, 2)
    _, cache = run_with_cache(m, x, [name], include_prefix=True)
    edited = cache[name] * torch.linspace(0.5, 2.0, cache[name].shape[-1])   # any edit, prefix included
    full_f, full_l = run_with_hooks(m, x, [(name, lambda act, n: act * torch.linspace(0.5, 2.0, act.shape[-1]))],
                                    forward=_outputs)
    later = resid_name(2, 2)
    seen = {}
    f, logits = run_from(m, layer, edited, x, [(later, lambda act, n: seen.setdefault(n, act))], forward=_outputs)
    assert torch.allclose(f, full_f, atol=1e-5) and torch.allclose(logits, full_l, atol=1e-4)
    assert (full_l - m(x)).abs().max() > 0.1                        # the edit mattered
    assert seen[later].shape == cache[name].shape
    assert all("forward" not in vars(b) for b in m.blocks)         # the skipped blocks are restored


def test_matched_control_edits_as_much_as_leace_and_leaves_position():
    # wide with full-size content: the tokens have directions besides position as large as its edit
    res = erase_position(planted_vit(width=192, content=1.0), torch.randn(24, 3, 32, 32), layers=[0], n_folds=3,
                         n_control_seeds=1, n_matched_seeds=1, progress=False)
    eff, (row0,) = res.effect[0], [r for r in res.recovery if r["read_layer"] == 0]
    assert abs(eff["edit_norm_matched"] / eff["edit_norm"] - 1) <= 0.1
    assert eff["edit_norm_control"] < 0.5 * eff["edit_norm"]        # the plain control's edits are smaller
    assert row0["r2"] <= 0.1 and row0["r2_matched"] >= 0.8          # as large an edit, but no position removed
    frame = res.to_frame()
    assert {"edit_norm", "edit_norm_control", "edit_norm_matched"} <= set(frame.columns)


def test_erasure_runs_on_a_hugging_face_vit():
    """A tiny transformers ViT (from a config, nothing downloaded) with a (row, col) ramp planted in
    its position table, through the adapter every analysis uses (asg_probe.hf.HFViT)."""
    transformers = pytest.importorskip("transformers")
    from asg_probe.hf import HFViT

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                 patch_size=8, intermediate_size=64)
    hf = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        hf.embeddings.position_embeddings.zero_()
        hf.embeddings.position_embeddings[0, 1:, :2] = 4 * (coordinate_targets((4, 4)) - 0.5)
        hf.embeddings.patch_embeddings.projection.weight.mul_(0.3)
    model = HFViT(hf).eval()
    res = erase_position(model, torch.randn(40, 3, 32, 32), n_folds=3, n_control_seeds=1, progress=False)
    assert [r["erase_layer"] for r in res.effect] == [0, 1, 2]
    assert [(r["erase_layer"], r["read_layer"]) for r in res.recovery] == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2),
                                                                           (2, 2)]
    (row0,) = [r for r in res.recovery if r["erase_layer"] == 0 and r["read_layer"] == 0]
    assert row0["r2_clean"] > 0.9 and row0["r2"] < 0.2 and row0["r2_control"] > 0.7
    for eff in res.effect:                      # headless: the final tokens' change, not agreement
        assert eff["agreement"] is None and eff["rank"] == 2
        assert eff["relative_change"] > 0 and eff["edit_norm"] > 0 and eff["edit_norm_matched"] > 0


def test_matched_control_does_not_depend_on_float_rounding_of_the_statistics():
    """The same tokens summed in another order (as processes merging their sums do) give the same matched
    control: the draw may not follow the eigenvectors' arbitrary signs and rotations (isotropic noise here
    makes the complement's eigenvalues near-degenerate, the hard case)."""
    from concept_erasure import LeaceFitter
    from asg_probe.analysis.erasure import matched_eraser

    g = torch.Generator().manual_seed(0)
    z = torch.rand(4000, 2, generator=g, dtype=torch.float64)
    x = torch.randn(4000, 10, generator=g, dtype=torch.float64)
    x[:, :2] += 4 * z
    whole = LeaceFitter(10, 2, dtype=torch.float64).update(x, z)
    parts = LeaceFitter(10, 2, dtype=torch.float64)
    for chunk in torch.arange(4000).flip(0).split(300):
        parts.update(x[chunk], z[chunk])
    assert not torch.equal(whole.sigma_xx, parts.sigma_xx)          # rounding differs ...
    a, b = (matched_eraser(f, f.eraser, seed=3) for f in (whole, parts))
    pa, pb = a.proj_left @ a.proj_right, b.proj_left @ b.proj_right
    assert torch.allclose(pa, pb, atol=1e-6), float((pa - pb).abs().max())   # ... the control does not
