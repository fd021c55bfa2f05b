"""Hugging Face models through asg_probe.hf, and `hf:` / `timm:` names, all offline."""
import json

import pytest
import timm
import torch
import transformers  # in the `test` extra

import asg_probe
from asg_probe.capture import capture_attention
from asg_probe.checkpoint import CheckpointError
from asg_probe.cli import main
from asg_probe.data import data_config_for
from asg_probe.extract import forward_tokens
from asg_probe.hf import HFViT

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)
# class name, config class, extra config, expected prefix tokens
HF_CLASSES = [
    ("ViTModel", "ViTConfig", {}, 1),
    ("DeiTModel", "DeiTConfig", {}, 2),
    ("Dinov2Model", "Dinov2Config", {}, 1),
    ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", {"num_register_tokens": 4}, 5),
    ("CLIPVisionModel", "CLIPVisionConfig", {}, 1),
    ("SiglipVisionModel", "SiglipVisionConfig", {}, 0),
]


def hf_model(cls_name, cfg_name, extra, **over):
    config = getattr(transformers, cfg_name)(**{**SMALL, **extra, **over})
    return getattr(transformers, cls_name)(config).eval()


@pytest.mark.parametrize("cls_name,cfg_name,extra,prefix", HF_CLASSES, ids=[c[0] for c in HF_CLASSES])
def test_folder_loads_with_the_models_own_tokens_and_attention(tmp_path, cls_name, cfg_name, extra, prefix):
    hf = hf_model(cls_name, cfg_name, extra)
    hf.save_pretrained(tmp_path)
    model = asg_probe.load_checkpoint(tmp_path)
    assert isinstance(model, HFViT) and model.num_prefix_tokens == prefix and len(model.blocks) == 2
    assert model.asg_meta["checkpoint_format"] == "transformers"
    x = torch.randn(2, 3, 32, 32)
    hf.set_attn_implementation("eager")  # the reference: transformers' own probabilities
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True, output_attentions=True)
    tokens = forward_tokens(model, x, layers=[0, 1, 2])
    for layer in (0, 1, 2):  # hidden_states[0] enters layer 0 (after CLIP's pre-norm)
        torch.testing.assert_close(tokens[layer], ref.hidden_states[layer][:, prefix:], atol=1e-5, rtol=1e-4)
    assert tokens[2].shape == (2, 16, 32)
    with torch.no_grad(), capture_attention(model) as rec:
        model.forward_features(x)
    assert sorted(rec.attn) == [1, 2]
    for layer in (1, 2):
        torch.testing.assert_close(rec.attn[layer], ref.attentions[layer - 1], atol=1e-5, rtol=1e-4)


def test_weights_are_the_folders_and_state_dict_is_not_duplicated(tmp_path):
    hf = hf_model("ViTModel", "ViTConfig", {})
    hf.save_pretrained(tmp_path)
    model = asg_probe.load_checkpoint(tmp_path)
    state = model.state_dict()
    assert set(state) == {f"hf.{k}" for k in hf.state_dict()}
    torch.testing.assert_close(state["hf.embeddings.position_embeddings"], hf.embeddings.position_embeddings)


def test_preprocessor_config_sets_mean_std_and_input_size(tmp_path):
    hf_model("Dinov2Model", "Dinov2Config", {}, image_size=64).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6],
        "size": {"shortest_edge": 48}, "do_center_crop": True, "crop_size": {"height": 40, "width": 40}}))
    model = asg_probe.load_checkpoint(tmp_path)
    assert data_config_for(model) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 40, 8)
    assert model.patch_embed.grid_size == (8, 8)  # the position table's own grid


