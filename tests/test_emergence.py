"""Emergence across training snapshots: known answers from snapshots with a planted position code."""
import json
import math

import numpy as np
import pytest
import torch

import asg_probe
from asg_probe.analysis.emergence import EmergenceResult, emergence, find_snapshots, seed_group
from asg_probe.errors import UsageError

STEPS = (0, 1, 2, 4, 8, 16)


def _planted_run(folder, appears_at, steps=STEPS, seed=0):
    """Snapshots of one ``ape`` model whose position table is zero before ``appears_at`` and a strong
    (row, col) ramp from then on; every other weight is the same in every snapshot."""
    torch.manual_seed(seed)
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", num_classes=3)
    gh, gw = 8, 8
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ramp = torch.zeros_like(model.pos_embed)
    offset = model.pos_embed.shape[1] - gh * gw  # prefix tokens, if the table has them
    ramp[0, offset:, 0] = 20 * (rows.flatten().float() / (gh - 1) - 0.5)
    ramp[0, offset:, 1] = 20 * (cols.flatten().float() / (gw - 1) - 0.5)
    for step in steps:
        with torch.no_grad():
            model.pos_embed.copy_(ramp if step >= appears_at else torch.zeros_like(ramp))
        asg_probe.save_checkpoint(folder / "snapshots" / f"step_{step:07d}.safetensors", model, step=step)
    return folder


@pytest.fixture(scope="module")
def images():
    from asg_probe.data import load_images

    return load_images(None, num_images=20, img_size=32, seed=0)


def test_finds_the_step_at_which_a_planted_position_code_appears(tmp_path, images):
    run = _planted_run(tmp_path / "planted", appears_at=4)
    res = emergence(run, images=images, layers=[0, 4], progress=False, threshold=0.9, summary_layer=0)
    assert res.runs[0]["steps"] == list(STEPS)
    assert res.first_step(res.runs[0]) == 4
    assert res.first_step(res.runs[0], "r2_row") == 4
    layer0 = res.runs[0]["layers"][0]
    assert layer0["layer"] == 0
    # before the code appears the model is position-free at layer 0: nothing but content to read
    assert max(layer0["r2_col"][:3]) < 0.5
    assert min(layer0["r2_col"][3:]) > 0.99
    # layer 0 has no attention; block 4 has one mean distance per snapshot
    assert layer0["mean_attention_px"] == [None] * len(STEPS)
    assert all(v > 0 for v in res.runs[0]["layers"][1]["mean_attention_px"])


def test_json_table_and_summary_layout(tmp_path, images):
    run = _planted_run(tmp_path / "r", appears_at=2, steps=(0, 2, 4))
    res = emergence([run], images=images, layers=[0, 1], progress=False, threshold=0.9, summary_layer=0)
    doc = json.loads(res.to_json())
    entry = doc["runs"][0]
    assert entry["steps"] == [0, 2, 4]
    assert [e["layer"] for e in entry["layers"]] == [0, 1]
    for key in ("r2_row", "r2_col", "r2_control", "mean_attention_px"):
        assert len(entry["layers"][0][key]) == 3, key
    frame = res.to_frame()
    assert len(frame) == 3 * 2 and set(frame.columns) >= {"run", "step", "layer", "r2_col", "r2_row"}
    assert doc["summary"][0]["first_step_col"] == 2
    assert doc["provenance"]["images"]["num_images"] == 20 and doc["provenance"]["package_version"]


def test_seed_groups_get_a_t_interval_over_seeds(tmp_path, images):
    runs = [_planted_run(tmp_path / "variant" / f"seed{s}", appears_at=a, seed=s) for s, a in ((0, 4), (1, 8))]
    res = emergence(runs, images=images, layers=[0], progress=False, threshold=0.9, summary_layer=0)
    summary = res.summary_rows()
    assert [row["first_step_col"] for row in summary[:2]] == [4, 8]
    group = summary[2]
    assert group["seeds"] == 2 and group["first_step_col"] == 6.0
    half = 12.706204736174698 * np.std([4, 8], ddof=1) / math.sqrt(2)  # t(0.975, 1 dof)
    assert group["first_step_col_ci"] == pytest.approx([6 - half, 6 + half])


def test_a_run_that_never_passes_reports_none(tmp_path, images):
    run = _planted_run(tmp_path / "never", appears_at=10_000, steps=(0, 1))
    res = emergence(run, images=images, layers=[0], progress=False, threshold=0.9, summary_layer=0)
    assert res.first_step(res.runs[0]) is None


def test_snapshot_discovery_and_errors(tmp_path):
    with pytest.raises(UsageError, match="no step_"):
        find_snapshots(tmp_path)
    with pytest.raises(UsageError, match="not a run directory"):
        find_snapshots(tmp_path / "missing")
    run = _planted_run(tmp_path / "r", appears_at=1, steps=(3, 0, 12))
    assert [s for s, _ in find_snapshots(run)] == [0, 3, 12]
    # a plain list of files takes its steps from the names, else from the metadata
    renamed = tmp_path / "weights.safetensors"
    (run / "snapshots" / "step_0000012.safetensors").rename(renamed)
    assert [s for s, _ in find_snapshots([renamed, run / "snapshots" / "step_0000003.safetensors"])] == [3, 12]
    with pytest.raises(UsageError, match="threshold"):
        emergence(run, threshold=0)


def test_seed_group_names():
    assert seed_group("runs/guidance/seed2") == "runs/guidance"
    assert seed_group("none_seed0") == "none"
    assert seed_group("ape") == "ape"


def test_plot_draws_heatmaps_and_curves(tmp_path, images):
    run = _planted_run(tmp_path / "p", appears_at=2, steps=(0, 2, 4))
    res = emergence(run, images=images, layers=[0, 1], progress=False, summary_layer=0)
    fig = res.plot()
    assert len(fig.axes) >= 3
    assert isinstance(res, EmergenceResult) and "first_step_col" in repr(res)
