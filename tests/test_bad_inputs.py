"""Every bad input to ``asg-probe`` gets one line on stderr, the right exit code, and leaves the disk tidy.

One table: command line → exit code → stderr pattern → what is on disk afterwards. Exit 2 is
a usage error (checked before any model is loaded or image read, so no output folder is
created), exit 1 an input that cannot be read (or a bug: then with a ``--debug`` hint). The
cases come from issue 14 and include the ones that already passed (hostile pickle, truncated
checkpoint) so they keep passing. Then: interrupted saves leave the old results or the new
ones, never a mix, and results say what they were computed on.

Everything runs in-process through ``asg_probe.cli.main`` on a one-block 32-px model and
a handful of 32-px images.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import asg_probe
from asg_probe.cli import main

FAST = ["--num-images", "6", "--no-progress"]


# --------------------------------------------------------------------------- fixtures

def _png_header_only(path, width, height):
    """A valid PNG that claims ``width``×``height`` pixels: a decompression bomb to Pillow."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Every input the table refers to, built once."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {}
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    paths["ckpt"] = asg_probe.save_checkpoint(root / "tiny-ape.safetensors", model)
    # a training run folder whose config says it trained on procedural scenes
    run = root / "scenes-run"
    asg_probe.save_checkpoint(run / "model.safetensors", model, config={"data": {"kind": "scenes"}})
    paths["run"] = run
    # images: 6 readable, one corrupt file, one decompression bomb
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    _png_header_only(images / "bomb.png", 30000, 30000)
    paths["images"] = images
    unreadable = root / "unreadable"
    unreadable.mkdir()
    (unreadable / "broken.png").write_bytes(b"\x89PNG but no more")
    paths["unreadable"] = unreadable
    (root / "no-images").mkdir()
    (root / "no-images" / "notes.txt").write_text("nothing to see")
    paths["no_images"] = root / "no-images"
    paths["file"] = root / "a-file.txt"
    paths["file"].write_text("keep me")
    # checkpoints that cannot be read
    paths["cut"] = root / "cut.safetensors"
    paths["cut"].write_bytes(paths["ckpt"].read_bytes()[:1000])
    paths["empty"] = root / "empty.pt"
    paths["empty"].write_bytes(b"")
    paths["foreign"] = root / "notes.pt"
    paths["foreign"].write_text("this is not a checkpoint\n")
    paths["marker"] = root / "pwned"
    paths["hostile"] = root / "hostile.pt"
    paths["hostile"].write_bytes(pickle.dumps(_Payload(str(paths["marker"])), protocol=2))
    paths["bare_rope"] = root / "rope.pt"
    torch.save(asg_probe.create_model("vit_tiny_patch4_32", pos="rope-axial", depth=1).state_dict(),
               paths["bare_rope"])
    timm_vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                                 num_classes=0)
    paths["timm"] = root / "timm-vit.pt"
    torch.save(timm_vit.state_dict(), paths["timm"])
    # issue 23: a NaN weight, floats stored as integers, a zip bomb, metadata of the wrong shape
    broken = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    with torch.no_grad():
        broken.blocks[0].attn.qkv.weight[3, 5] = float("nan")
    paths["nan"] = asg_probe.save_checkpoint(root / "nan.safetensors", broken)
    paths["int_weights"] = root / "int-weights.pt"
    torch.save({k: v.round().to(torch.int32) if k == "pos_embed" else v for k, v in model.state_dict().items()},
               paths["int_weights"])
    paths["zip_bomb"] = root / "bomb.pt"
    with zipfile.ZipFile(paths["zip_bomb"], "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", b"\0" * (100 << 20))  # 100 MiB from a 0.1 MiB file
    paths["bad_meta"] = root / "bad-meta.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(paths["bad_meta"]),
              metadata={"asg_probe": json.dumps({"model": ["vit_tiny_patch4_32"]})})
    paths["no_pos"] = asg_probe.save_checkpoint(root / "no-pos.safetensors",
                                                asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1))
    # a run whose snapshots are two architectures (a deeper model's snapshot dropped in)
    mixed = root / "mixed-run"
    asg_probe.save_checkpoint(mixed / "snapshots" / "step_0000000.safetensors", model, step=0)
    asg_probe.save_checkpoint(mixed / "snapshots" / "step_0000004.safetensors",
                              asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2), step=4)
    paths["mixed_run"] = mixed
    return paths


