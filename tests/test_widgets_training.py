"""The training-step explorer driven from Python: move the step slider, check what is shown.

Known answers come from planted snapshots: an ``ape`` model whose position table is
zeroed (its layer-0 tokens hold no position, probe R² low) and the same model with the
table (R² near 1), and a snapshot with zero q/k weights (flat attention, 1/N per patch).
Which snapshot a panel shows is checked against the weights written for that step.
"""
import numpy as np
import pytest
import torch

import asg_probe
from asg_probe.errors import UsageError
from asg_probe.plotting import model_color
from asg_probe.widgets import RunSnapshots, TrainingExplorer

from test_widgets import PNG_MAGIC, noise_images, tiny


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 128-wide solves: threads only add synchronisation on a busy machine
    yield
    torch.set_num_threads(before)


def planted(kind, seed=0):
    """A depth-1 ``ape`` model: ``"blank"`` (no position table), ``"ape"`` or ``"flat"`` (zero q/k)."""
    model = tiny("ape", depth=1, seed=seed)
    with torch.no_grad():
        if kind == "blank":
            model.pos_embed.zero_()
        elif kind == "flat":
            model.blocks[0].attn.qkv.weight.zero_()
            model.blocks[0].attn.q_bias.zero_()
        else:
            assert kind == "ape"
    return model


def write_run(folder, plan):
    """``plan``: ``{step: kind}``; returns ``{step: pos_embed written}``."""
    written = {}
    for step, kind in plan.items():
        model = planted(kind, seed=step)
        asg_probe.save_checkpoint(folder / "snapshots" / f"step_{step:07d}", model, step=step)
        written[step] = model.pos_embed.detach().clone()
    return written


def explorer(runs, **kw):
    kw.setdefault("images", noise_images())
    kw.setdefault("embedding", "pca")
    ex = TrainingExplorer(runs, **kw)
    assert ex.last_error is None, ex.last_error
    return ex


def test_step_slider_shows_the_planted_snapshots(tmp_path):
    written = write_run(tmp_path / "run", {0: "blank", 5: "ape", 20: "flat"})
    ex = explorer({"ape": tmp_path / "run"}, layer=0)
    assert ex.step.options == (0, 5, 20) and ex.step.value == 20      # starts at the last step
    shown = ex.views["ape"].model
    assert torch.equal(shown.pos_embed, written[20])
    ex.step.value = 0
    state = ex.last_render["ape"]
    assert state["step"] == state["snapshot_step"] == 0 and ex.last_error is None
    assert torch.equal(ex.views["ape"].model.pos_embed, written[0])
    assert state["r2"] < 0.3                                         # no position table: content only
    ex.step.value = 5
    state = ex.last_render["ape"]
    assert torch.equal(ex.views["ape"].model.pos_embed, written[5])
    assert state["r2"] > 0.95                                        # the table is decodable at layer 0
    assert np.linalg.norm(state["pred"] - state["true"], axis=1).max() < 0.5
    ex.layer.value = 1
    ex.step.value = 20
    np.testing.assert_allclose(ex.last_render["ape"]["attention"], 1 / 64, rtol=1e-5)
    ex.step.value = 5
    assert not np.allclose(ex.last_render["ape"]["attention"], 1 / 64, rtol=1e-3)
    assert bytes(ex.panel("ape", "attention").value).startswith(PNG_MAGIC)
    assert "step 5" in ex._panels["ape"]["header"].value
    assert model_color("ape") in ex._panels["ape"]["header"].value


def test_runs_snap_to_their_nearest_step_and_play_drives_the_slider(tmp_path):
    write_run(tmp_path / "a", {0: "blank", 5: "ape", 20: "ape"})
    b = write_run(tmp_path / "b", {0: "ape", 10: "blank"})
    ex = explorer({"a": tmp_path / "a", "b": tmp_path / "b"}, layer=0, step=3)
    assert ex.step.options == (0, 5, 10, 20) and ex.step.value == 5    # 3 snaps to the nearest step
    expected = {0: {"a": 0, "b": 0}, 5: {"a": 5, "b": 0},              # 5 is as far from 0 as 10: earlier
                10: {"a": 5, "b": 10}, 20: {"a": 20, "b": 10}}
    for index, step in enumerate(ex.step.options):
        ex.play.value = index                                          # the play button moves the slider
        assert ex.step.value == step and ex.last_error is None
        assert ex.shown_steps == expected[step]
        assert {k: v["snapshot_step"] for k, v in ex.last_render.items()} == expected[step]
        assert torch.equal(ex.views["b"].model.pos_embed, b[expected[step]["b"]])
    assert "step 10 (nearest to 20)" in ex._panels["b"]["header"].value
    assert ex.last_render["b"]["r2"] < 0.3 and ex.last_render["a"]["r2"] > 0.95
    with pytest.raises(ValueError, match="same label"):
        TrainingExplorer([tmp_path / "a", tmp_path / "a"], images=noise_images(), embedding="pca")


def test_snapshots_load_lazily_and_redraw_per_step(tmp_path):
    write_run(tmp_path / "a", {0: "ape", 1: "blank", 2: "ape"})
    write_run(tmp_path / "b", {0: "ape", 2: "ape"})
    ex = explorer({"a": tmp_path / "a", "b": tmp_path / "b"}, layer=0, cache_size=2)
    assert {k: s.loads for k, s in ex.snapshots.items()} == {"a": 1, "b": 1}   # the shown step only
    drawn = ex.render_counts[("a", "field")]
    ex.step.value = 1
    assert ex.snapshots["a"].loads == 2
    assert ex.render_counts[("a", "field")] == drawn + 1      # same layer, image, query: new snapshot
    ex.step.value = 2                                         # cached: nothing read again
    assert ex.snapshots["a"].loads == 2
    ex.step.value = 0                                         # cache of 2 evicts the least recent (1)
    ex.step.value = 1
    assert ex.snapshots["a"].loads == 4 and not ex.snapshots["a"].loaded(2)
    ex.models.value = ("a",)                                  # a hidden run is not loaded
    loads_b = ex.snapshots["b"].loads
    ex.step.value = 2
    assert ex.snapshots["b"].loads == loads_b and list(ex.last_render) == ["a"]
    ex.models.value = ("a", "b")                              # shown again: at the current step
    assert ex.shown_steps["b"] == 2 and ex.last_render["b"]["snapshot_step"] == 2


def test_run_snapshots_errors(tmp_path):
    write_run(tmp_path / "a", {0: "ape", 8: "ape"})
    snaps = RunSnapshots(tmp_path / "a", noise_images(), embedding="pca")
    assert [snaps.nearest(s) for s in (-3, 3, 4, 5, 99)] == [0, 0, 0, 8, 8]
    with pytest.raises(ValueError, match="no snapshot at step 3"):
        snaps.view(3)
    with pytest.raises(UsageError, match="not a run directory"):
        RunSnapshots(tmp_path / "missing")
