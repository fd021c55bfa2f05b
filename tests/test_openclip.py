"""open_clip image towers: the tokens read are open_clip's own, attention is read through its
nn.MultiheadAttention (known answer: zero queries and keys give uniform attention, of the grid's
mean pairwise distance), and ``open_clip:ARCH`` names work from the command line."""
import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

import asg_probe  # noqa: E402
from asg_probe.analysis.attention_distance import uniform_distance  # noqa: E402
from asg_probe.cli import main  # noqa: E402
from asg_probe.extract import forward_tokens  # noqa: E402
from asg_probe.openclip import OpenCLIPViT, from_open_clip  # noqa: E402

TINY = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
            text_cfg=dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1))


def _tiny():
    torch.manual_seed(0)
    return open_clip.CLIP(**TINY).eval()


def test_the_tokens_read_are_open_clips_own():
    clip = _tiny()
    model = from_open_clip(clip)
    assert isinstance(model, OpenCLIPViT) and model.num_prefix_tokens == 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = clip.visual._embeds(x)
        want = {0: h[:, 1:]}
        for i, block in enumerate(clip.visual.transformer.resblocks, start=1):
            h = block(h)
            want[i] = h[:, 1:]
    got = forward_tokens(model, x, layers=[0, 1, 2])
    for layer in (0, 1, 2):
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-4, atol=1e-5)
    assert forward_tokens(model, torch.randn(1, 3, 48, 48), layers=[2])[2].shape == (1, 36, 32)  # table resampled


def test_uniform_attention_has_the_grids_mean_distance():
    clip = _tiny()
    with torch.no_grad():
        for block in clip.visual.transformer.resblocks:
            block.attn.in_proj_weight[:64].zero_()   # queries and keys
            block.attn.in_proj_bias[:64].zero_()
    res = asg_probe.attention_distance(from_open_clip(clip), torch.randn(2, 3, 32, 32), progress=False)
    frame = res.to_frame()
    assert len(frame) == 4   # 2 layers x 2 heads
    assert frame["distance_px"].sub(uniform_distance((4, 4), 8)).abs().max() < 1e-4


def test_open_clip_names_from_the_command_line(tmp_path, capsys):
    rc = main(["attention-distance", "open_clip:ViT-S-32", "--img-size", "64", "--num-images", "2",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "attention_distance.json").read_text())
    assert doc["patch_size"] == 32 and len(doc["layers"]) == 12
    rc = main(["layerwise", "open_clip:no-such-model", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "no such model" in err and len(err.splitlines()) == 1
