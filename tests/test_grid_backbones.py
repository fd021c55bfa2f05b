"""Grid backbones (hierarchical, windowed, late class token, NHWC blocks), models with no grid,
and every analysis at an input size the model was not built for.

Known answers: a backbone whose feature maps carry a planted coordinate code at two
resolutions is probed at R² ≈ 1 on both grids (and a noise backbone is not); the tokens of
NHWC and late-class-token blocks are the model's own feature maps; a ViT at a new size gives
what the same weights give when timm builds them for that size.
"""
import json

import pytest
import timm
import torch

import asg_probe
from asg_probe.cli import main
from asg_probe.errors import InputError, UsageError
from asg_probe.extract import forward_tokens
from asg_probe.geometry import any_input_size, model_geometry
from asg_probe.intermediates import at_input_size, intermediate_tokens


class PlantedBackbone(torch.nn.Module):
    """Two feature maps, strides 4 and 8, whose first channels are each cell's normalised (row, col)
    (``planted=True``) or noise; ``forward_intermediates`` as timm's backbones have it."""

    def __init__(self, planted=True):
        super().__init__()
        self.planted = planted
        self.feature_info = [{"module": "s0", "reduction": 4, "num_chs": 6}, {"module": "s1", "reduction": 8,
                                                                                "num_chs": 6}]
        self.pretrained_cfg = {"input_size": (3, 32, 32)}
        self.scale = torch.nn.Parameter(torch.ones(()))

    def _map(self, x, stride, seed):
        b, _, h, w = x.shape
        gh, gw = h // stride, w // stride
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(b, 6, gh, gw, generator=gen)
        if self.planted:
            rows = torch.linspace(0, 1, gh)[:, None].expand(gh, gw)
            cols = torch.linspace(0, 1, gw)[None, :].expand(gh, gw)
            noise[:, 0], noise[:, 1] = rows, cols
        return noise * self.scale

    def forward_intermediates(self, x, indices=None, output_fmt="NCHW", intermediates_only=False):
        assert output_fmt == "NCHW" and intermediates_only
        maps = [self._map(x, 4, 0), self._map(x, 8, 1)]
        return [maps[i] for i in indices]


def test_a_planted_code_is_read_on_each_layers_own_grid_and_noise_is_not():
    images = torch.randn(10, 3, 32, 32)
    res = asg_probe.layerwise_probes(PlantedBackbone(), images, n_folds=2, progress=False, alphas=[1e-3],
                                     n_control_seeds=1, init_baseline=False)
    frame = res.to_frame()
    assert frame["layer"].tolist() == [1, 2]
    assert [list(g) for g in frame["grid"]] == [[8, 8], [4, 4]] and frame["stride"].tolist() == [4, 8]
    assert (frame["r2"] > 0.99).all(), frame
    noise = asg_probe.layerwise_probes(PlantedBackbone(planted=False), images, n_folds=2, progress=False,
                                       alphas=[1e-3], n_control_seeds=1, init_baseline=False).to_frame()
    assert (noise["r2"] < 0.5).all(), noise


def test_grid_backbone_geometry_and_its_one_line_refusals():
    geo = model_geometry(PlantedBackbone())
    assert (geo.kind, geo.first_layer, geo.depth, geo.strides, geo.size_multiple) == ("intermediates", 1, 2,
                                                                                        (4, 8), 8)
    with pytest.raises(UsageError, match="multiple of the largest stride 8"):
        geo.check_size(36)
    with pytest.raises(UsageError, match="layer 0 does not exist"):
        asg_probe.layerwise_probes(PlantedBackbone(), torch.randn(4, 3, 32, 32), layers=[0], n_folds=2,
                                   progress=False)
    for analysis in (asg_probe.attention_distance, asg_probe.token_embeddings):
        with pytest.raises(InputError) as err:
            analysis(PlantedBackbone(), torch.randn(4, 3, 32, 32), progress=False)
        assert "grid backbone" in str(err.value) and "\n" not in str(err.value)


def test_a_model_with_no_token_grid_is_refused_as_an_input_error():
    with pytest.raises(InputError, match="no 2D token grid") as err:
        asg_probe.layerwise_probes(torch.nn.Linear(3, 3), torch.randn(6, 3, 32, 32), progress=False)
    assert err.value.exit_code == 1 and "\n" not in str(err.value)


