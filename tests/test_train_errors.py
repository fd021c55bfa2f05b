"""``asg-train``'s error contract: input → exit code → one-line message → files left on disk."""
import json
import re

import pytest

from asg_train import cli, trainer
from asg_train.config import DEFAULTS
from asg_train.runlog import progress_bar
from asg_train.dist import DistContext

TINY = ["data.kind=synthetic", "model.name=vit_tiny_patch4_32", "model.img_size=32", "model.kwargs.depth=1",
        "batch_size=8", "data.num_train=16", "data.num_val=8", "eval.sizes=[32]", "num_workers=0",
        "progress=false", "max_steps=2", "device=cpu"]


def _existing_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    return tmp_path / "notes.txt"


# (case id, overrides built from tmp_path, exit code, message pattern)
CASES = [
    ("pos", lambda t: ["model.pos=bogus"], 2, r"model\.pos must be one of .*none.*got 'bogus'"),
    ("model", lambda t: ["model.name=vit_bogus"], 2, r"model\.name must be one of .*got 'vit_bogus'"),
    ("lr", lambda t: ["optim.lr=-1"], 2, r"optim\.lr must be a number > 0, got -1"),
    ("lr-zero", lambda t: ["optim.lr=0"], 2, r"optim\.lr must be a number > 0"),
    ("betas", lambda t: ["optim.betas=[0.9]"], 2, r"optim\.betas must be two numbers"),
    ("img-size", lambda t: ["model.img_size=0"], 2, r"model\.img_size must be an integer > 0"),
    ("out-file", lambda t: [f"out={_existing_file(t)}"], 2, r"out=.*notes\.txt is a file; pass a directory"),
    ("out-under-file", lambda t: [f"out={_existing_file(t) / 'run'}"], 2, r"notes\.txt is a file, so the run"),
    ("typo", lambda t: ["max_step=3"], 2, r"did you mean max_steps"),
    ("seeds", lambda t: ["seeds=3"], 2, r"seeds must be a non-empty list"),
    ("no-data", lambda t: ["data.kind=imagefolder", f"data.root={t / 'nope'}"], 2, r"data folder not found"),
    ("fp16-cpu", lambda t: ["precision=fp16"], 2, r"precision=fp16 needs CUDA"),
    ("patch", lambda t: ["eval.sizes=[30]"], 2, r"image size 30 .* not a multiple of the patch size 4"),
    ("snapshots", lambda t: ["snapshot_schedule=sometimes"], 2, r"snapshot_schedule must be log or null"),
    # issue 23: one validation layer (types from the defaults, finite numbers, ranges, model arguments)
    ("seed-negative", lambda t: ["seed=-1"], 2, r"seed must be an integer >= 0, got -1"),
    ("threads-text", lambda t: ["threads=abc"], 2, r"threads must be an integer >= 1, got 'abc'"),
    ("crop-ratio-zero", lambda t: ["data.eval_crop_ratio=0"], 2, r"data\.eval_crop_ratio must be a number >= 1"),
    ("lr-inf", lambda t: ["optim.lr=inf"], 2, r"optim\.lr must be a finite number, got inf"),
    ("lr-nan", lambda t: ["optim.lr=nan"], 2, r"optim\.lr must be a finite number, got nan"),
    ("kwargs-unknown", lambda t: ["model.kwargs.bogus=1"], 2,
     r"model\.kwargs \{.*'bogus': 1\} do not fit vit_tiny_patch4_32 .*unexpected keyword argument 'bogus'"),
    ("img-size-text", lambda t: ["model.img_size=abc"], 2, r"model\.img_size must be an integer, got 'abc'"),
    ("flag-text", lambda t: ["compile=maybe"], 2, r"compile: expected true or false"),
]


