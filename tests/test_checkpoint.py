"""Checkpoints: bit-exact round trips, every supported format, and clean failures."""
import os
import random
import types

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import asg_probe
from asg_probe.checkpoint import CheckpointError


def _timm_dinov3(**kw):
    # The ASG code's backbone, shrunk to two blocks so the test stays fast.
    return timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=7, depth=2,
                             img_size=64, **kw).eval()


def _same_outputs(a, b, size=64):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("pos", asg_probe.list_positions())
def test_round_trip_is_bit_exact(tmp_path, pos):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos=pos, num_classes=4, depth=2, num_reg_tokens=1)
    for p in model.parameters():  # move away from the init so nothing is reproduced by chance
        p.data.add_(torch.randn_like(p) * 0.01)
    path = asg_probe.save_checkpoint(tmp_path / "m.safetensors", model, config={"lr": 1e-3},
                                     metrics={"top1": 0.25})
    loaded = asg_probe.load_checkpoint(path)
    assert type(loaded) is type(model) and loaded.pos == pos
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert _same_outputs(model.eval(), loaded, size=32)
    assert loaded.asg_meta["metrics"] == {"top1": 0.25} and loaded.asg_meta["config"] == {"lr": 1e-3}
    assert loaded.asg_meta["code_version"] == asg_probe.__version__


def test_training_normalisation_travels_with_the_model(tmp_path):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    path = asg_probe.save_checkpoint(tmp_path / "m", model, data_config={"mean": [0.5, 0.4, 0.3],
                                                                         "std": [0.2, 0.2, 0.2]})
    loaded = asg_probe.load_checkpoint(path)
    assert loaded.pretrained_cfg["mean"] == (0.5, 0.4, 0.3) and loaded.pretrained_cfg["std"] == (0.2, 0.2, 0.2)


def test_decay_form_survives_round_trip(tmp_path):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="rmt-decay", depth=2, decay_form="decomposed")
    loaded = asg_probe.load_checkpoint(asg_probe.save_checkpoint(tmp_path / "m", model))
    assert all(b.attn.decomposed for b in loaded.blocks)


def test_run_directory_is_accepted(tmp_path):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    asg_probe.save_checkpoint(tmp_path, model)
    assert (tmp_path / "model.safetensors").exists()
    assert asg_probe.load_checkpoint(tmp_path).pos == "ape"


def test_bare_timm_state_dict_with_abs_pos(tmp_path):
    ref = _timm_dinov3(use_abs_pos_emb=True, use_rot_pos_emb=False)
    torch.save(ref.state_dict(), tmp_path / "sd.pt")
    model = asg_probe.load_checkpoint(tmp_path / "sd.pt")
    assert model.pos == "ape" and "pos_embed" in model.asg_meta["inferred"]["pos"]
    assert _same_outputs(ref, model)


def test_bare_state_dict_cannot_tell_rope_from_none(tmp_path):
    ref = _timm_dinov3()  # timm's default DINOv3: RoPE, which stores no parameters
    torch.save(ref.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="pass pos="):
        asg_probe.load_checkpoint(tmp_path / "sd.pt")
    model = asg_probe.load_checkpoint(tmp_path / "sd.pt", pos="rope-dinov3")
    assert _same_outputs(ref, model)


def test_asg_script_checkpoint(tmp_path):
    ref = _timm_dinov3()
    opt = torch.optim.AdamW(ref.parameters())
    ckpt = {
        "model": ref.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
        "args": types.SimpleNamespace(model="vit_small_patch16_dinov3", use_abs_pos_emb=False,
                                      use_rot_pos_emb=True, rc_lambda=300.0, num_classes=7),
        "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
    }
    torch.save(ckpt, tmp_path / "asg.pth")
    model = asg_probe.load_checkpoint(tmp_path / "asg.pth")  # weights_only, no trust needed
    assert model.pos == "rope-dinov3" and model.asg_meta["checkpoint_format"] == "asg-script"
    assert model.asg_meta["args"]["rc_lambda"] == 300.0
    assert _same_outputs(ref, model)


def test_asg_guidance_checkpoint_is_no_pe(tmp_path):
    ref = _timm_dinov3(use_rot_pos_emb=False)
    ckpt = {"model": {"module." + k: v for k, v in ref.state_dict().items()},  # saved from DDP
            "args": types.SimpleNamespace(model="vit_small_patch16_dinov3", strategy="guidance")}
    torch.save(ckpt, tmp_path / "asg.pth")
    model = asg_probe.load_checkpoint(tmp_path / "asg.pth")
    assert model.pos == "none" and _same_outputs(ref, model)


def test_timm_safetensors_export(tmp_path):
    ref = _timm_dinov3(use_abs_pos_emb=True, use_rot_pos_emb=False)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "m.safetensors"))
    model = asg_probe.load_checkpoint(tmp_path / "m.safetensors")
    assert model.asg_meta["checkpoint_format"] == "safetensors" and _same_outputs(ref, model)


def test_plain_timm_vit_with_arch(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=5).eval()
    torch.save(ref.state_dict(), tmp_path / "vit.pt")
    model = asg_probe.load_checkpoint(tmp_path / "vit.pt", arch="vit_tiny_patch16_224")
    assert _same_outputs(ref, model)


def test_hostile_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="trust=True"):
        asg_probe.load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_files_fail_cleanly(tmp_path):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    good = asg_probe.save_checkpoint(tmp_path / "m", model)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    for src in (good, tmp_path / "sd.pt"):
        data = src.read_bytes()
        bad = tmp_path / ("cut_" + src.name)
        bad.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
            asg_probe.load_checkpoint(bad)
        assert "\n" not in str(err.value)


def test_non_checkpoint_and_missing_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, this is not a model")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        asg_probe.load_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="no such file"):
        asg_probe.load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        asg_probe.load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="without model.safetensors"):
        asg_probe.load_checkpoint(tmp_path)


def test_wrong_architecture_names_the_arguments(tmp_path):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="relpos", depth=2)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="--arch/--pos"):
        asg_probe.load_checkpoint(tmp_path / "sd.pt", arch="vit_tiny_patch4_32", pos="ape")
    torch.save(asg_probe.create_model("vit_tiny_patch8_64", pos="ape", depth=2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="matching --arch"):  # head count would be a guess
        asg_probe.load_checkpoint(tmp_path / "w.pt", arch="vit_tiny_patch4_32")
    with pytest.raises(CheckpointError, match="do not fit"):  # shapes differ: one line, not a traceback
        asg_probe.load_checkpoint(tmp_path / "w.pt", arch="vit_tiny_patch8_64", depth=3)
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="arch="):
        asg_probe.load_checkpoint(tmp_path / "other.pt")