class _Payload:
    """Unpickling this would create a file: the loader must refuse before running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _unavailable_devices():
    """Device names this machine lacks (so the cases hold on a GPU machine too)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = [f"cuda:{count}", "tpu"]
    if count == 0:
        devices.append("cuda")
    if not torch.backends.mps.is_available():
        devices.append("mps")
    return devices


# --------------------------------------------------------------------------- the table

@dataclass
class Case:
    id: str
    argv: list            # {name} is replaced by env[name]; {out} by the case's output folder
    code: int
    stderr: str           # regex, searched in the one stderr line
    outputs: list = field(default_factory=list)  # file names expected in {out}; [] = no folder at all
    loads: bool = False   # the failure is found only once the model is loaded (else: before loading)


DEVICE_CASES = [Case(f"{cmd}-device-{dev}", [cmd, "{ckpt}", "--device", dev, "--out", "{out}"], 2,
                     rf"--device {re.escape(dev)}: .*(not available|no CUDA GPU|this machine has|not a device)")
                for cmd in ("layerwise", "attention-distance", "report") for dev in _unavailable_devices()]

CASES = DEVICE_CASES + [
    # sizes, counts and tolerances (issue 14, item 4)
    Case("batch-size-0", ["layerwise", "{ckpt}", "--batch-size", "0", "--out", "{out}"], 2,
         r"--batch-size: must be a positive integer, got 0"),
    Case("batch-size-negative", ["layerwise", "{ckpt}", "--batch-size", "-1", "--out", "{out}"], 2,
         r"--batch-size: must be a positive integer, got -1"),
    Case("img-size-0", ["layerwise", "{ckpt}", "--img-size", "0", "--out", "{out}"], 2,
         r"--img-size: must be a positive integer, got 0"),
    Case("num-images-0", ["shuffle-test", "{ckpt}", "--num-images", "0", "--out", "{out}"], 2,
         r"--num-images: must be a positive integer"),
    Case("num-images-not-a-number", ["layerwise", "--num-images", "many"], 2, r"invalid int value: 'many'"),
    Case("tol-negative", ["check-equivariance", "{ckpt}", "--tol", "-1", "--out", "{out}"], 2,
         r"--tol: must be a positive number, got -1"),
    Case("tol-nan", ["check-equivariance", "{ckpt}", "--tol", "nan", "--out", "{out}"], 2,
         r"--tol: must be a positive number"),
    Case("folds-1", ["layerwise", "{ckpt}", "--folds", "1", "--out", "{out}"], 2, r"--folds: must be at least 2"),
    Case("img-size-not-multiple-of-patch", ["layerwise", "{ckpt}", "--img-size", "30", "--out", "{out}", *FAST],
         2, r"image size 30x30 is not a multiple of the patch size 4", loads=True),
    Case("layer-out-of-range", ["layerwise", "{ckpt}", "--layers", "9", "--out", "{out}", *FAST], 2,
         r"layer 9 does not exist: this model has layers 0\.\.1", loads=True),
    Case("too-few-images-for-folds", ["layerwise", "{ckpt}", "--num-images", "3", "--out", "{out}",
                                      "--no-progress"], 2, r"3 images are too few for 5-fold", loads=True),
    Case("resolution-too-few-images", ["resolution", "{ckpt}", "--out", "{out}", *FAST], 2,
         r"resolution transfer needs at least 10 images", loads=True),
    Case("attribution-patch-outside-grid", ["attribution", "{ckpt}", "--patch", "8", "0", "--out", "{out}", *FAST],
         2, r"patch \(8, 0\) is outside the 8x8 grid", loads=True),
    Case("attribution-image-index-outside", ["attribution", "{ckpt}", "--image-index", "6", "--out", "{out}",
                                             *FAST], 2, r"image_index 6 is outside the image set: pass 0\.\.5", loads=True),
    # --arch / --pos (item 4)
    Case("pos-with-timm-arch", ["layerwise", "{timm}", "--arch", "vit_tiny_patch16_224", "--pos", "none",
                                "--out", "{out}"], 2, r"--pos applies only to asg_probe architectures"),
    Case("unknown-pos", ["layerwise", "{ckpt}", "--pos", "bogus", "--out", "{out}"], 2,
         r"--pos bogus: unknown mechanism; choose one of .*sdt-decay"),
    Case("unknown-arch", ["layerwise", "{timm}", "--arch", "vit_bogus", "--out", "{out}"], 2,
         r"--arch vit_bogus: neither an asg_probe architecture"),
    # output location (item 3): refused before the computation
    Case("out-is-a-file", ["layerwise", "{ckpt}", "--out", "{file}"], 2, r"is an existing file; give a folder"),
    Case("out-below-a-file", ["layerwise", "{ckpt}", "--out", "{file}/sub"], 2, r"which is a file"),
    # inputs that do not exist, or hold nothing usable
    Case("no-such-checkpoint", ["layerwise", "{out}/nope.safetensors"], 2, r"no such file or reference model"),
    Case("no-such-image-folder", ["layerwise", "{ckpt}", "--images", "{out}/nowhere", "--out", "{out}"], 2,
         r"--images .*nowhere: no such file or folder"),
    Case("folder-without-images", ["layerwise", "{ckpt}", "--images", "{no_images}", "--out", "{out}", *FAST], 2,
         r"no image files found", loads=True),
    Case("unknown-command", ["frobnicate"], 2, r"invalid choice: 'frobnicate'"),
    Case("emergence-without-snapshots", ["emergence", "{run}", "--out", "{out}"], 2,
         r"no step_\*\.safetensors snapshots in .*scenes-run", loads=True),
    Case("emergence-max-snapshots-1", ["emergence", "{run}", "--max-snapshots", "1", "--out", "{out}"], 2,
         r"--max-snapshots: must be at least 2"),
    Case("unknown-timm-name", ["layerwise", "timm:vit_bogus", "--out", "{out}"], 1,
         r"timm:vit_bogus: timm \S+ has no model 'vit_bogus'", loads=True),
    # inputs that exist but cannot be read: exit 1
    Case("hostile-pickle", ["layerwise", "{hostile}", "--out", "{out}"], 1,
         r"refused to unpickle .*nothing was run", loads=True),
    Case("truncated-safetensors", ["layerwise", "{cut}", "--out", "{out}"], 1, r"truncated or corrupt", loads=True),
    Case("empty-file", ["attention-distance", "{empty}", "--out", "{out}"], 1, r"the file is empty", loads=True),
    Case("foreign-file", ["layerwise", "{foreign}", "--out", "{out}"], 1, r"not a checkpoint", loads=True),
    Case("bare-state-dict-needs-pos", ["layerwise", "{bare_rope}", "--out", "{out}"], 1, r"pass pos= \(--pos\)", loads=True),
    Case("bare-timm-state-dict", ["layerwise", "{timm}", "--out", "{out}"], 1,
         r"timm's VisionTransformer layout \(width 192, patch 8, 1 blocks\).*likely --arch vit_tiny_patch16_224", loads=True),
    Case("no-image-readable", ["layerwise", "{ckpt}", "--images", "{unreadable}", "--out", "{out}", *FAST], 1,
         r"none of the 1 image files could be read", loads=True),
    # issue 23, class 5: plain bad input is a usage error with the right words, not a "bug"
    Case("seed-negative", ["layerwise", "{ckpt}", "--seed", "-1", "--out", "{out}"], 2,
         r"--seed: must be 0 or more, got -1"),
    Case("img-size-beyond-the-bound", ["layerwise", "{ckpt}", "--img-size", "20000", "--out", "{out}"], 2,
         r"--img-size: must be at most 2048, got 20000"),
    Case("resolution-size-beyond-the-bound", ["resolution", "{ckpt}", "--sizes", "32", "9999", "--out", "{out}"],
         2, r"--sizes: must be at most 2048, got 9999"),
    Case("layer-far-below-range", ["layerwise", "{ckpt}", "--layers", "-99", "--out", "{out}", *FAST], 2,
         r"layer -99 does not exist: this model has layers 0\.\.1, or -2\.\.-1 counted from the end", loads=True),
    Case("embeddings-one-image", ["embeddings", "{ckpt}", "--num-images", "1", "--out", "{out}", "--no-progress"],
         2, r"token embeddings need at least 2 images, got 1", loads=True),
    Case("pos-similarity-without-embedding", ["pos-similarity", "{no_pos}", "--out", "{out}"], 2,
         r"has no position-embedding table to compare", loads=True),
    # class 1: a non-finite weight is an input error naming the file and the tensor, never a result
    *[Case(f"nan-weight-{cmd}", [cmd, "{nan}", "--out", "{out}", *extra], 1,
           r"nan\.safetensors: non-finite values \(NaN or inf\) in blocks\.0\.attn\.qkv\.weight", loads=True)
      for cmd, extra in (("check-equivariance", FAST), ("attention-distance", FAST), ("pos-similarity", []))],
    Case("float-weights-stored-as-int", ["pos-similarity", "{int_weights}", "--pos", "ape", "--out", "{out}"], 1,
         r"int-weights\.pt: pos_embed is stored as int32, but the model holds floating-point weights", loads=True),
    Case("malformed-metadata", ["layerwise", "{bad_meta}", "--out", "{out}"], 1,
         r"bad-meta\.safetensors: the asg_probe metadata is malformed \('model' is a list\)", loads=True),
    # class 4: a bound before work
    Case("zip-bomb-pickle", ["layerwise", "{zip_bomb}", "--out", "{out}"], 1,
         r"bomb\.pt: the archive would unpack to 100 MiB .*zip bomb.*nothing was read", loads=True),
    # class 3: mixed inputs refused before any snapshot is loaded
    Case("emergence-mixed-architectures", ["emergence", "{mixed_run}", "--out", "{out}", *FAST], 1,
         r"snapshot step_0000004\.safetensors is vit_tiny_patch4_32 pos=ape \{\"depth\": 2\}, but "
         r"step_0000000\.safetensors is .*\{\"depth\": 1\}"),
]


