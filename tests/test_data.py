"""Image loading: embedded crops are reproducible; folders are walked, decoded and survive bad files."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import asg_probe
from asg_probe.data import (IMAGENET_MEAN, IMAGENET_STD, ImageSet, data_config_for, embedded_images,
                            load_images, preprocess)
from asg_probe.distributed import shard_indices
from asg_probe.inputs import ImageBatches


def test_embedded_is_deterministic_and_seeded():
    a = embedded_images(num_images=6, img_size=32, seed=0)
    b = embedded_images(num_images=6, img_size=32, seed=0)
    c = embedded_images(num_images=6, img_size=32, seed=1)
    assert a.images.shape == (6, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and a.names == b.names
    assert not torch.equal(a.images, c.images)
    # real photographs, not blank or saturated frames
    assert 20 < a.images.float().mean() < 235 and a.images.float().std() > 10
    # each photo is used once before any repeats
    photos = [n.split("[")[0] for n in embedded_images(num_images=10, img_size=8).names]
    assert len(set(photos)) == 10


def test_embedded_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        embedded_images(num_images=0)


def _save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    _save(tmp_path / "a.jpg", good)
    _save(tmp_path / "sub" / "deeper" / "B.PNG", good)                       # nested, upper-case suffix
    _save(tmp_path / "sub" / "grey.png", np.full((20, 30), 128, np.uint8))   # greyscale
    _save(tmp_path / "sub" / "tiny.bmp", np.array([[[255, 0, 0]]], np.uint8))  # 1×1
    _save(tmp_path / "sub" / "deep16.png", np.full((16, 16), 40000, np.uint16))  # 16-bit greyscale
    jpeg = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "sub" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (tmp_path / "sub" / "notes.png").write_text("not an image")
    (tmp_path / "readme.txt").write_text("ignored: not an image suffix")
    return tmp_path


def test_folder_skips_and_counts_bad_files(tree):
    s = load_images(tree, num_images=None, img_size=24)
    assert isinstance(s, ImageSet) and s.images.shape == (5, 3, 24, 24) and s.images.dtype == torch.uint8
    skipped = {p.split("/")[-1]: why for p, why in s.skipped}
    assert set(skipped) == {"truncated.jpg", "notes.png"} and all(skipped.values())
    names = [p.split("/")[-1] for p in s.paths]
    # sorted by relative path: "sub/deep16.png" < "sub/deeper/B.PNG" < "sub/grey.png"
    assert names == ["a.jpg", "deep16.png", "B.PNG", "grey.png", "tiny.bmp"]
    grey = s.images[3]
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all() and abs(int(grey[0, 5, 5]) - 128) <= 1
    assert (s.images[4, 0] == 255).all() and (s.images[4, 1:] == 0).all()  # 1×1 red, upsampled
    assert abs(int(s.images[1, 0, 5, 5]) - 40000 // 256) <= 1  # 16-bit kept as its top 8 bits, not clipped
    assert s.source == str(tree)


def test_folder_choice_is_seeded_and_replaces_bad_files(tree):
    a = load_images(tree, num_images=3, img_size=8, seed=0)
    b = load_images(tree, num_images=3, img_size=8, seed=0)
    assert a.paths == b.paths and torch.equal(a.images, b.images) and len(a) == 3
    picks = {tuple(load_images(tree, num_images=3, img_size=8, seed=s).paths) for s in range(6)}
    assert len(picks) > 1
    assert all(len(load_images(tree, num_images=5, img_size=8, seed=s)) == 5 for s in range(4))


def test_shorter_side_resized_then_centre_cropped(tmp_path):
    bands = np.zeros((30, 90, 3), np.uint8)  # red | green | blue thirds, 30 px tall
    bands[:, :30, 0] = bands[:, 30:60, 1] = bands[:, 60:, 2] = 255
    _save(tmp_path / "bands.png", bands)
    x = load_images(tmp_path, img_size=15).images[0]
    # shorter side 30 → 15, so the width becomes 45 and the centre 15 columns are the green third
    assert (x[1, :, 2:-2] > 240).all() and (x[0, :, 2:-2] < 15).all() and (x[2, :, 2:-2] < 15).all()


def test_exif_rotation_is_applied(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20, 0] = 255  # left half red, right half blue, as stored
    img[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    _save(tmp_path / "phone.jpg", img, exif=exif, quality=95)
    x = load_images(tmp_path, img_size=20).images[0].float()
    assert x[0, :5].mean() > 200 and x[2, -5:].mean() > 200  # displayed: red on top, blue below


def test_folder_errors(tmp_path):
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files") as err:
        load_images(tmp_path / "empty")
    assert "\n" not in str(err.value) and ".jpg" in str(err.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"\xff\xd8 nonsense")
    with pytest.raises(ValueError, match="could be read"):
        load_images(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no such"):
        load_images(tmp_path / "missing")


def test_preprocess_known_answer():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    y = preprocess(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.5))
    assert y.dtype == torch.float32
    assert torch.allclose(y[0, 0, 0], torch.tensor([-2.0, 2.0]))
    assert torch.allclose(y[0, 1, 0], torch.tensor([-1.0, 1.0]))
    assert torch.allclose(preprocess(x.float() / 255, (0.5,) * 3, (0.25, 0.5, 0.5)), y)


def test_data_config_for():
    class Embed:
        patch_size = 8

    class Bare(torch.nn.Module):
        patch_embed = Embed()

    class TimmLike(torch.nn.Module):  # what timm's vit_*_patch16_224(img_size=64) carries
        pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, 224, 224)}

        def __init__(self, img_size=None):
            super().__init__()
            self.patch_embed = Embed()
            self.patch_embed.patch_size, self.patch_embed.img_size = (16, 16), img_size

    # the size the model accepts wins over the cfg's original input size
    assert data_config_for(TimmLike((64, 64))) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 64, 16)
    assert data_config_for(TimmLike())[2] == 224

    assert data_config_for(Bare()) == (IMAGENET_MEAN, IMAGENET_STD, 224, 8)
    with pytest.raises(ValueError, match="patch_size"):
        data_config_for(torch.nn.Linear(2, 2))


def test_image_batches_shards_cover_every_image_once():
    images = torch.randint(0, 256, (11, 3, 4, 4), dtype=torch.uint8)
    seen = []
    for rank in range(3):
        data = ImageBatches(images, batch_size=2, mean=(0.1, 0.2, 0.3), std=(1, 2, 3), shard=(rank, 3))
        for x, idx in data:
            assert x.dtype == torch.float32 and len(x) <= 2 and idx.dtype == torch.long
            assert torch.equal(x, preprocess(images[idx], (0.1, 0.2, 0.3), (1, 2, 3)))
            seen += idx.tolist()
        assert data.num_images == 11  # all processes together
    assert sorted(seen) == list(range(11))
    single = torch.cat([idx for _, idx in ImageBatches(images, batch_size=4)])
    assert single.tolist() == list(range(11))
    assert shard_indices(11, 2, 3).tolist() == [2, 5, 8]
    with pytest.raises(ValueError, match="rank"):
        ImageBatches(images, 2, shard=(3, 3))
    with pytest.raises(ValueError, match="N, 3, H, W"):
        ImageBatches(torch.zeros(2, 4, 4), 2)


def test_image_batches_prepare_records_provenance_and_resizes(tmp_path):
    from PIL import Image

    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = ImageBatches.prepare(model, tmp_path, num_images=10, img_size=16, seed=3)
    prov = data.provenance()
    assert prov["num_images_requested"] == 10 and prov["num_images"] == 3 and prov["seed"] == 3
    assert prov["img_size"] == [16, 16] and prov["split"] is None
    assert [s["path"] for s in prov["skipped"]] == [str(tmp_path / "broken.png")]
    assert json.loads(json.dumps(prov)) == prov
    tensor = ImageBatches.prepare(model, torch.zeros(2, 3, 32, 32)).provenance()
    assert tensor["source"] == "tensor" and tensor["num_images_requested"] is None and tensor["num_images"] == 2
    # resized batches: a constant grey stays that grey, normalised with the model's mean/std
    (x, idx), = data.subset([2], size=8)
    mean, std = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)
    assert x.shape == (1, 3, 8, 8) and idx.tolist() == [2]
    assert torch.allclose(x, (torch.full_like(x, 120 / 255) - mean) / std, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        ImageBatches.prepare(model, torch.zeros(2, 3, 30, 30))


def test_scenes_keyword_gives_the_reference_models_held_out_scenes(tmp_path, monkeypatch):
    from asg_probe.scenes import SceneDataset

    imgs = load_images("scenes", num_images=5, img_size=32)
    assert imgs.images.dtype == torch.uint8 and tuple(imgs.images.shape) == (5, 3, 32, 32)
    assert torch.equal(imgs.images, SceneDataset(5, split="val").images())  # what training evaluated on
    assert "scenes" in imgs.source and imgs.names[0] == "scenes:val[0]"
    # a real folder called "scenes" wins over the keyword
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scenes").mkdir()
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "scenes" / "a.png")
    assert len(load_images("scenes", num_images=5, img_size=32)) == 1
