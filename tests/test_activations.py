"""collect_activations: the analyses' own extraction, kept per layer."""
import pytest
import timm
import torch

import asg_probe
from asg_probe.capture import capture_attention
from asg_probe.data import preprocess
from asg_probe.errors import UsageError
from asg_probe.extract import forward_tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=0,
                             reg_tokens=2).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (5, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_tokens_and_attention_are_the_models_own(model, images):
    cache = asg_probe.collect_activations(model, images, layers=[0, 2, -1], attention=True, batch_size=2,
                                          progress=False)
    assert isinstance(cache, asg_probe.ActivationCache)
    assert cache.layers == [0, 2, 3] and sorted(cache.attention) == [2, 3]
    assert cache.grid == (4, 4) and cache.num_prefix_tokens == 3 and cache.patch_size == 8
    assert cache.image_index.tolist() == [0, 1, 2, 3, 4]
    x = preprocess(images, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    ref = forward_tokens(model, x, layers=[0, 2, 3])
    for layer in (0, 2, 3):
        assert cache[layer].shape == (5, 16, 192)
        torch.testing.assert_close(cache[layer], ref[layer], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), capture_attention(model) as rec:
        model.forward_features(x)
    for layer in (2, 3):
        assert cache.attention[layer].shape == (5, 3, 19, 19)  # prefix (class + 2 registers) included
        torch.testing.assert_close(cache.attention[layer], rec.attn[layer], atol=1e-5, rtol=1e-5)
    # the grid view puts token r * gw + c at [r, c]
    torch.testing.assert_close(cache.spatial(3)[:, 1, 2], cache[3][:, 1 * 4 + 2])
    assert cache.coords[6].tolist() == [1, 2]


def test_batch_size_does_not_change_the_result(model, images):
    a = asg_probe.collect_activations(model, images, layers=[1], batch_size=5, progress=False)
    b = asg_probe.collect_activations(model, images, layers=[1], batch_size=2, progress=False)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)


def test_attention_layers_can_be_chosen_apart_from_tokens(model, images):
    cache = asg_probe.collect_activations(model, images, layers=[0], attention=[-1], progress=False)
    assert cache.layers == [0] and sorted(cache.attention) == [3]


def test_clear_errors(model, images):
    with pytest.raises(ValueError, match="no requested layer has attention"):
        asg_probe.collect_activations(model, images, layers=[0], attention=True, progress=False)
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        asg_probe.collect_activations(model, images, layers=[9], progress=False)
    cache = asg_probe.collect_activations(model, images, layers=[1], progress=False)
    with pytest.raises(KeyError, match="layer 2 was not collected"):
        cache[2]
    assert "5 images" in repr(cache)


def test_embedded_photographs_at_a_chosen_size(model):
    cache = asg_probe.collect_activations(model, num_images=3, img_size=48, layers=[1], progress=False)
    assert cache[1].shape == (3, 36, 192) and cache.grid == (6, 6)


def test_a_grid_backbone_gives_each_layer_on_its_own_grid():
    """Swin's feature maps, stage by stage: cell (r, c) of layer l is the map's [:, r, c]."""
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(1, 1),
                             num_heads=(1, 2), window_size=4, num_classes=0).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cache = asg_probe.collect_activations(swin, x, batch_size=2, progress=False)
    assert cache.layers == [1, 2] and cache.grids == {1: (8, 8), 2: (4, 4)} and cache.grid == (8, 8)
    assert cache.patch_size == 4 and cache.num_prefix_tokens == 0
    maps = swin.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True)
    for layer, fmap in zip((1, 2), maps):
        torch.testing.assert_close(cache.spatial(layer), fmap.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
    assert cache.layer_coords(2)[5].tolist() == [1, 1]   # token 5 of a 4-wide grid
    assert asg_probe.collect_activations(swin, x, layers=[-1], progress=False).patch_size == 8
    with pytest.raises(UsageError, match="layer 0 does not exist"):
        asg_probe.collect_activations(swin, x, layers=[0], progress=False)
