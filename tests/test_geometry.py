"""Geometry read from the model: measured grid stride and prefix tokens, layer numbering."""
import pytest
import timm
import torch

import asg_probe
from asg_probe.analysis.attention_distance import attention_distance
from asg_probe.extract import forward_tokens
from asg_probe.geometry import ModelGeometry, model_geometry, resolve_layers

SMALL = dict(pretrained=False, img_size=64, depth=1, embed_dim=64, num_heads=2)


@pytest.mark.parametrize("name, kwargs, stride, prefix", [
    ("vit_tiny_patch16_224", {}, 16, 1),
    ("deit_tiny_distilled_patch16_224", {}, 16, 2),                 # class + distillation token
    ("vit_base_patch16_gap_224", {}, 16, 0),                        # no class token
    ("vit_base_patch16_rope_reg1_gap_256", {}, 16, 1),              # one register, no class token
    ("cait_xxs24_224", {"depth_token_only": 1}, 16, 0),             # class token joins after the blocks
    ("xcit_tiny_12_p16_224", {}, 16, 0),                            # likewise
    ("vit_tiny_r_s16_p8_224", {"img_size": 128}, 32, 1),            # grid from the backbone: 4x4 at 128 px
])
def test_grid_stride_and_prefix_tokens_are_measured(name, kwargs, stride, prefix):
    model = timm.create_model(name, **{**SMALL, **kwargs}).train()
    geo = model_geometry(model)
    assert (geo.patch_size, geo.num_prefix_tokens, geo.depth) == (stride, prefix, 1)
    assert model.training  # measured in eval mode, mode restored
    size = geo.img_size
    tokens = forward_tokens(model.eval(), torch.randn(2, 3, size, size), layers=[0, 1])
    assert tokens[1].shape[1] == (size // stride) ** 2  # patch tokens only, whatever the prefix
    assert model_geometry(model) is geo  # cached per model


def test_attention_over_channels_refuses_in_one_line_and_probes_still_work():
    model = timm.create_model("xcit_tiny_12_p16_224", **SMALL)
    assert not model_geometry(model).token_attention
    with pytest.raises(ValueError, match="over channels") as err:
        attention_distance(model, torch.randn(2, 3, 64, 64), progress=False)
    assert "\n" not in str(err.value)
    res = asg_probe.layerwise_probes(model, torch.randn(6, 3, 64, 64), n_folds=3, progress=False)
    assert [r["layer"] for r in res.rows] == [0, 1] and res.grid == (4, 4)


def test_talking_heads_attention_is_read_before_the_head_mixing():
    # CaiT mixes the heads' softmax maps linearly; the maps read must be distributions
    from asg_probe.capture import capture_attention

    model = timm.create_model("cait_xxs24_224", **SMALL, depth_token_only=1).eval()
    with torch.no_grad(), capture_attention(model) as rec:
        model.forward_features(torch.randn(2, 3, 64, 64))
    attn = rec.attn[1]
    assert attn.shape == (2, 2, 16, 16) and attn.min() >= 0
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 16))
    res = attention_distance(model, torch.randn(2, 3, 64, 64), progress=False)
    assert all(0 < v < 4 * 16 * 2 ** 0.5 for v in res.heads_px[1])


def test_non_square_inputs_use_the_stride_per_axis():
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    geo = model_geometry(model)
    assert geo.grid((32, 64)) == (8, 16) and geo.grid(torch.zeros(1, 3, 16, 32).shape) == (4, 8)
    res = attention_distance(model, torch.randn(3, 3, 32, 64), progress=False)
    assert res.grid == (8, 16) and res.num_images == 3
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        geo.check_size((30, 32))
    # a timm model built for a non-square input: measured on that input, probed on it
    wide = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(32, 64), depth=1, embed_dim=64,
                             num_heads=2)
    geo = model_geometry(wide)
    assert (geo.img_size, geo.patch_size, geo.num_prefix_tokens) == ((32, 64), 16, 1)
    res = asg_probe.layerwise_probes(wide, torch.randn(6, 3, 32, 64), n_folds=3, progress=False)
    assert res.grid == (2, 4)
    assert attention_distance(wide, torch.randn(2, 3, 32, 64), progress=False).grid == (2, 4)


def test_resolve_layers_numbers_and_errors():
    assert resolve_layers(None, 2) == [0, 1, 2] and resolve_layers([-1, 0], 2) == [0, 2]
    assert resolve_layers(None, 2, first=1) == [1, 2]
    with pytest.raises(ValueError, match="layers 0..2"):
        resolve_layers([3], 2)
    with pytest.raises(ValueError, match="no attention"):
        resolve_layers([0], 2, first=1)
    with pytest.raises(TypeError, match="integers"):
        resolve_layers(["1"], 2)


def test_declared_geometry_is_used_when_nothing_can_be_measured():
    class Embed:  # not a module: nothing to hook
        patch_size, img_size = (8, 8), (32, 32)

    class Declared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed, self.num_prefix_tokens = Embed(), 3
            self.blocks = torch.nn.ModuleList([torch.nn.Identity()])

    assert model_geometry(Declared()) == ModelGeometry(patch_size=8, num_prefix_tokens=3, depth=1, img_size=32)


def test_a_new_input_size_is_measured_again():
    model = timm.create_model("vit_tiny_patch16_224", **SMALL)
    assert model_geometry(model).img_size == 64
    model.set_input_size(img_size=(96, 96))
    geo = model_geometry(model)
    assert (geo.img_size, geo.grid(geo.img_size)) == (96, (6, 6))
