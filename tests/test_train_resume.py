"""Never lose work: SIGKILL a CPU run after its first checkpoint, ``--resume``, same final weights."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import asg_probe

ARGS = ["--config", "train/configs/default.yaml", "data.kind=synthetic", "model.name=vit_tiny_patch4_32",
        "model.img_size=32", "model.kwargs.depth=2", "model.kwargs.drop_path_rate=0.1",  # RNG matters
        "batch_size=8", "data.num_train=48", "data.num_val=16", "eval.enabled=false", "num_workers=0",
        "progress=false", "optim.lr=1e-3", "optim.warmup_steps=3", "guidance.enabled=true",
        "guidance.hidden_dim=32", "max_steps=60", "ckpt_every=4", "log_every=4", "device=cpu",
        "threads=1", "deterministic=true"]


def _train(out, *extra):
    return [sys.executable, "-m", "asg_train", *ARGS, f"out={out}", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_train(full), cwd=root, env=_env(), check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_train(cut), cwd=root, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = cut / "train_state.pt"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert still_running, "the run finished before it could be killed; raise max_steps"
    assert not (cut / "model.safetensors").exists()
    killed_at = torch.load(state, weights_only=True)["step"]
    assert 0 < killed_at < 60

    result = subprocess.run([sys.executable, "-m", "asg_train", "--resume", str(cut)], cwd=root, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    a = asg_probe.load_checkpoint(full).state_dict()
    b = asg_probe.load_checkpoint(cut).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the guidance head and optimiser were restored too, not only the backbone
    sa = torch.load(full / "train_state.pt", weights_only=True)
    sb = torch.load(state, weights_only=True)
    for key in sa["guidance_head"]:
        assert torch.equal(sa["guidance_head"][key], sb["guidance_head"][key]), key
    # the metrics log has no duplicated steps after the resume
    steps = [int(line.split(",")[0]) for line in (cut / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 60


def test_resume_keeps_the_metric_window_the_clock_and_cleans_killed_writes(tmp_path, monkeypatch):
    """Interrupted at a checkpoint in the middle of a log window: the first row after the resume
    averages the whole window (steps 5-8), as in an uninterrupted run."""
    from asg_train import trainer
    from asg_train.config import resolve

    def cfg(name):
        return resolve(overrides=[a for a in ARGS[2:] if not a.startswith(("max_steps", "ckpt_every", "log_every"))]
                       + ["max_steps=8", "ckpt_every=3", "log_every=4", f"out={tmp_path / name}"])

    def rows(run):
        return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    trainer.run(cfg("full"))
    save = trainer.save_train_state

    def killed_after_step_6(run_dir, **kw):
        path = save(run_dir, **kw)
        if kw["step"] == 6:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(trainer, "save_train_state", killed_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(cfg("cut"))
    monkeypatch.setattr(trainer, "save_train_state", save)
    cut = tmp_path / "cut"
    state = torch.load(cut / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and sorted(rows(cut)) == [4]
    (cut / f".train_state.pt.asg-{2**22 + 1}-x1y2.tmp").write_bytes(b"half a checkpoint")  # a kill -9 during a save

    summary = trainer.run(cfg("cut"), resume=True)
    full, resumed = rows(tmp_path / "full"), rows(cut)
    assert sorted(resumed) == [4, 8]
    for key in ("loss", "loss_task", "loss_coord", "train_acc", "lr", "lambda"):
        assert resumed[8][key] == pytest.approx(full[8][key], rel=1e-6), key
    # the clock counts the part before the interruption too
    assert summary["train_time_s"] >= round(state["extra"]["train_time_s"], 2) > 0
    assert resumed[8]["elapsed_s"] > resumed[4]["elapsed_s"]
    assert summary["final_loss"] == pytest.approx(full[8]["loss"], rel=1e-6)
    assert not list(cut.glob(".*.tmp"))


def test_metrics_log_resume_drops_rows_past_the_checkpoint_and_a_cut_line(tmp_path):
    from asg_train.runlog import MetricsLog

    rows = [{"step": s, "loss": 1.0 / s} for s in (2, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')
    log = MetricsLog(tmp_path, enabled=True, resume_step=4)
    log.write({"step": 6, "loss": 0.1})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,epoch,lr") and [line.split(",")[0] for line in csv_lines[1:]] == ["2", "4", "6"]
