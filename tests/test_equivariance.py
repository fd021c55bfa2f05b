"""The equivariance certificate: known answers, including injections it must refuse."""
import pytest
import torch

import asg_probe
from asg_probe.analysis.equivariance import check_equivariance, rounding_tolerance


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("pos", asg_probe.list_positions())
def test_only_the_position_free_model_is_certified(pos, images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos=pos, depth=2)
    if pos == "relpos":
        for b in model.blocks:
            torch.nn.init.normal_(b.attn.spatial.rel_pos_table)
    result = check_equivariance(model, images)
    assert result.certified == (pos == "none"), result.verdict()
    assert ("CERTIFIED" in result.verdict()) == (pos == "none")
    assert result.dtype == "float64"


def _planted_injection(model, relative, seed=0):
    """Add a fixed random vector per slot right after the patch embedding, ``relative`` x the largest entry."""
    with torch.no_grad():
        scale = model.patch_embed(torch.randn(4, 3, 32, 32)).abs().max()
    table = relative * scale * torch.randn(64, model.embed_dim, generator=torch.Generator().manual_seed(seed))
    # patch_embed gives (B, N, D) or (B, gh, gw, D): the table follows its layout, slots row-major
    model.patch_embed.register_forward_hook(lambda m, args, out: out + table.to(out.dtype).reshape(out.shape[1:]))
    return model


def test_a_planted_injection_of_one_millionth_is_refused(images):
    model = _planted_injection(asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2), 1e-6)
    result = check_equivariance(model, images)
    assert not result.certified
    assert result.rows[0]["max_rel_error"] > 1e-7  # seen where it enters, a million times above the floor
    assert "NOT equivariant (float64" in result.verdict() and "layer 0 relative error" in result.verdict()
    # the old certificate (float32, one constant tolerance 1e-4) passed it
    assert check_equivariance(model, images, dtype=torch.float32, tol=1e-4).certified


def test_a_zero_position_table_and_no_position_are_certified_with_the_measured_bound(images):
    ape = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2)
    torch.nn.init.zeros_(ape.pos_embed)
    none = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2)
    for model in (ape, none):
        result = check_equivariance(model, images)
        assert result.certified, result.verdict()
        assert result.max_rel_error < 1e-13  # float64: rounding only
        assert f"no positional injection above {result.max_rel_error:.1e} relative" in result.verdict()
        assert [r["tol"] for r in result.rows] == [rounding_tolerance(layer, "float64", 64) for layer in (0, 1, 2)]


def test_the_check_leaves_the_model_as_it_was(images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_equivariance(model, images)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_tolerance_grows_with_depth_and_patches_from_the_dtype_floor():
    eps64, eps32 = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps
    assert rounding_tolerance(0, torch.float64, 64) == 16 * eps64
    assert rounding_tolerance(3, "float32", 256) == 16 * eps32 * 4 * 2
    assert rounding_tolerance(0, torch.float64, 16) == rounding_tolerance(0, torch.float64, 64)


def test_a_fixed_tolerance_and_bad_arguments(images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    assert check_equivariance(model, images[:1], tol=10.0).certified  # a tolerance that admits anything
    with pytest.raises(ValueError, match="dtype must be a floating-point torch dtype"):
        check_equivariance(model, images, dtype="int8")
    with pytest.raises(ValueError, match="tol must be a positive number"):
        check_equivariance(model, images, tol=-1.0)


def test_the_result_renders(images, tmp_path):
    eq = check_equivariance(asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1), images[:2],
                            label="tiny")
    d = eq.to_dict()
    assert d["certified"] is True and d["checkpoint"] == "tiny" and d["dtype"] == "float64"
    assert d["tol"] == max(r["tol"] for r in d["layers"]) and len(eq.save(tmp_path)) == 3
