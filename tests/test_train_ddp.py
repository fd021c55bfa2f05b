"""``torchrun --nproc_per_node=2`` on CPU (gloo): both ranks end with identical weights."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import torch

DRIVER = textwrap.dedent("""
    # Runs the real CLI under torchrun; only captures each rank's model to compare afterwards.
    import os, sys, torch
    from asg_train import cli, trainer

    captured = {}
    build = trainer.build_model

    def capture(cfg, num_classes):
        captured["model"] = build(cfg, num_classes)
        return captured["model"]

    trainer.build_model = capture
    rc = cli.main(sys.argv[1:])
    out = os.environ["DUMP_DIR"]
    torch.save(captured["model"].state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
    sys.exit(rc)
""")


def test_torchrun_two_cpu_processes_keep_identical_weights(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(driver),
           "--config", "train/configs/default.yaml", "data.kind=synthetic", "model.name=vit_tiny_patch4_32",
           "model.img_size=32", "model.kwargs.depth=2", "batch_size=4", "data.num_train=64", "data.num_val=30",
           "eval.sizes=[24,32]", "num_workers=0", "progress=false", "optim.lr=1e-3", "optim.warmup_steps=2",
           "guidance.enabled=true", "guidance.hidden_dim=32", "data.multires_sizes=[24,32]", "max_steps=5",
           "ckpt_every=2", "log_every=1", "device=cpu", "threads=1", f"out={out}"]
    env = {**os.environ, "DUMP_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}  # asg_train as installed
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the trainer's own cross-rank check agrees
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["steps"] == 5
    # evaluation covered the whole validation set once, split across the two processes
    sweep = json.loads((out / "eval.json").read_text())["sweep"]
    assert [r["n"] for r in sweep] == [30, 30]
    # the resumable state holds each process's own RNG state (drop-path noise differs per rank)
    rng = torch.load(out / "train_state.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    # only rank 0 wrote the metrics, one row per step
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 5