@pytest.mark.parametrize("case, overrides, code, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_settings_are_one_line_and_leave_nothing(tmp_path, capsys, case, overrides, code, pattern):
    out = tmp_path / "run"
    extra = overrides(tmp_path)
    args = ["--config", str(DEFAULTS), *TINY, f"out={out}", *extra]
    rc = cli.main(args)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and err.startswith("asg-train: error: ") and "Traceback" not in err
    assert re.search(pattern, err), err
    assert not out.exists()                                 # nothing written before the error
    assert captured.out == ""


def test_resume_of_something_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml there" in capsys.readouterr().err


def test_unexpected_error_is_one_line_with_a_hint_and_a_traceback_with_debug(tmp_path, monkeypatch, capsys):
    def broken(cfg, resume=False, command=None, overwrite=False):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(trainer, "run", broken)
    args = ["--config", str(DEFAULTS), *TINY, f"out={tmp_path / 'run'}"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("asg-train: error: RuntimeError: something inside broke "
                   "(rerun with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="something inside broke"):
        cli.main(["--debug", *args])


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["--config", str(DEFAULTS), *TINY, f"out={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_loss"] is not None and summary["train_time_s"] > 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()}
    capsys.readouterr()

    assert cli.main(["--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "already finished (2 steps); nothing to do" in err
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()}
    assert after == before


def test_progress_bars_only_on_process_zero():
    assert progress_bar(DistContext(rank=1, world_size=2), True, total=3) is None
    assert progress_bar(DistContext(rank=0, world_size=2), False, total=3) is None
    bar = progress_bar(DistContext(rank=0, world_size=2), True, total=3)
    assert bar is not None and bar.total == 3
    bar.close()


def test_evaluation_shows_progress(tmp_path, capsys):
    args = ["--config", str(DEFAULTS), *TINY, "progress=true", "eval.sizes=[16,32]", f"out={tmp_path / 'run'}"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "eval 16,32 px" in err and "2/2" in err           # one batch per size, both counted


# --------------------------------------------------------------------------- issue 23: run folders

def _listing(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_folder_holding_a_run_is_refused_locked_or_replaced_only_when_told(tmp_path, capsys):
    from asg_train.rundir import LOCK_FILE

    run = tmp_path / "run"
    args = ["--config", str(DEFAULTS), *TINY, f"out={run}", "snapshot_every=1"]
    assert cli.main(args) == 0
    (run / "notes.txt").write_text("the user's")
    before = _listing(run)
    assert "snapshots/step_0000002.safetensors" in before
    capsys.readouterr()
    # a new run into it: refused, nothing changed
    assert cli.main([*args, "seed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"already holds a training run \(config\.yaml, .*--resume.*"
                                                    r"--overwrite", err), err
    assert _listing(run) == before
    # another asg-train holds the folder (this process's pid: alive)
    import os

    (run / LOCK_FILE).write_text(f"{os.getpid()}\n")
    assert cli.main([*args, "seed=1", "--overwrite"]) == 2
    assert f"being written by another asg-train (pid {os.getpid()})" in capsys.readouterr().err
    # the lock of a writer that is gone is taken over; --overwrite replaces the run, the user's file stays
    (run / LOCK_FILE).write_text(f"{2**22 + 1}\n")
    assert cli.main([*args, "seed=1", "snapshot_every=0", "--overwrite"]) == 0
    after = _listing(run)
    assert not any(name.startswith("snapshots/") for name in after)  # the old run's snapshots: gone
    assert after["notes.txt"] == b"the user's" and LOCK_FILE not in after
    assert "seed: 1" in after["config.yaml"].decode()
    assert cli.main([*args, "--overwrite", "--resume"]) == 2
    capsys.readouterr()
    # a truncated training state: one line naming it, exit 1
    state = run / "train_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    assert cli.main(["--resume", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train_state.pt: cannot resume from it: truncated or corrupt" in err
    state.write_bytes(b"")
    assert cli.main(["--resume", str(run)]) == 1
    assert "cannot resume from it: the file is empty" in capsys.readouterr().err


def test_world_size_without_a_launcher_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["--config", str(DEFAULTS), *TINY, f"out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "WORLD_SIZE=2 is set, but RANK" in err
    assert not (tmp_path / "run").exists()