def _swin():
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(1, 1),
                             num_heads=(1, 2), window_size=4, num_classes=0).eval()


def test_swin_at_another_size_runs_on_a_resized_copy_and_leaves_the_model_alone():
    model = _swin()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, grids = intermediate_tokens(at_input_size(model, (64, 64)), torch.randn(2, 3, 64, 64), [1, 2])
    assert grids == {1: (16, 16), 2: (8, 8)} and tokens[2].shape == (2, 64, 32)
    assert model.patch_embed.img_size == (32, 32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # tokens are the feature map, row-major
    maps = model.forward_intermediates(torch.ones(1, 3, 32, 32), indices=[0], output_fmt="NCHW",
                                       intermediates_only=True)
    tokens, _ = intermediate_tokens(model, torch.ones(1, 3, 32, 32), [1])
    assert torch.equal(tokens[1][0, 5], maps[0][0, :, 0, 5]) and torch.equal(tokens[1][0, 8], maps[0][0, :, 1, 0])


def test_nhwc_blocks_give_the_feature_maps_timm_returns():
    """SAM-ViT's blocks carry (B, H, W, D): its tokens are its own intermediates, row-major."""
    model = timm.create_model("samvit_base_patch16", img_size=32, embed_dim=16, depth=2, num_heads=2,
                              window_size=2, global_attn_indexes=(1,), num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = forward_tokens(model, x, layers=[1, 2])
    maps = model.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True, norm=False)
    for layer, fmap in zip((1, 2), maps):
        torch.testing.assert_close(tokens[layer], fmap.flatten(2).transpose(1, 2))


def test_a_class_token_that_joins_late_is_dropped_where_it_joins():
    """ConViT: 16 patch tokens after the GPSA block, 1 + 16 after the class token joined."""
    model = timm.create_model("convit_tiny", img_size=32, embed_dim=16, depth=2, num_heads=4, local_up_to_layer=1,
                              num_classes=0).eval()
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.forward_features(x)
    tokens = forward_tokens(model, x, layers=[1, 2], stop_early=False)
    assert tokens[1].shape[:2] == (2, 4) and tokens[2].shape[:2] == (2, 4)
    torch.testing.assert_close(tokens[2], seen["out"][:, 1:])
    res = asg_probe.attention_distance(model, torch.randn(2, 3, 32, 32), progress=False)
    assert [row["layer"] for row in res.to_dict()["layers"]] == [1, 2]


def test_a_vit_at_a_new_size_equals_timm_built_for_that_size():
    """Position table resampled as timm does (``dynamic_img_size``): same weights, same tokens."""
    fixed = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=0).eval()
    dynamic = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=0,
                                dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        want = dynamic.forward_features(x)
        with any_input_size(fixed):
            got = fixed.forward_features(x)
    torch.testing.assert_close(got, want)
    assert fixed.patch_embed.strict_img_size  # restored
    torch.testing.assert_close(forward_tokens(fixed, x, layers=[0, 1])[1], forward_tokens(dynamic, x, layers=[1])[1])


@pytest.mark.parametrize("command", ["layerwise", "attention-distance", "check-equivariance"])
def test_every_analysis_takes_img_size_from_the_command_line(command, tmp_path, capsys):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=0)
    path = tmp_path / "vit.pt"
    torch.save(model.state_dict(), path)
    extra = ["--folds", "2"] if command == "layerwise" else []
    rc = main([command, str(path), "--arch", "vit_tiny_patch16_224", "--img-size", "48", "--num-images", "6",
               "--batch-size", "6", "--out", str(tmp_path / "out"), "--no-progress", *extra])
    assert rc == 0, capsys.readouterr().err
    (result,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    assert result["provenance"]["images"]["img_size"] == [48, 48]


def test_a_grid_backbone_from_a_bare_state_dict_loads_without_vit_arguments(tmp_path):
    """The loader reads depth/patch/image size off a ViT's weights; Hiera takes none of them."""
    kwargs = dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1))
    model = timm.create_model("hiera_tiny_224", num_classes=0, **kwargs)
    path = tmp_path / "hiera.pt"
    torch.save(model.state_dict(), path)
    loaded = asg_probe.load_checkpoint(path, arch="hiera_tiny_224", **kwargs)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert model_geometry(loaded).kind == "intermediates"
