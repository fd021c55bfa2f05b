"""The `asg-probe` command: JSON contracts, one-line errors, exit codes, torchrun."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import asg_probe
from asg_probe.cli import build_parser, main


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """A small folder tree of real-looking images (smooth colour fields), one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48] / 47.0
    for i in range(12):
        sub = root / f"class{i % 3}"
        sub.mkdir(exist_ok=True)
        a, b, c = rng.uniform(0.2, 1.0, 3)
        img = np.stack([a * yy, b * xx, c * (1 - yy) * xx], -1) + 0.05 * rng.standard_normal((48, 48, 3))
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(sub / f"img{i}.png")
    (root / "class0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def own_checkpoint(tmp_path_factory):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2, num_classes=3)
    return asg_probe.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ape", model)


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=0)
    path = tmp_path_factory.mktemp("timm") / "vit.pt"
    torch.save(model.state_dict(), path)
    return path


def run_cli(*args):
    return main([str(a) for a in args])


def test_layerwise_json_for_own_checkpoint(own_checkpoint, image_dir, tmp_path, capsys):
    code = run_cli("layerwise", own_checkpoint, "--images", image_dir, "--num-images", 10, "--out", tmp_path,
                   "--no-progress")
    assert code == 0
    out = capsys.readouterr().out
    assert "r2_control" in out and "wrote" in out
    doc = json.loads((tmp_path / "layerwise.json").read_text())
    assert {"checkpoint", "num_images", "img_size", "grid", "layers"} <= set(doc)
    assert doc["grid"] == [8, 8] and doc["num_images"] == 10 and doc["img_size"] == [32, 32]
    assert [r["layer"] for r in doc["layers"]] == [0, 1, 2]
    for row in doc["layers"]:
        assert {"layer", "r2_row", "r2_col", "r2", "r2_control", "selectivity", "alpha", "compression_row",
                "compression_col", "r2_init", "r2_init_ci", "r2_gain", "r2_col_gain_ci"} <= set(row)
        assert not any("content" in key for key in row)
    assert doc["init_seeds"] == [0, 1, 2] and doc["interval"].startswith("95%, delete-one-fold jackknife")
    assert "r2_init" in out and "10 images" in out
    assert (tmp_path / "layerwise.csv").exists() and (tmp_path / "layerwise.png").stat().st_size > 1000


def test_layerwise_and_attention_distance_for_a_timm_vit(timm_checkpoint, image_dir, tmp_path):
    args = ["--arch", "vit_tiny_patch16_224", "--images", image_dir, "--num-images", 10, "--no-progress"]
    assert run_cli("layerwise", timm_checkpoint, *args, "--no-init-baseline", "--out", tmp_path) == 0
    doc = json.loads((tmp_path / "layerwise.json").read_text())
    assert doc["grid"] == [4, 4] and len(doc["layers"]) == 3
    assert "r2_init" not in doc["layers"][0] and "init_seeds" not in doc   # the baseline's opt-out
    assert run_cli("attention-distance", timm_checkpoint, *args, "--out", tmp_path) == 0
    doc = json.loads((tmp_path / "attention_distance.json").read_text())
    assert doc["patch_size"] == 8 and [r["layer"] for r in doc["layers"]] == [1, 2]
    assert all(len(r["heads_px"]) == 3 and len(r["heads_grid"]) == 3 and r["mean_px"] > 0 for r in doc["layers"])


def test_check_equivariance_and_shuffle_commands(own_checkpoint, image_dir, tmp_path, capsys):
    assert run_cli("check-equivariance", own_checkpoint, "--images", image_dir, "--out", tmp_path) == 0
    assert "NOT equivariant" in capsys.readouterr().out
    assert json.loads((tmp_path / "equivariance.json").read_text())["certified"] is False
    assert run_cli("shuffle-test", own_checkpoint, "--images", image_dir, "--num-images", 10, "--out", tmp_path,
                   "--no-progress") == 0
    layer0 = json.loads((tmp_path / "shuffle_test.json").read_text())["layers"][0]
    assert layer0["r2_slot"] > 0.9  # APE: the slot is injected (the smooth test images add content cues)


def test_usage_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert run_cli("layerwise", "--num-images", "many") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value" in err
    assert run_cli("frobnicate") == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert run_cli("layerwise", tmp_path / "nope.safetensors") == 2
    assert "no such file or reference model" in capsys.readouterr().err


def test_bad_checkpoints_are_one_line_with_exit_1(tmp_path, own_checkpoint, capsys):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(own_checkpoint.read_bytes()[:1000])
    assert run_cli("layerwise", cut) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated or corrupt" in err
    bare = tmp_path / "rope.pt"
    torch.save(asg_probe.create_model("vit_tiny_patch4_32", pos="rope-axial", depth=1).state_dict(), bare)
    assert run_cli("layerwise", bare) == 1
    assert "--pos" in capsys.readouterr().err


def test_installed_console_script_runs(own_checkpoint, image_dir, tmp_path):
    exe = shutil.which("asg-probe", path=os.path.dirname(sys.executable)) or shutil.which("asg-probe")
    assert exe, "the asg-probe console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "pos-similarity", str(own_checkpoint), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "pos_similarity.json").exists()