def _fill(argv, env, out):
    return [a.replace("{out}", str(out)).format(**{k: str(v) for k, v in env.items()}) if "{" in a else a
            for a in argv]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_gives_one_line_and_its_exit_code(case, env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    if not case.loads:  # found by the checks that run before any model is loaded or image read
        def too_early(*args, **kwargs):
            raise AssertionError("a model was loaded before the arguments were checked")

        monkeypatch.setattr(asg_probe.checkpoint, "load_checkpoint", too_early)
    before = env["file"].read_text()
    code = main(_fill(case.argv, env, out))
    captured = capsys.readouterr()
    assert code == case.code, captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert re.search(case.stderr, captured.err), captured.err
    assert "Traceback" not in captured.err and "--debug" not in captured.err  # a user error, not a bug
    assert captured.out == ""
    if case.outputs:
        assert sorted(p.name for p in out.iterdir()) == sorted(case.outputs)
    else:
        assert not out.exists()  # nothing written, not even the folder
    assert env["file"].read_text() == before and not env["marker"].exists()


def test_read_only_output_folder_is_refused_before_the_computation(env, tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(asg_probe.checkpoint, "load_checkpoint",
                        lambda *a, **k: pytest.fail("the model was loaded before the output folder was checked"))
    assert main(["layerwise", str(env["ckpt"]), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"cannot write in .* \(Read-only file system\); choose another", err)


def test_help_shows_each_commands_own_defaults(capsys):
    for command, default in (("check-equivariance", 8), ("attribution", 32), ("layerwise", 64)):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert f"number of images (default: {default})" in text


# --------------------------------------------------------------------------- bugs: exit 1, --debug

def test_an_unexpected_error_is_one_line_with_a_debug_hint(monkeypatch, capsys):
    from asg_probe import cli

    def broken(args, rank):
        return 1 / 0

    monkeypatch.setitem(cli.COMMANDS, "list", broken)
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert err == "error: ZeroDivisionError: division by zero (rerun with --debug for the traceback)\n"
    for argv in (["list", "--debug"], ["--debug", "list"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and "in broken" in err
        assert err.endswith("error: ZeroDivisionError: division by zero\n")


def test_debug_shows_the_traceback_of_a_usage_error_too(env, tmp_path, capsys):
    assert main(["layerwise", str(env["cut"]), "--debug", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ") and "truncated" in err


# --------------------------------------------------------------------------- results: provenance, overwrite

def test_results_say_what_they_were_computed_on(env, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["layerwise", str(env["ckpt"]), "--images", str(env["images"]), "--num-images", "50", "--folds", "2",
            "--seed", "3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    prov = json.loads((out / "layerwise.json").read_text())["provenance"]
    images = prov["images"]
    assert images["source"] == str(env["images"]) and images["seed"] == 3 and images["img_size"] == [32, 32]
    assert images["num_images_requested"] == 50 and images["num_images"] == 6
    reasons = {os.path.basename(s["path"]): s["reason"] for s in images["skipped"]}
    assert set(reasons) == {"broken.jpg", "bomb.png"} and "DecompressionBomb" in reasons["bomb.png"]
    assert prov["package_version"] == asg_probe.__version__ and prov["device"] == "cpu"
    assert prov["command"].startswith("asg-probe layerwise ") and "--num-images 50" in prov["command"]
    # the printed summary says it too, and the shortfall is a warning
    assert "computed on: 6 images (50 requested) from " in captured.out and "2 unreadable files skipped" in captured.out
    warnings = [ln for ln in captured.err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 2 and "asked for 50 images" in warnings[0] and "skipped 2 unreadable" in warnings[1]
    # a second run says it replaces the first
    assert main(argv) == 0
    assert f"overwriting previous results in {out} (layerwise.json, layerwise.csv, layerwise.png)" in \
        capsys.readouterr().out


def test_a_scenes_run_directory_is_probed_on_held_out_scenes(env, tmp_path, capsys):
    assert main(["shuffle-test", str(env["run"]), "--out", str(tmp_path), *FAST]) == 0
    images = json.loads((tmp_path / "shuffle_test.json").read_text())["provenance"]["images"]
    assert images["source"].startswith("procedural scenes") and images["split"] == "val"
    assert "computed on: 6 images from procedural scenes" in capsys.readouterr().out
    # the same weights without the scenes config: the photographs
    assert main(["shuffle-test", str(env["ckpt"]), "--out", str(tmp_path), *FAST]) == 0
    images = json.loads((tmp_path / "shuffle_test.json").read_text())["provenance"]["images"]
    assert images["source"].startswith("embedded photographs")


@pytest.mark.parametrize("entry", ["layerwise_probes", "attention_distance", "token_embeddings", "shuffle_test",
                                   "check_equivariance", "resolution_transfer", "probe_attribution"])
def test_every_entry_point_records_what_it_ran_on(entry):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    kw = {"resolution_transfer": {"sizes": [16, 32]}, "token_embeddings": {"layers": [1]}}.get(entry, {})
    result = getattr(asg_probe, entry)(model, "scenes", num_images=10, seed=2, progress=False, **kw)
    prov = result.to_dict()["provenance"]
    assert prov["device"] == "cpu" and prov["package_version"] == asg_probe.__version__
    images = prov["images"]
    assert images["source"] == "procedural scenes (validation split, seed 2)" and images["split"] == "val"
    assert (images["num_images_requested"], images["num_images"], images["seed"]) == (10, 10, 2)
    assert images["skipped"] == [] and images["img_size"] == [32, 32]


# --------------------------------------------------------------------------- interrupted saves

def _snapshot(folder):
    return {p.name: p.read_bytes() if p.is_file() else "folder" for p in sorted(folder.iterdir())}


@pytest.fixture
def previous_results(env, tmp_path):
    """An output folder holding a complete earlier pos-similarity result (no images needed)."""
    out = tmp_path / "out"
    assert main(["pos-similarity", str(env["ckpt"]), "--out", str(out)]) == 0
    return out, _snapshot(out)


def _no_leftovers(out):
    return not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_interrupt_while_writing_leaves_the_previous_results(env, previous_results, monkeypatch, capsys):
    from asg_probe import results

    out, old = previous_results
    real = results.atomic_write_bytes

    def interrupted(path, data, **kw):  # the PNG is written after the JSON and the CSV
        real(path, data[: len(data) // 2], **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(results, "atomic_write_bytes", interrupted)
    assert main(["pos-similarity", str(env["ckpt"]), "--device", "cpu", "--out", str(out)]) == 130
    assert capsys.readouterr().err.endswith("error: interrupted\n")
    assert _snapshot(out) == old and _no_leftovers(out)


def test_interrupt_while_renaming_completes_the_new_results(env, previous_results, monkeypatch):
    from asg_probe import results

    out, old = previous_results
    real, calls = os.replace, []

    def interrupted_once(src, dst):
        if os.path.dirname(dst) == str(out):  # publishing (not a write into the staging folder)
            calls.append(dst)
            if len(calls) == 2:  # one file of the new set is in place, two are not
                raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(results.os, "replace", interrupted_once)
    assert main(["pos-similarity", str(env["ckpt"]), "--device", "cpu", "--out", str(out)]) == 130
    new = _snapshot(out)
    assert set(new) == set(old) and _no_leftovers(out)
    assert json.loads(new["pos_similarity.json"])["provenance"]["command"].endswith("--device cpu --out " + str(out))
    assert new["pos_similarity.csv"] == old["pos_similarity.csv"]  # same numbers, new files: all three renamed


def test_a_run_killed_between_renames_is_completed_by_the_next_run(env, previous_results, capsys):
    out, old = previous_results
    script = (
        "import os, sys\n"
        "from asg_probe import results\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    real(src, dst)\n"
        "    if os.path.dirname(dst) == sys.argv[-1]:\n"
        "        os._exit(9)  # killed right after the first file of the set is in place\n"
        "results.os.replace = replace\n"
        "from asg_probe.cli import main\n"
        "main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", script, "pos-similarity", str(env["ckpt"]), "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    mixed = _snapshot(out)
    assert any(n.startswith(".asg-probe-staging.") for n in mixed)  # the complete set waits in staging
    assert main(["list"]) == 0 and _snapshot(out) == mixed       # commands that write elsewhere leave it
    # the next command into the folder finishes the killed run's set first, even one that fails later
    assert main(["layerwise", str(env["ckpt"]), "--images", str(env["no_images"]), "--out", str(out)]) == 2
    done = _snapshot(out)
    assert set(done) == set(old) and _no_leftovers(out)
    assert json.loads(done["pos_similarity.json"])["provenance"]["command"].endswith("--device cpu --out " + str(out))
    capsys.readouterr()


def test_a_failing_plot_writes_nothing(previous_results, monkeypatch):
    from asg_probe.analysis.pos_similarity import PosSimilarityResult

    out, old = previous_results

    def broken_plot(self, ax=None):
        raise RuntimeError("matplotlib fell over")

    monkeypatch.setattr(PosSimilarityResult, "plot", broken_plot)
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    with pytest.raises(RuntimeError, match="fell over"):
        asg_probe.pos_similarity(model).save(out)
    assert _snapshot(out) == old and _no_leftovers(out)


def test_the_timm_architecture_named_for_a_bare_state_dict_loads_it(env, tmp_path, capsys):
    assert main(["attention-distance", str(env["timm"]), "--out", str(tmp_path)]) == 1
    arch = re.search(r"likely --arch (\S+)", capsys.readouterr().err).group(1)
    assert main(["attention-distance", str(env["timm"]), "--arch", arch, "--out", str(tmp_path), *FAST]) == 0
    assert json.loads((tmp_path / "attention_distance.json").read_text())["patch_size"] == 8


# --------------------------------------------------------------------------- issue 23: files we own

DEAD_PID = 2**22 + 1  # above Linux's largest pid_max: the writer of this name is certainly gone


def test_only_our_leftovers_of_gone_writers_are_removed(env, tmp_path, capsys):
    """A user's hidden *.tmp files stay, through a run that works and one that fails; a killed
    run's temporaries are removed, a live writer's staging folder is left to it."""
    out = tmp_path / "out"
    out.mkdir()
    users = {".draft.tmp": b"mine", ".pos_similarity.json.tmp": b"also mine", ".x.asg-notapid-y.tmp": b"mine"}
    for name, data in users.items():
        (out / name).write_bytes(data)
    killed = out / f".pos_similarity.csv.asg-{DEAD_PID}-k1ll3d.tmp"
    killed.write_bytes(b"half")
    live = out / f".asg-probe-staging.{os.getpid()}-l1ve.tmp"  # a concurrent run still writing
    live.mkdir()
    (live / "pos_similarity.json").write_text("{}")
    assert main(["layerwise", str(env["ckpt"]), "--img-size", "30", "--out", str(out)]) == 2  # fails after checks
    assert main(["pos-similarity", str(env["ckpt"]), "--out", str(out)]) == 0
    capsys.readouterr()
    left = {p.name for p in out.iterdir()}
    assert set(users) <= left and all((out / n).read_bytes() == d for n, d in users.items())
    assert not killed.exists() and (live / "pos_similarity.json").is_file()
    assert {"pos_similarity.json", "pos_similarity.csv", "pos_similarity.png"} <= left


def test_a_folder_named_like_a_result_is_refused_before_anything_is_published(env, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "pos_similarity.csv").mkdir(parents=True)  # where a result file would go
    assert main(["pos-similarity", str(env["ckpt"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"pos_similarity\.csv is a folder, where a result file would go", err)
    assert sorted(p.name for p in out.iterdir()) == ["pos_similarity.csv"]  # no partial set, no staging folder
    (out / "pos_similarity.csv").rmdir()
    assert main(["pos-similarity", str(env["ckpt"]), "--out", str(out)]) == 0  # and the folder still works
    assert _no_leftovers(out) and len(list(out.iterdir())) == 3


# --------------------------------------------------------------------------- issue 23: environment, images

def test_world_size_without_a_launcher_is_one_line_before_any_work(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(asg_probe.checkpoint, "load_checkpoint",
                        lambda *a, **k: pytest.fail("a model was loaded before the environment was checked"))
    assert main(["layerwise", str(env["ckpt"]), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "WORLD_SIZE=2 is set, but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not" in err


def test_images_without_a_faithful_reading_are_skipped_and_counted(tmp_path):
    from asg_probe.data import load_images

    folder = tmp_path / "odd"
    folder.mkdir()
    Image.fromarray(np.full((40, 40), 0.5, np.float32), mode="F").save(folder / "float-unit.tif")  # faithful
    Image.fromarray(np.full((40, 40), 1000, np.int32), mode="I").save(folder / "int-16bit.tif")   # faithful
    Image.fromarray(np.full((40, 40), 300.0, np.float32), mode="F").save(folder / "float-300.tif")
    Image.fromarray(np.full((40, 40), -70000, np.int32), mode="I").save(folder / "int32-negative.tif")
    _png_header_only(folder / "bomb-warning-range.png", 10000, 10000)  # 1x..2x Pillow's limit: it only warns
    os.mkfifo(folder / "pipe.png")  # reading it would block forever
    images = load_images(folder, num_images=10, img_size=32)
    means = {os.path.basename(p): float(x.float().mean()) for p, x in zip(images.paths, images.images)}
    assert means == {"float-unit.tif": 128.0, "int-16bit.tif": 3.0}  # 0.5 -> 128; 1000 >> 8 = 3
    reasons = {os.path.basename(p): r for p, r in images.skipped}
    assert set(reasons) == {"float-300.tif", "int32-negative.tif", "bomb-warning-range.png", "pipe.png"}
    assert "outside [0, 1]" in reasons["float-300.tif"] and "outside 0..65535" in reasons["int32-negative.tif"]
    assert "DecompressionBomb" in reasons["bomb-warning-range.png"] and "not a regular file" in reasons["pipe.png"]


def test_a_nan_in_a_model_never_certifies_or_becomes_a_table():
    from asg_probe.errors import InputError

    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(InputError, match=r"non-finite values \(NaN or inf\) in the tokens of layer 1"):
        asg_probe.check_equivariance(model, images)
    with pytest.raises(InputError, match=r"in the attention distance of layer 1"):
        asg_probe.attention_distance(model, images, progress=False)
    # every analysis on the shared forward pass: checked there, once per batch
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = 0.0
        model.blocks[0].mlp.fc2.bias[0] = float("inf")
    with pytest.raises(InputError, match=r"^SpatialViT: non-finite values \(NaN or inf\) in the tokens of layer 1"):
        asg_probe.layerwise_probes(model, torch.rand(4, 3, 32, 32), n_folds=2, progress=False)


def test_ctrl_c_after_the_work_is_done_exits_130_without_a_traceback():
    script = ("import os, signal, time\n"
              "from asg_probe.cli import exit_quietly_on_interrupt\n"
              "exit_quietly_on_interrupt()\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr == "error: interrupted\n"


# --------------------------------------------------------------------------- issue 23: report outputs

def test_report_outputs_are_keyed_per_model_and_a_later_set_retires_only_listed_files(tmp_path):
    """The mechanisms ``build_report`` uses (a whole report is run in tests/test_report.py)."""
    from asg_probe.report import REPORT_MANIFEST, output_keys, report_files
    from asg_probe.results import write_output_set

    keys = output_keys(["runs/a/model.pt", "runs/b/model.pt", "ape"])
    assert keys["ape"] == "ape" and len(set(keys.values())) == 3
    assert all(re.fullmatch(r"model\.pt-[0-9a-f]{8}", keys[n]) for n in ("runs/a/model.pt", "runs/b/model.pt"))
    assert output_keys(["runs/a/model.pt"]) == output_keys(["runs/a/model.pt"])  # stable between runs
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.layerwise.json").write_text("the user's")
    old = {"a.layerwise.json": "{}", "b.layerwise.json": "{}", REPORT_MANIFEST: "a.layerwise.json\nb.layerwise.json\n"}
    write_output_set(out, old, remove=report_files(out))
    assert report_files(out) == ["a.layerwise.json", "b.layerwise.json"]
    write_output_set(out, {"a.layerwise.json": "{}", REPORT_MANIFEST: "a.layerwise.json\n"}, remove=report_files(out))
    assert sorted(p.name for p in out.iterdir()) == [REPORT_MANIFEST, "a.layerwise.json", "notes.layerwise.json"]