def test_missing_preprocessor_config_uses_the_processor_defaults(tmp_path):
    hf_model("CLIPVisionModel", "CLIPVisionConfig", {}).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no preprocessor_config.json.*mean \\(0.481"):
        model = asg_probe.load_checkpoint(tmp_path)
    mean, std, size, patch = data_config_for(model)
    assert mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and (size, patch) == (32, 8)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per folder: a second load is silent
        asg_probe.load_checkpoint(tmp_path)


@pytest.mark.parametrize("cls_name,cfg_name,extra,prefix", [HF_CLASSES[0], HF_CLASSES[4]], ids=["vit", "clip"])
def test_other_input_sizes_resample_the_position_table(cls_name, cfg_name, extra, prefix):
    model = HFViT(hf_model(cls_name, cfg_name, extra))
    tokens = forward_tokens(model, torch.randn(1, 3, 48, 64), layers=[2])
    assert tokens[2].shape == (1, 6 * 8, 32)


def test_eager_models_are_switched_to_sdpa_so_attention_is_read():
    hf = transformers.ViTModel(transformers.ViTConfig(**SMALL), add_pooling_layer=False)
    hf.set_attn_implementation("eager")
    model = HFViT(hf).eval()
    with torch.no_grad(), capture_attention(model) as rec:
        model.forward_features(torch.randn(1, 3, 32, 32))
    assert sorted(rec.attn) == [1, 2] and rec.attn[1].shape == (1, 2, 17, 17)


def test_planted_row_col_ramp_in_hf_vit_is_read_at_every_block(tmp_path):
    """Known answer: position embedding = (row, col) ramp, other weights random and small."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                    intermediate_size=64, image_size=64, patch_size=8)
    hf = transformers.ViTModel(config, add_pooling_layer=False).eval()
    g = 8
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    table = torch.zeros(1, 1 + g * g, 32)
    table[0, 1:, 0] = (rows.reshape(-1) - 3.5) * 3.0
    table[0, 1:, 1] = (cols.reshape(-1) - 3.5) * 3.0
    with torch.no_grad():
        hf.embeddings.position_embeddings.copy_(table)
    hf.save_pretrained(tmp_path)
    model = asg_probe.load_checkpoint(tmp_path)
    result = asg_probe.layerwise_probes(model, num_images=12, n_folds=3, progress=False)
    frame = result.to_frame()
    assert list(frame["layer"]) == [0, 1, 2, 3]
    assert (frame["r2_row"] >= 0.95).all() and (frame["r2_col"] >= 0.95).all(), frame
    assert (frame["r2_control_row"] < 0.5).all()


def test_cli_layerwise_reads_a_folder(tmp_path, capsys):
    hf_model("SiglipVisionModel", "SiglipVisionConfig", {}).save_pretrained(tmp_path / "siglip")
    code = main(["layerwise", str(tmp_path / "siglip"), "--num-images", "6", "--out", str(tmp_path / "out"),
                 "--no-progress"])
    assert code == 0
    doc = json.loads((tmp_path / "out" / "layerwise.json").read_text())
    assert doc["grid"] == [4, 4] and [row["layer"] for row in doc["layers"]] == [0, 1, 2]
    # the folder has no preprocessor_config.json: said once, as the CLI's own warning line
    err = capsys.readouterr().err
    assert sum("no preprocessor_config.json" in line for line in err.splitlines()) == 1
    assert any(line.startswith("warning:") and "siglip" in line for line in err.splitlines())


# --------------------------------------------------------------------------- hf:ORG/NAME and timm:NAME

def _plant_in_hub_cache(cache, repo_id, files):
    """The layout huggingface_hub writes: refs/main -> snapshots/<commit>/<files>."""
    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, write in files.items():
        write(snap / name)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing here may reach the network
    return cache


def test_hf_name_loads_from_the_local_cache(hub_cache):
    hf = hf_model("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", {"num_register_tokens": 2})
    _plant_in_hub_cache(hub_cache, "someorg/tiny-dinov2-reg", {"": lambda p: hf.save_pretrained(p)})
    model = asg_probe.load_checkpoint("hf:someorg/tiny-dinov2-reg")
    assert model.num_prefix_tokens == 3 and model.asg_meta["checkpoint"] == "hf:someorg/tiny-dinov2-reg"


def test_hf_name_not_cached_fails_in_one_line(hub_cache, capsys):
    with pytest.raises(CheckpointError) as err:
        asg_probe.load_checkpoint("hf:facebook/dinov2-small")
    msg = str(err.value)
    assert "\n" not in msg and "huggingface-cli download facebook/dinov2-small" in msg
    assert main(["layerwise", "hf:facebook/dinov2-small", "--no-progress"]) == 1
    err_text = capsys.readouterr().err.strip()
    assert "not in the local Hugging Face cache" in err_text and "Traceback" not in err_text


TIMM_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def _timm_weights(path):
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def test_timm_name_with_a_local_weights_file(tmp_path):
    from asg_probe.pretrained import load_timm_pretrained

    ref = _timm_weights(tmp_path / "w.safetensors")
    model = load_timm_pretrained(TIMM_NAME, file=tmp_path / "w.safetensors")
    torch.testing.assert_close(model.pos_embed, ref.pos_embed)
    assert data_config_for(model) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224, 16)  # its pretrained config


def test_timm_name_loads_from_the_hub_cache(hub_cache):
    holder = {}
    _plant_in_hub_cache(hub_cache, f"timm/{TIMM_NAME}",
                        {"model.safetensors": lambda p: holder.setdefault("m", _timm_weights(p))})
    model = asg_probe.load_checkpoint(f"timm:{TIMM_NAME}")
    torch.testing.assert_close(model.cls_token, holder["m"].cls_token)
    assert model.asg_meta["checkpoint"] == f"timm:{TIMM_NAME}"


def test_timm_name_not_cached_fails_in_one_line(hub_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))
    with pytest.raises(CheckpointError) as err:
        asg_probe.load_checkpoint(f"timm:{TIMM_NAME}")
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and "--arch vit_tiny_patch16_224" in msg
    with pytest.raises(CheckpointError, match="has no model .not_a_model_at_all"):
        asg_probe.load_checkpoint("timm:not_a_model_at_all")
    assert main(["layerwise", f"timm:{TIMM_NAME}", "--no-progress"]) == 1
    assert "pretrained weights are not in the local cache" in capsys.readouterr().err


# --------------------------------------------------------------------------- the other analyses

def test_other_analyses_read_hf_models(tmp_path):
    from asg_probe.analysis.pos_similarity import position_embeddings

    hf = hf_model("DeiTModel", "DeiTConfig", {})
    with torch.no_grad():  # transformers may initialise the table at zero
        hf.embeddings.position_embeddings.normal_()
    hf.save_pretrained(tmp_path / "deit")
    model = asg_probe.load_checkpoint(tmp_path / "deit")
    table, grid = position_embeddings(model)  # the patch rows of DeiT's table (2 prefix rows dropped)
    assert grid == (4, 4)
    torch.testing.assert_close(table, hf.embeddings.position_embeddings[0, 2:].reshape(4, 4, 32))
    assert not asg_probe.check_equivariance(model, num_images=2).certified
    # no position table at all: a DeiT is then permutation-equivariant over its patches
    with torch.no_grad():
        hf.embeddings.position_embeddings.zero_()
    hf.save_pretrained(tmp_path / "deit-nope")
    assert asg_probe.check_equivariance(asg_probe.load_checkpoint(tmp_path / "deit-nope"), num_images=2).certified
