"""The bundled reference models say what RESULTS.md says they say (known answers on held-out scenes)."""
import pytest

import asg_probe
from asg_probe.scenes import SceneDataset

BUNDLED = ["ape", "guidance", "guidance-random", "guidance-shuffled", "none", "rope-mixed", "sdt-decay"]


def test_the_seven_variants_ship():
    assert asg_probe.list_reference_models() == BUNDLED


@pytest.fixture(scope="module")
def last_layer_col():
    images = SceneDataset(64, split="val").images()
    out = {}
    for name in ("none", "guidance", "guidance-shuffled"):
        res = asg_probe.layerwise_probes(asg_probe.load_reference_model(name), images, layers=[-1], progress=False)
        out[name] = res.rows[-1]
    return out


def test_position_free_control_stays_at_nones_level_while_guidance_builds_the_column(last_layer_col):
    # RESULTS.md: guidance ~0.54, none ~0.01, the per-image shuffled control ~0.005 (last layer, column)
    assert last_layer_col["guidance"]["r2_col"] > 0.3
    assert last_layer_col["guidance-shuffled"]["r2_col"] < 0.1
    assert abs(last_layer_col["guidance-shuffled"]["r2_col"] - last_layer_col["none"]["r2_col"]) < 0.1
    # every one of them reads the row from content (sky above ground)
    assert min(row["r2_row"] for row in last_layer_col.values()) > 0.7


def test_guidance_shuffled_is_a_position_free_model_with_its_recipe():
    model = asg_probe.load_reference_model("guidance-shuffled")
    assert model.pos == "none"
    config = model.asg_meta["config"]
    assert config["guidance"]["enabled"] and config["guidance"]["target"] == "shuffled"
    assert config["data"]["kind"] == "scenes" and config["max_steps"] == 600