def test_torchrun_splits_images_and_combines_statistics(own_checkpoint, image_dir, tmp_path):
    single = tmp_path / "single"
    # float64 statistics (the default), so one process and two agree to rounding (the --fast float32
    # Gram path would differ at ~1e-4 on these near-perfect fits and hide a real combining error)
    assert run_cli("layerwise", own_checkpoint, "--images", image_dir, "--num-images", 10, "--out", single,
                   "--no-progress") == 0
    multi = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "asg_probe.cli", "layerwise", str(own_checkpoint),
                           "--images", str(image_dir), "--num-images", "10", "--out", str(multi), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((single / "layerwise.json").read_text())
    b = json.loads((multi / "layerwise.json").read_text())
    assert a["num_images"] == b["num_images"] == 10
    for ra, rb in zip(a["layers"], b["layers"]):
        assert ra["r2"] == pytest.approx(rb["r2"], abs=1e-6)
        assert ra["alpha"] == pytest.approx(rb["alpha"], rel=1e-9)


def test_reference_models_are_probed_on_scenes_by_default(own_checkpoint):
    from asg_probe.cli import _default_images, build_parser

    parse = build_parser().parse_args
    assert _default_images(parse(["layerwise"])) == "scenes"            # the default checkpoint: guidance
    assert _default_images(parse(["layerwise", "ape"])) == "scenes"
    assert _default_images(parse(["report"])) == "scenes"               # every reference model
    assert _default_images(parse(["report", "none", str(own_checkpoint)])) is None  # a file: photographs
    assert _default_images(parse(["layerwise", str(own_checkpoint)])) is None
    assert _default_images(parse(["layerwise", "ape", "--images", "some/dir"])) == "some/dir"


def test_models_trained_on_scenes_are_probed_on_scenes_by_default(tmp_path):
    """After loading, the checkpoint's own training config decides (reference models, scene runs)."""
    from asg_probe.cli import _default_images, build_parser, load_model

    parse = build_parser().parse_args
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    run = asg_probe.save_checkpoint(tmp_path / "run" / "model.safetensors", model, config={"data": {"kind": "scenes"}})
    photos = asg_probe.save_checkpoint(tmp_path / "photos.safetensors", model, config={"data": {"kind": "folder"}})
    args = parse(["report", str(run.parent), str(photos), "ape"])
    loaded = {spec: load_model(spec, args) for spec in (str(run.parent), str(photos), "ape")}
    assert _default_images(args, [loaded[str(run.parent)], loaded["ape"]]) == "scenes"
    assert _default_images(args, list(loaded.values())) is None  # one model not trained on scenes: photographs
    assert _default_images(parse(["layerwise", "--images", "dir"]), [loaded["ape"]]) == "dir"


def test_commands_share_their_common_flags_with_their_own_defaults():
    parse = build_parser().parse_args
    common = ["--arch", "vit_tiny_patch4_32", "--pos", "ape", "--out", "o", "--seed", "3", "--device", "cpu",
              "--images", "d", "--img-size", "32", "--batch-size", "4", "--no-progress", "--trust"]
    for command in ("layerwise", "attention-distance", "attention-offsets", "embeddings", "shuffle-test",
                    "check-equivariance", "resolution", "attribution", "report"):
        args = parse([command, *common])
        assert (args.arch, args.pos, str(args.out), args.seed, args.images, args.img_size, args.batch_size,
                args.no_progress, args.trust) == ("vit_tiny_patch4_32", "ape", "o", 3, "d", 32, 4, True, True)
    defaults = {c: parse([c]).num_images for c in ("layerwise", "check-equivariance", "attribution", "report")}
    assert defaults == {"layerwise": 64, "check-equivariance": 8, "attribution": 32, "report": 64}
    assert not hasattr(parse(["pos-similarity"]), "images")
    assert parse(["--debug", "list"]).debug and parse(["list", "--debug"]).debug and not parse(["list"]).debug


def test_emergence_command_over_a_runs_snapshots(tmp_path, capsys):
    run = tmp_path / "run"
    for step in (0, 5):
        torch.manual_seed(step)
        model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
        asg_probe.save_checkpoint(run / "snapshots" / f"step_{step:07d}.safetensors", model, step=step)
    out = tmp_path / "out"
    assert run_cli("emergence", run, "--num-images", 6, "--out", out, "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "first_step_col" in printed and "computed on: 6 images" in printed
    doc = json.loads((out / "emergence.json").read_text())
    assert doc["runs"][0]["steps"] == [0, 5] and [r["layer"] for r in doc["runs"][0]["layers"]] == [0, 1]
    assert doc["provenance"]["command"].startswith("asg-probe emergence ")
    assert sorted(p.name for p in out.iterdir()) == ["emergence.csv", "emergence.json", "emergence.png"]
    assert run_cli("emergence", tmp_path / "out", "--out", tmp_path / "out2") == 2  # no snapshots there
    assert "no step_*.safetensors snapshots" in capsys.readouterr().err
