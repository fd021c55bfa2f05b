"""Named hook points: caches, interventions, and that nothing stays attached (known answers)."""
import pytest
import timm
import torch
import torch.nn.functional as F

import asg_probe
from asg_probe.errors import UsageError
from asg_probe.hooks import (block_kind, hook_points, hooks, iter_activations, resid_name, run_with_cache,
                             run_with_hooks)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=3, num_classes=5, num_reg_tokens=2).eval()


def test_identity_hooks_everywhere_leave_outputs_bit_identical_and_nothing_attached(model, hook_count):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        clean = model(x)
    before = hook_count(model)
    identity = [(name, lambda act, name: act) for name in hook_points(model)]
    out = run_with_hooks(model, x, identity)
    assert torch.equal(out, clean)
    assert hook_count(model) == before and F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


def test_patching_resid_post_with_another_image_gives_that_image_from_there_on(model):
    a, b = torch.randn(2, 1, 3, 32, 32)
    out_b, cache_b = run_with_cache(model, b, ["blocks.1.hook_resid_post"], include_prefix=True)
    patched = run_with_hooks(model, a, [("blocks.1.hook_resid_post", lambda act, name: cache_b[name])])
    assert torch.equal(patched, out_b)
    with torch.no_grad():
        assert not torch.allclose(model(a), out_b)


def test_sequential_block_is_resid_pre_plus_attention_plus_mlp(model):
    names = ["blocks.2.hook_resid_pre", "blocks.2.hook_attn_out", "blocks.2.hook_mlp_out", "blocks.2.hook_resid_post"]
    _, c = run_with_cache(model, torch.randn(2, 3, 32, 32), names, include_prefix=True)
    assert block_kind(model.blocks[2]) == "sequential"
    torch.testing.assert_close(c[names[0]] + c[names[1]] + c[names[2]], c[names[3]], rtol=0, atol=1e-5)


def test_parallel_block_is_labelled_and_its_branches_add_up(hook_count):
    from timm.models.vision_transformer import ParallelScalingBlock

    m = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=0,
                          block_fn=ParallelScalingBlock).eval()
    assert block_kind(m.blocks[0]) == "parallel" and "blocks.0.hook_normed_mlp" not in hook_points(m)
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]
    _, c = run_with_cache(m, torch.randn(1, 3, 32, 32), names, include_prefix=True)
    torch.testing.assert_close(c[names[0]] + c[names[1]] + c[names[2]], c[names[3]], rtol=0, atol=1e-5)
    assert hook_count(m) == 0


def test_negative_indices_and_prefix_tokens(model):
    x = torch.randn(2, 3, 32, 32)
    _, c = run_with_cache(model, x, ["blocks.-1.hook_resid_post", "blocks.-1.hook_pattern", "blocks.0.hook_q"])
    _, full = run_with_cache(model, x, ["blocks.2.hook_resid_post", "blocks.2.hook_pattern"], include_prefix=True)
    assert sorted(c) == ["blocks.0.hook_q", "blocks.2.hook_pattern", "blocks.2.hook_resid_post"]
    p = model.num_prefix_tokens
    assert p == 3 and full["blocks.2.hook_resid_post"].shape[1] == 64 + p   # class + 2 registers
    assert torch.equal(c["blocks.2.hook_resid_post"], full["blocks.2.hook_resid_post"][:, p:])
    assert c["blocks.0.hook_q"].shape == (2, 4, 64, 32)
    probs = full["blocks.2.hook_pattern"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 64 + p))
    assert resid_name(-1, 3) == "blocks.2.hook_resid_post" and resid_name(0, 3) == "blocks.0.hook_resid_pre"


def test_patched_pattern_is_used(model):
    x = torch.randn(2, 3, 32, 32)
    features = lambda m, x: m.forward_features(x)  # noqa: E731  (the untrained head's logits are ~0)
    with torch.no_grad():
        clean = model.forward_features(x)
    same = run_with_hooks(model, x, [("blocks.0.hook_pattern", lambda p, name: p.clone())], forward=features)
    torch.testing.assert_close(same, clean, rtol=0, atol=1e-4)     # p @ v instead of the fused kernel
    uniform = run_with_hooks(model, x, [("blocks.0.hook_pattern", lambda p, name: torch.full_like(p, 1 / p.shape[-1]))],
                             forward=features)
    assert (uniform - clean).abs().max() > 1e-2


def test_bad_arguments_attach_nothing(model, hook_count):
    before = hook_count(model)
    for bad in (["blocks.7.hook_resid_post"], ["blocks.0.resid"], ["blocks.0.hook_nonsense"]):
        with pytest.raises(UsageError):
            run_with_cache(model, torch.randn(1, 3, 32, 32), bad)
    with pytest.raises(UsageError):
        with hooks(model, [("blocks.0.hook_resid_pre", "not callable")]):
            pass
    assert hook_count(model) == before


def test_hooks_and_sdpa_restored_when_the_forward_raises(model, hook_count):
    before, sdpa = hook_count(model), F.scaled_dot_product_attention

    def boom(act, name):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_with_hooks(model, torch.randn(1, 3, 32, 32), [("blocks.1.hook_k", boom), ("blocks.0.hook_mlp_out", boom)])
    assert hook_count(model) == before and F.scaled_dot_product_attention is sdpa


def test_iter_activations_streams_what_one_big_cache_holds(model):
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    parts = list(iter_activations(model, images, ["blocks.1.hook_mlp_out"], batch_size=2, with_output=True))
    assert [c.image_index.tolist() for c in parts] == [[0, 1], [2, 3], [4]]
    from asg_probe.inputs import ImageBatches

    x = ImageBatches.prepare(model, images).tensor()
    out, whole = run_with_cache(model, x, ["blocks.1.hook_mlp_out"])
    torch.testing.assert_close(torch.cat([c["blocks.1.hook_mlp_out"] for c in parts]), whole["blocks.1.hook_mlp_out"])
    torch.testing.assert_close(torch.cat([c["output"] for c in parts]), out)
