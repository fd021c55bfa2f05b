"""Content or injection: the shuffle test (the certificate is in test_equivariance.py)."""
import pytest
import torch

import asg_probe
from asg_probe.analysis.shuffle import shuffle_test


@pytest.fixture(scope="module")
def images():
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_shuffle_test_separates_none_from_ape(images):
    none = shuffle_test(asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2), images, progress=False)
    ape = shuffle_test(asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2), images, progress=False)
    # no injection: slots cannot be decoded at any layer
    assert all(r["r2_slot"] < 0.05 for r in none.rows)
    # APE injects slot identity at layer 0; the content of noise images says nothing
    assert ape.rows[0]["r2_slot"] > 0.95 and ape.rows[0]["source"] == "injected"
    assert ape.rows[0]["r2_original"] < 0.05


def test_shuffle_test_sees_content_derived_position():
    # Images whose content encodes position (red ramps down the rows, green across the
    # columns): a pos=none model decodes the *original* position of shuffled patches at
    # layer 0 (from content), never the slot.
    ramp = torch.linspace(-1, 1, 32)
    base = torch.stack([ramp[:, None].expand(32, 32), ramp[None, :].expand(32, 32), torch.zeros(32, 32)])
    imgs = base + 0.05 * torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    res = shuffle_test(asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1), imgs, progress=False)
    assert res.rows[0]["r2_original"] > 0.9 and res.rows[0]["r2_slot"] < 0.05
    assert res.rows[0]["source"] == "content"


def test_shuffle_outputs_render(images, tmp_path):
    res = shuffle_test(asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1), images, progress=False)
    assert {p.suffix for p in res.save(tmp_path)} == {".json", ".csv", ".png"}


def test_the_shuffle_result_keeps_its_fitted_probes(images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    res = shuffle_test(model, images, layers=[0], progress=False, label="tiny")
    row = res.rows[0]
    slot, original = res.probe(0, "slot"), res.probe(0)
    assert slot.target_names_ == ("slot_row", "slot_col") and original.target_names_[0] == "original_row"
    assert (slot.cv_r2_[0], slot.cv_r2_[1]) == (row["r2_slot_row"], row["r2_slot_col"])
    assert float(res.probe(0, "unshuffled").cv_r2_.mean()) == row["r2_unshuffled"]
    # APE at layer 0: the slot probe reads each slot's coordinates off unseen tokens
    tokens = asg_probe.extract.forward_tokens(model.eval(), torch.randn(2, 3, 32, 32), layers=[0])[0]
    grid = asg_probe.probes.coordinate_targets((8, 8), dtype=torch.float64)
    assert float((slot.predict(tokens) - grid).abs().max()) < 0.05
    assert res.to_dict()["checkpoint"] == "tiny"
    with pytest.raises(ValueError, match="task must be one of original, slot, unshuffled"):
        res.probe(0, "control")


def test_shuffle_test_at_a_size_the_model_was_not_built_for():
    """A timm ViT built for 32 px, read at 48 px (12 x 12 patches, its position table resampled as timm
    does): the shuffled slots are the 12 x 12 ones, so at layer 0 the slot is read exactly from the
    table and the original position of noise patches not at all."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, num_classes=0).eval()
    noise = torch.randn(10, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    res = shuffle_test(vit, noise, layers=[0], n_folds=2, progress=False)
    assert res.grid == (12, 12) and vit.patch_embed.img_size == (32, 32)
    assert res.rows[0]["r2_slot"] > 0.99 and res.rows[0]["r2_original"] < 0.05


def test_shuffle_test_command_takes_img_size(tmp_path, capsys):
    import json

    from asg_probe.cli import main

    rc = main(["shuffle-test", "ape", "--img-size", "48", "--num-images", "8", "--batch-size", "8",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "shuffle_test.json").read_text())
    assert doc["grid"] == [12, 12] and doc["provenance"]["images"]["img_size"] == [48, 48]
    assert doc["layers"][0]["r2_slot"] > 0.99   # the bundled APE model's table, at 12 x 12 slots
