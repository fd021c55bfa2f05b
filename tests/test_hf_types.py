"""The Hugging Face types added to asg_probe.hf: each model's own hidden states are the tokens
every analysis reads (known answer: same numbers, prefix tokens dropped, patches row-major),
at its own input size and at another one; SigLIP2 is refused in one line naming what is read."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from asg_probe.checkpoint import load_checkpoint  # noqa: E402
from asg_probe.errors import CheckpointError, InputError  # noqa: E402
from asg_probe.extract import forward_tokens  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)

# class, extra config, prefix tokens
TYPES = [
    ("ViTMAEModel", {}, 1),
    ("ViTMSNModel", {}, 1),
    ("IJepaModel", {}, 0),
    ("BeitModel", {"use_relative_position_bias": True}, 1),
    ("Data2VecVisionModel", {"use_relative_position_bias": True}, 1),
    ("DINOv3ViTModel", {"num_register_tokens": 2}, 3),
    ("Aimv2VisionModel", {}, 0),
    ("MetaClip2VisionModel", {}, 1),
]


def _folder(cls, extra, tmp_path):
    config = getattr(transformers, cls.replace("Model", "Config"))(**SMALL, **extra)
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(config).eval()
    folder = tmp_path / cls
    hf.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("cls, extra, prefix", TYPES, ids=[t[0] for t in TYPES])
def test_the_tokens_read_are_the_models_own_hidden_states(cls, extra, prefix, tmp_path, capfd):
    hf, folder = _folder(cls, extra, tmp_path)
    capfd.readouterr()
    model = load_checkpoint(folder)
    out, err = capfd.readouterr()
    assert len((out + err).strip().splitlines()) <= 1, out + err   # no load-report table
    assert model.num_prefix_tokens == prefix
    x = torch.randn(2, 3, 32, 32)
    kwargs = {}
    if cls == "ViTMAEModel":   # the reference: every patch kept, in order
        hf.config.mask_ratio, kwargs["noise"] = 0.0, torch.arange(16.0).expand(2, -1)
    with torch.no_grad():
        hidden = hf(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states
    tokens = forward_tokens(model, x, layers=[0, 2])
    for layer in (0, 2):
        torch.testing.assert_close(tokens[layer], hidden[layer][:, prefix:], rtol=1e-4, atol=1e-5)
    # another size: position tables (or biases, or RoPE) follow the grid; AIMv2's fixed table refuses
    if cls == "Aimv2VisionModel":
        with pytest.raises(InputError, match="--img-size 32"):
            forward_tokens(model, torch.randn(1, 3, 48, 48), layers=[2])
    else:
        assert forward_tokens(model, torch.randn(1, 3, 48, 48), layers=[2])[2].shape == (1, 36, 32)


def test_siglip2_is_refused_in_one_line_naming_what_is_read(tmp_path):
    config = transformers.Siglip2VisionConfig(**{k: v for k, v in SMALL.items() if k != "image_size"})
    transformers.Siglip2VisionModel(config).save_pretrained(tmp_path / "s2")
    with pytest.raises(CheckpointError, match="siglip2_vision_model.*NaFlex.*reads.*DINOv3ViTModel") as err:
        load_checkpoint(tmp_path / "s2")
    assert "\n" not in str(err.value)


def test_a_full_clip_folder_loads_its_vision_tower_without_a_load_report(tmp_path, capfd):
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = transformers.CLIPConfig(text_config=text, vision_config={**text, "image_size": 32, "patch_size": 8},
                                     projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(tmp_path / "clip")
    capfd.readouterr()
    model = load_checkpoint(tmp_path / "clip")
    out, err = capfd.readouterr()
    assert "REPORT" not in out + err and len((out + err).strip().splitlines()) <= 1, out + err
    assert model.asg_meta["unused_weights"] > 0   # the text tower, said once, in the metadata
