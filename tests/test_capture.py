"""capture_attention: fused = unfused on timm models, outputs untouched, composition, hygiene."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from asg_probe.capture import attention_probabilities, capture_attention

ORIGINAL_SDPA = F.scaled_dot_product_attention


def _vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, **kw).eval()


def _eva(**kw):
    return timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=64, depth=2,
                             embed_dim=96, num_heads=3, **kw).eval()


MODELS = {
    "vit": _vit,
    "eva-rope": lambda: _eva(use_rot_pos_emb=True),
    "eva-ape": lambda: _eva(use_abs_pos_emb=True, use_rot_pos_emb=False),
}


def _attn_modules(model):
    return [m for m in model.modules() if hasattr(m, "fused_attn")]


def _assert_clean(model, flags):
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    assert torch.nn.functional.scaled_dot_product_attention is ORIGINAL_SDPA
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__
    assert [m.fused_attn for m in _attn_modules(model)] == flags


def _rows_sum_to_one(a):
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a[..., 0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_capture_equals_attn_drop_capture_and_leaves_output_unchanged(name):
    model = MODELS[name]()
    assert all(m.fused_attn for m in _attn_modules(model))  # the test is about the fused path
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        with capture_attention(model) as auto:
            out_auto = model(x)
        with capture_attention(model, mode="sdpa") as fused:
            out_fused = model(x)
        with capture_attention(model, mode="attn_drop") as unfused:
            model(x)
    assert torch.equal(out_auto, reference) and torch.equal(out_fused, reference)  # bit for bit
    assert sorted(fused.attn) == sorted(unfused.attn) == sorted(auto.attn) == [1, 2]
    heads, n = model.blocks[0].attn.num_heads, model.num_prefix_tokens + 16
    for layer in (1, 2):
        a = fused.attn[layer]
        assert a.shape == (2, heads, n, n) and a.dtype == torch.float32 and not a.requires_grad
        _rows_sum_to_one(a)
        assert torch.equal(a, auto.attn[layer])
        torch.testing.assert_close(a, unfused.attn[layer], atol=1e-4, rtol=0)
    _assert_clean(model, [True, True])


def test_unfused_modules_are_read_in_auto_mode_and_flags_are_restored():
    model = _vit()
    for m in _attn_modules(model):
        m.fused_attn = False
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), capture_attention(model) as auto:
        model(x)
    with torch.no_grad(), capture_attention(model, mode="sdpa") as fused:
        model(x)
    _assert_clean(model, [False, False])  # sdpa mode switched them on, and back off
    for layer in (1, 2):
        torch.testing.assert_close(auto.attn[layer], fused.attn[layer], atol=1e-4, rtol=0)


def test_training_mode_dropout_output_unchanged_and_gradients_flow():
    model = _vit(attn_drop_rate=0.2).train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    torch.manual_seed(1)
    reference = model(x)
    torch.manual_seed(1)
    with capture_attention(model) as rec:
        out = model(x)
    assert torch.equal(out, reference)  # the wrapper draws no random numbers
    out.sum().backward()
    assert x.grad is not None and not rec.attn[1].requires_grad
    _rows_sum_to_one(rec.attn[1])  # probabilities are taken before dropout


def test_per_forward_layers_and_reduce():
    model = _vit()
    with torch.no_grad(), capture_attention(model, layers=[-1], reduce=lambda a: a.mean(dim=(0, 2, 3))) as rec:
        model(torch.randn(3, 3, 64, 64))
        first = dict(rec.attn)
        model(torch.randn(1, 3, 64, 64))
    assert sorted(first) == [2] and first[2].shape == (3,)  # reduced right away to (H,)
    torch.testing.assert_close(rec.attn[2], torch.full((3,), 1 / 17))  # rows sum to 1 over 17 keys
    with torch.no_grad(), capture_attention(model, layers=[1]) as rec:
        model(torch.randn(3, 3, 64, 64))
        model(torch.randn(1, 3, 64, 64))
    assert sorted(rec.attn) == [1] and rec.attn[1].shape[0] == 1  # cleared per forward pass


def test_sdpa_calls_outside_blocks_are_not_recorded():
    model = _vit(global_pool="map")  # attention-pooling head calls SDPA after the blocks
    with torch.no_grad(), capture_attention(model) as rec:
        model(torch.randn(1, 3, 64, 64))
    assert sorted(rec.attn) == [1, 2] and rec.calls == {1: 1, 2: 1}


def test_autocast_still_records_float32():
    model = _vit()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), capture_attention(model) as rec:
        model(torch.randn(1, 3, 64, 64))
    assert rec.attn[1].dtype == torch.float32
    _rows_sum_to_one(rec.attn[1])


@pytest.mark.parametrize("case", ["plain", "float-mask", "bool-mask", "causal", "scale", "gqa"])
def test_probabilities_reproduce_sdpa(case):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    kwargs = {}
    if case == "float-mask":
        kwargs["attn_mask"] = torch.randn(4, 7, 7, generator=g)  # broadcasts over batch
    elif case == "bool-mask":
        mask = torch.rand(2, 1, 7, 7, generator=g) > 0.3
        mask[..., 0] = True  # every query keeps a key
        kwargs["attn_mask"] = mask
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "scale":
        kwargs["scale"] = 0.05
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    probs = attention_probabilities(q, k, **kwargs)
    _rows_sum_to_one(probs)
    v_full = v.repeat_interleave(2, dim=1) if case == "gqa" else v
    torch.testing.assert_close(probs @ v_full, ORIGINAL_SDPA(q, k, v, **kwargs), atol=1e-5, rtol=1e-5)


def test_fully_masked_query_gives_a_zero_row():
    q = k = torch.randn(1, 1, 3, 4)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    probs = attention_probabilities(q, k, attn_mask=mask)
    assert probs[0, 0, 1].abs().sum() == 0 and not probs.isnan().any()


class _TwoPassBlock(nn.Module):
    """Calls SDPA twice: chained (second pass on the first's output) or in parallel."""

    def __init__(self, chained):
        super().__init__()
        self.chained = chained
        self.qk = nn.Linear(8, 16)

    def forward(self, x):
        q, k = self.qk(x).unsqueeze(1).chunk(2, dim=-1)      # (B, 1, N, 8) each
        v = x.unsqueeze(1)
        mask1 = torch.randn(x.shape[1], x.shape[1])
        first = F.scaled_dot_product_attention(q, k, v, attn_mask=mask1)
        second = F.scaled_dot_product_attention(q, k, first if self.chained else v, attn_mask=mask1.T)
        return (second if self.chained else first + second).squeeze(1)


class _Toy(nn.Module):
    def __init__(self, chained):
        super().__init__()
        self.blocks = nn.Sequential(_TwoPassBlock(chained))

    def forward(self, x):
        return self.blocks(x)


def test_chained_passes_compose_and_parallel_passes_stack():
    x = torch.randn(2, 5, 8)
    chained = _Toy(chained=True)
    torch.manual_seed(3)
    with torch.no_grad(), capture_attention(chained) as rec:
        out = chained(x)
    a = rec.attn[1]
    assert a.shape == (2, 1, 5, 5) and rec.calls == {1: 2}
    _rows_sum_to_one(a)
    # out = A2 (A1 V) = (A2 A1) V: the recorded map reproduces the block's output
    torch.testing.assert_close(a[:, 0] @ x, out, atol=1e-5, rtol=1e-5)
    parallel = _Toy(chained=False)
    with torch.no_grad(), capture_attention(parallel) as rec:
        parallel(x)
    assert rec.attn[1].shape == (2, 2, 5, 5)  # two independent maps: two heads
    _rows_sum_to_one(rec.attn[1])


def test_nothing_stays_attached_after_success_error_or_bad_arguments():
    model = _vit()
    flags = [m.fused_attn for m in _attn_modules(model)]
    x = torch.randn(1, 3, 64, 64)
    for mode in ("auto", "sdpa", "attn_drop"):
        with torch.no_grad(), capture_attention(model, mode=mode):
            model(x)
        _assert_clean(model, flags)

    def explode(*args, **kwargs):
        raise RuntimeError("inside the forward")

    model.blocks[1].mlp.forward = explode  # fails after block 1's attention was captured
    for mode in ("auto", "attn_drop"):
        with pytest.raises(RuntimeError, match="inside the forward"):
            with torch.no_grad(), capture_attention(model, mode=mode):
                model(x)
        _assert_clean(model, flags)
    del model.blocks[1].mlp.forward
    with pytest.raises(KeyError):
        with capture_attention(model):
            raise KeyError("in the with-body")
    _assert_clean(model, flags)
    bad = [dict(mode="fast"), dict(layers=[0]), dict(layers=[3]), dict(layers=["1"]), dict(reduce=3)]
    for kwargs in bad:
        with pytest.raises((ValueError, TypeError)):
            with capture_attention(model, **kwargs):
                pass
        _assert_clean(model, flags)
    with pytest.raises(ValueError, match="blocks"):
        with capture_attention(nn.Linear(2, 2)):
            pass
    _assert_clean(model, flags)


def test_a_wrapper_restored_by_someone_else_is_inert():
    model = _vit()
    with capture_attention(model) as rec:
        leaked = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = leaked  # e.g. another tool restoring what it saw
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
    finally:
        F.scaled_dot_product_attention = ORIGINAL_SDPA
    assert rec.attn == {}


def test_decomposed_decay_is_composed_the_same_way_fused_and_unfused():
    import asg_probe

    model = asg_probe.create_model("vit_tiny_patch4_32", pos="rmt-decay", decay_form="decomposed", depth=1).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), capture_attention(model, mode="sdpa") as fused:
        model(x)
    with torch.no_grad(), capture_attention(model, mode="attn_drop") as unfused:
        model(x)
    assert fused.calls == unfused.calls == {1: 2}
    a = fused.attn[1]  # effective A_col @ A_row: still a distribution per query
    _rows_sum_to_one(a)
    torch.testing.assert_close(a, unfused.attn[1], atol=1e-4, rtol=0)
    # a patch reaches patches outside its own row and column only through the composition
    p = model.num_prefix_tokens
    assert (a[0, :, p + 0, p + 5] > 0).all()  # (0, 0) -> (1, 1) on the 4x4 grid
