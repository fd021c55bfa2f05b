"""``hf:`` and ``timm:`` names download when not cached, unless HF_HUB_OFFLINE is set; every failure
is one line. Nothing here reaches the network: the download functions are replaced by stand-ins
that record the call and fail (or succeed) as a download would."""
import pytest
import timm
import torch

import asg_probe
from asg_probe.errors import CheckpointError

pytest.importorskip("transformers")

TIMM_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    return constants


def test_offline_names_say_what_to_do_in_one_line(empty_cache, monkeypatch):
    monkeypatch.setattr(empty_cache, "HF_HUB_OFFLINE", True)
    for name in ("hf:someorg/not-cached", f"timm:{TIMM_NAME}"):
        with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set; unset it to download") as err:
            asg_probe.load_checkpoint(name)
        assert "\n" not in str(err.value)


def test_hf_name_not_cached_is_downloaded_and_a_failed_download_is_one_line(empty_cache, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(empty_cache, "HF_HUB_OFFLINE", False)
    calls = []
    real = huggingface_hub.snapshot_download

    def fake(repo_id, local_files_only=False, **kw):
        if local_files_only:
            return real(repo_id, local_files_only=True)   # the empty cache: not found
        calls.append((repo_id, kw.get("allow_patterns")))
        raise OSError("Cannot reach https://huggingface.co: no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(CheckpointError, match="could not be downloaded .*no network.*huggingface-cli download") as err:
        asg_probe.load_checkpoint("hf:someorg/tiny")
    assert calls == [("someorg/tiny", ["*.json", "*.safetensors"])] and "\n" not in str(err.value)


def test_timm_name_not_cached_is_fetched_by_timm(empty_cache, monkeypatch):
    monkeypatch.setattr(empty_cache, "HF_HUB_OFFLINE", False)
    seen = {}
    real = timm.create_model

    def fake(name, pretrained=False, **kw):   # timm would download here; build without weights instead
        seen[name] = pretrained
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", fake)
    model = asg_probe.load_checkpoint(f"timm:{TIMM_NAME}")
    assert seen == {TIMM_NAME: True} and model.asg_meta["checkpoint"] == f"timm:{TIMM_NAME}"

    def offline_fake(name, pretrained=False, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline_fake)
    with pytest.raises(CheckpointError, match="could not be downloaded .*couldn't connect") as err:
        asg_probe.load_checkpoint(f"timm:{TIMM_NAME}")
    assert "\n" not in str(err.value)
