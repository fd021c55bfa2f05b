"""Probe attribution: locality known answers, completeness, hook hygiene, result contract, errors."""
import json

import pytest
import torch

import asg_probe
from asg_probe.analysis.attribution import AttributionResult, patch_tokens_with_grad, probe_attribution


@pytest.fixture(scope="module")
def images():
    return torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["integrated_gradients", "saliency"])
def test_layer0_without_injection_is_attributed_to_its_own_patch(images, method):
    # pos="none": the token entering block 1 is the patch embedding of its own pixels only
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2)
    res = probe_attribution(model, images, layer=0, patch=(1, 6), method=method, n_steps=8, progress=False)
    assert res.fraction_in_patch() > 0.99
    assert all(res.fraction_in_patch(t) > 0.99 for t in ("row", "col"))
    assert res.combined.sum() > 0


def test_attention_spreads_attribution_outside_the_patch(images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="sincos", depth=2)
    res = probe_attribution(model, images, layer=2, patch=(3, 3), n_steps=16, progress=False)
    assert res.fraction_in_patch() < 0.8
    # the sin-cos probe decodes position; its held-out prediction for this patch is close to the truth
    assert abs(res.predicted["row"] - res.true["row"]) < 0.1 and abs(res.predicted["col"] - res.true["col"]) < 0.1
    # Integrated Gradients completeness: attributions sum to f(x) - f(baseline)
    assert all(abs(d) < 1e-2 for d in res.convergence_delta.values())


def test_result_contract_and_outputs(images, tmp_path):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    res = probe_attribution(model, images, layer=-1, image_index=3, n_steps=4, progress=False, label="ape")
    assert isinstance(res, AttributionResult) and res.layer == 1 and res.patch == (4, 4)  # default: centre
    d = json.loads(res.to_json())
    for key in ("checkpoint", "layer", "patch", "img_size", "predicted", "true", "attribution",
                "convergence_delta", "fraction_in_patch"):
        assert key in d
    assert d["img_size"] == [32, 32] and len(d["attribution"]) == 32 and len(d["attribution"][0]) == 32
    assert d["true"] == {"row": 4 / 7, "col": 4 / 7} and d["image_index"] == 3
    frame = res.to_frame()
    assert frame["target"].tolist() == ["row", "col"] and "fraction_in_patch" in frame
    assert len(res.plot().axes) == 3
    assert all(p.exists() for p in res.save(tmp_path))
    assert "<img" in res._repr_html_()
    one = probe_attribution(model, images, layer=0, target="col", method="saliency", progress=False)
    assert one.targets == ["col"] and one.convergence_delta == {"col": None} and len(one.plot().axes) == 2


def test_large_maps_are_pooled_in_json():
    from asg_probe.analysis.attribution import _pooled

    pooled, factor = _pooled(torch.ones(224, 224).numpy())
    assert factor == 4 and pooled.shape == (56, 56)


def test_no_hook_stays_attached_after_a_run_a_bad_argument_or_an_exception(images, hook_count):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2)
    before = hook_count(model)
    probe_attribution(model, images, layer=1, n_steps=2, progress=False)
    assert hook_count(model) == before
    with pytest.raises(ValueError):
        probe_attribution(model, images, layer=1, patch=(8, 0), progress=False)
    assert hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with patch_tokens_with_grad(model, 1) as tokens:
            assert hook_count(model) == before + 1
            tokens(images[:1])
            raise RuntimeError("boom")
    assert hook_count(model) == before


def test_tokens_keep_the_graph_and_match_the_no_grad_extraction(images):
    from asg_probe.extract import forward_tokens

    model = asg_probe.create_model("vit_tiny_patch4_32", pos="rope-axial", depth=2).eval()
    x = images[:2].clone().requires_grad_(True)
    with patch_tokens_with_grad(model, 1) as tokens:
        out = tokens(x)
    assert out.requires_grad
    assert torch.allclose(out.detach(), forward_tokens(model, images[:2], layers=[1])[1], atol=1e-5)


def test_bad_arguments_are_one_line_errors(images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2)
    cases = [
        (dict(layer=5), "layers 0..2"),
        (dict(patch=(0, 8)), r"outside the 8x8 grid: pass row in 0..7 and col in 0..7"),
        (dict(image_index=10), r"pass 0..9"),
        (dict(method="gradcam"), "method must be one of"),
        (dict(target="both_axes"), "target must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            probe_attribution(model, images, progress=False, **kwargs)
