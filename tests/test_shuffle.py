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
