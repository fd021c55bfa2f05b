"""Snapshots during training: schedule, files, weights at each step, resume, cap and dtype."""
import pytest
import torch
from safetensors import safe_open

import asg_probe
from asg_probe.scenes import SceneDataset
from asg_train import trainer
from asg_train.build import build_model, seed_everything
from asg_train.config import CONFIG_DIR, ConfigError, resolve
from asg_train.snapshots import Snapshots, is_snapshot_step, list_snapshots, snapshot_name, thin


def scenes(tmp_path, *extra, name="run"):
    return resolve(CONFIG_DIR / "cpu_scenes_guidance.yaml", [
        f"out={tmp_path / name}", "max_steps=8", "batch_size=8", "data.num_train=32", "data.num_val=16",
        "eval.enabled=false", "progress=false", "model.kwargs.depth=1", "guidance.hidden_dim=16",
        "threads=1", "deterministic=true", *extra])


def weights(path):
    return asg_probe.load_checkpoint(path).state_dict()


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_steps():
    assert [s for s in range(11) if is_snapshot_step(s, every=3, schedule=None, total_steps=10)] == [0, 3, 6, 9, 10]
    assert [s for s in range(18) if is_snapshot_step(s, every=0, schedule="log", total_steps=17)] == \
        [0, 1, 2, 4, 8, 16, 17]
    assert not any(is_snapshot_step(s, every=0, schedule=None, total_steps=5) for s in range(6))
    assert snapshot_name(12) == "step_0000012.safetensors"


def test_thinning_keeps_step_zero_the_newest_and_log_spacing():
    assert thin([0, 1, 2, 4, 8, 16], 5) == [2]            # 1→4 is the densest stretch on a log scale
    assert thin([0, 1, 2, 3, 4], 4) == [3]
    assert thin([0, 5, 9], 2) == [5]
    assert thin([0, 1, 2], 3) == []


@pytest.mark.parametrize("override, fragment", [
    ("snapshot_schedule=weekly", "snapshot_schedule must be log or null"),
    ("snapshot_every=-1", "snapshot_every must be an integer >= 0"),
    ("snapshot_max=1", "snapshot_max must be an integer >= 2"),
    ("snapshot_dtype=int8", "snapshot_dtype must be"),
])
def test_bad_snapshot_settings(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve(overrides=["data.kind=synthetic", override])


def test_scene_run_writes_the_snapshots_of_its_schedule(tmp_path, capsys):
    cfg = scenes(tmp_path, "snapshot_every=3")
    trainer.run(cfg)
    run = tmp_path / "run"
    assert f"4 snapshots in {run / 'snapshots'}" in capsys.readouterr().out
    found = list_snapshots(run)
    assert [s for s, _ in found] == [0, 3, 6, 8]             # every 3 steps, plus step 0 and the last step
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [snapshot_name(s) for s in (0, 3, 6, 8)]
    for step, path in found:
        meta = asg_probe.load_checkpoint(path).asg_meta
        assert meta["step"] == step and meta["config"]["snapshot_every"] == 3
        assert meta["data_config"]["mean"] == pytest.approx(list(SceneDataset(1).mean))
    # known answers: step 0 is the initialisation, the last step is the exported model
    seed_everything(cfg["seed"])
    init = build_model(cfg, SceneDataset(1).num_classes).state_dict()
    assert same(weights(found[0][1]), init)
    assert same(weights(found[-1][1]), weights(run))
    assert not same(weights(found[1][1]), init) and not same(weights(found[1][1]), weights(run))
    # inference-only: no guidance head inside
    with safe_open(found[1][1], "pt") as f:
        assert not any("row_head" in k or "col_head" in k for k in f.keys())


def test_resume_continues_the_schedule_without_duplicates(tmp_path, monkeypatch):
    cfg = scenes(tmp_path, "snapshot_every=3", "ckpt_every=4")
    save = Snapshots.save

    def killed_after_step_6(self, step, model):
        save(self, step, model)
        if step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(Snapshots, "save", killed_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(cfg)
    run = tmp_path / "run"
    assert [s for s, _ in list_snapshots(run)] == [0, 3, 6]  # the checkpoint is at step 4
    before = {s: weights(p) for s, p in list_snapshots(run)}
    mtime_3 = (run / "snapshots" / snapshot_name(3)).stat().st_mtime_ns
    # a killed write (its pid is beyond Linux's pid_max: a process that is gone), and a user's own file
    (run / "snapshots" / f".{snapshot_name(7)}.asg-{2**22 + 1}-abc.tmp").write_bytes(b"half")
    (run / "snapshots" / ".notes.tmp").write_bytes(b"the user's")

    monkeypatch.setattr(Snapshots, "save", save)
    trainer.run(cfg, resume=True)
    found = list_snapshots(run)
    assert [s for s, _ in found] == [0, 3, 6, 8]
    # the killed write is gone, the user's file stays
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [".notes.tmp"] + [snapshot_name(s)
                                                                                      for s in (0, 3, 6, 8)]
    assert (run / "snapshots" / snapshot_name(3)).stat().st_mtime_ns == mtime_3   # before the checkpoint: kept
    assert same(weights(found[2][1]), before[6])             # step 6 trained again to the same weights
    assert same(weights(found[-1][1]), weights(run))


def test_cap_and_half_precision(tmp_path):
    cfg = scenes(tmp_path, "snapshot_every=1", "snapshot_max=4", "snapshot_dtype=fp16")
    trainer.run(cfg)
    run = tmp_path / "run"
    found = list_snapshots(run)
    assert [s for s, _ in found] == [0, 1, 2, 8]
    with safe_open(found[-1][1], "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    final = weights(run)
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert all(torch.equal(stored[k], final[k].half()) for k in final)
    assert asg_probe.load_checkpoint(found[-1][1]).asg_meta["snapshot"] == {"dtype": "fp16"}
