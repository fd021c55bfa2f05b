"""The training loop in-process on a tiny 32-px model: learning, guidance, failures, data, seeds."""
import json

import pytest
import torch

import asg_probe
from asg_train import cli, trainer
from asg_train.config import ConfigError, resolve
from asg_train.data import BatchPlan
from asg_train.state import load_train_state


def tiny(tmp_path, *extra, name="run"):
    return resolve(overrides=[
        "data.kind=synthetic", "model.name=vit_tiny_patch4_32", "model.img_size=32", "model.kwargs.depth=2",
        "batch_size=8", "data.num_train=64", "data.num_val=32", "eval.sizes=[24,32]", "eval.batch_size=32",
        "num_workers=0", "progress=false", "optim.lr=1e-3", "optim.warmup_steps=2", "log_every=1",
        "guidance.hidden_dim=32", f"out={tmp_path / name}", "max_steps=6", *extra])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_few_steps_reduce_the_loss_on_a_tiny_batch(tmp_path):
    cfg = tiny(tmp_path, "data.num_train=16", "max_steps=40", "optim.warmup_steps=1",
               "eval.enabled=false")
    trainer.run(cfg)
    rows = metrics(tmp_path / "run")
    first, last = rows[0]["loss_task"], sum(r["loss_task"] for r in rows[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert [r["step"] for r in rows] == list(range(1, 41))


def test_run_dir_holds_config_state_metrics_eval_and_inference_model(tmp_path):
    summary = trainer.run(tiny(tmp_path, "guidance.enabled=true"), command="asg-train test")
    run = tmp_path / "run"
    for name in ("config.yaml", "train_state.pt", "metrics.jsonl", "metrics.csv", "eval.json", "eval.csv",
                 "model.safetensors", "summary.json", "command.txt"):
        assert (run / name).is_file(), name
    eval_doc = json.loads((run / "eval.json").read_text())
    assert [r["size"] for r in eval_doc["sweep"]] == [24, 32] and eval_doc["top1"] == summary["top1"]
    model = asg_probe.load_checkpoint(run)                    # the run dir itself
    assert model.pos == "none" and model.num_classes == 10
    assert not any("row_head" in k or "col_head" in k for k in model.state_dict())
    assert model.asg_meta["config"]["guidance"]["enabled"] is True
    assert model.asg_meta["data_config"]["mean"] == [0.0, 0.0, 0.0]  # the training normalisation
    state = load_train_state(run)                            # weights_only=True inside
    assert state["step"] == 6 and state["guidance_head"] is not None
    assert len(state["rng"]) == 1 and set(state["rng"][0]) >= {"python", "numpy", "torch"}


def test_guidance_on_off_and_random_control(tmp_path):
    off = trainer.run(tiny(tmp_path, name="off"))
    on = trainer.run(tiny(tmp_path, "guidance.enabled=true", name="on"))
    ctrl = trainer.run(tiny(tmp_path, "guidance.enabled=true", "guidance.target=random", name="ctrl"))
    assert off["guidance"] is None and on["guidance"] == "true" and ctrl["guidance"] == "random"
    rows_off, rows_on = metrics(tmp_path / "off"), metrics(tmp_path / "on")
    assert all(r["loss_coord"] == 0 and r["lambda"] == 0 for r in rows_off)
    assert rows_on[0]["lambda"] == 10.0 and rows_on[-1]["lambda"] > rows_on[0]["lambda"]
    assert rows_on[-1]["loss_coord"] < rows_on[0]["loss_coord"]
    # same seed, same data: guidance changes the trajectory of the backbone
    a = asg_probe.load_checkpoint(tmp_path / "off").state_dict()
    b = asg_probe.load_checkpoint(tmp_path / "on").state_dict()
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])


def test_multiresolution_batches_with_guidance(tmp_path, monkeypatch):
    build = trainer.build_model
    seen = []

    def recording(cfg, num_classes):  # the shapes the backbone actually receives, step by step
        model = build(cfg, num_classes)
        forward_features = model.forward_features

        def record(x, *a, **k):
            seen.append(tuple(x.shape))
            return forward_features(x, *a, **k)
        model.forward_features = record
        return model

    monkeypatch.setattr(trainer, "build_model", recording)
    cfg = tiny(tmp_path, "data.multires_sizes=[16,32,48]", "guidance.enabled=true", "max_steps=8",
               "eval.enabled=false", "data.num_train=256")
    trainer.run(cfg)
    assert len(metrics(tmp_path / "run")) == 8
    # known answer: the batch plan of (seed 0, epoch 0) draws these sizes, each with the batch
    # size that keeps the pixel budget of 8 images at 32 px
    planned = [b[0][1] for b in BatchPlan(256, 8, seed=0, sizes=[16, 32, 48], base_size=32).batches(0)[:8]]
    assert len(set(planned)) > 1
    assert seen == [(round(8 * 32 ** 2 / s ** 2), 3, s, s) for s in planned]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    build = trainer.build_model
    calls = {"n": 0}

    def poisoned(cfg, num_classes):
        model = build(cfg, num_classes)
        forward_head = model.forward_head

        def nan_after_four(x, *a, **k):
            calls["n"] += 1
            out = forward_head(x, *a, **k)
            return out * float("nan") if calls["n"] > 4 else out
        model.forward_head = nan_after_four
        return model

    monkeypatch.setattr(trainer, "build_model", poisoned)
    cfg = tiny(tmp_path, "ckpt_every=2", "max_steps=10")
    with pytest.raises(trainer.NonFiniteLoss, match=r"step 4.*train_state.pt \(step 4\)") as err:
        trainer.run(cfg)
    assert "\n" not in str(err.value)
    state = load_train_state(tmp_path / "run")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "run" / "model.safetensors").exists()


def _png(path, seed):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)


def _image_tree(root, layout="plain"):
    train_dirs = ["train.X1", "train.X2"] if layout == "imagenet100" else ["train"]
    val_dir = "val.X" if layout == "imagenet100" else "val"
    seed = 0
    for split in train_dirs + [val_dir]:
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                seed += 1
                _png(d / f"{i}.png", seed)
    (root / train_dirs[0] / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / train_dirs[-1] / "dog" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (root / val_dir / "dog" / "empty.jpg").write_bytes(b"")
    (root / train_dirs[0] / "cat" / "notes.txt").write_text("ignored: not an image extension")


@pytest.mark.parametrize("layout", ["plain", "imagenet100"])
def test_unreadable_images_are_skipped_and_counted(tmp_path, layout, capsys):
    _image_tree(tmp_path / "data", layout)
    n_train = 6 * (2 if layout == "imagenet100" else 1) + 2
    cfg = tiny(tmp_path, "data.kind=imagefolder", f"data.root={tmp_path / 'data'}", "batch_size=2",
               f"max_steps={n_train // 2}", "eval.sizes=[32]")
    summary = trainer.run(cfg)
    assert summary["unreadable"] == 2                       # one epoch visits every training file once
    eval_doc = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert eval_doc["sweep"][0]["unreadable"] == 1 and eval_doc["sweep"][0]["n"] == 6
    assert "2 unreadable images skipped" in capsys.readouterr().out


def test_data_folder_without_splits_is_a_one_line_error(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    cfg = tiny(tmp_path, "data.kind=imagefolder", f"data.root={tmp_path / 'data'}")
    with pytest.raises(ConfigError, match="train.X1..X4 and val.X") as err:
        trainer.run(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def test_several_seeds_give_run_dirs_and_a_mean_std_table(tmp_path, capsys):
    args = ["--config", "train/configs/default.yaml", "data.kind=synthetic", "model.name=vit_tiny_patch4_32",
            "model.img_size=32", "model.kwargs.depth=1", "batch_size=8", "data.num_train=32", "data.num_val=16",
            "eval.sizes=[32]", "num_workers=0", "progress=false", "max_steps=2", "seeds=[0,1]",
            f"out={tmp_path / 'multi'}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "| top1 |" in out and "±" in out
    for seed in (0, 1):
        assert (tmp_path / "multi" / f"seed{seed}" / "model.safetensors").is_file()
    table = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert table["seeds"] == [0, 1] and table["rows"][0]["metric"] == "top1"
    assert (tmp_path / "multi" / "summary.csv").is_file() and (tmp_path / "multi" / "summary.md").is_file()
    a = asg_probe.load_checkpoint(tmp_path / "multi" / "seed0").state_dict()["head.weight"]
    b = asg_probe.load_checkpoint(tmp_path / "multi" / "seed1").state_dict()["head.weight"]
    assert not torch.equal(a, b)


def test_embedded_photos_recipe_runs(tmp_path):
    from asg_train.config import CONFIG_DIR

    cfg = resolve(CONFIG_DIR / "cpu_photos.yaml", [
        f"out={tmp_path / 'run'}", "max_steps=2", "batch_size=8", "data.num_train=40", "data.num_val=20",
        "eval.sizes=[32]", "progress=false", "model.kwargs.depth=1"])
    summary = trainer.run(cfg)
    model = asg_probe.load_checkpoint(tmp_path / "run")
    assert summary["steps"] == 2 and model.num_classes >= 10     # one class per bundled photograph
    assert model.asg_meta["data_config"]["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_scene_recipe_runs_with_the_scenes_normalisation(tmp_path):
    from asg_probe.scenes import SceneDataset
    from asg_train.config import CONFIG_DIR

    cfg = resolve(CONFIG_DIR / "cpu_scenes_guidance.yaml", [
        f"out={tmp_path / 'run'}", "max_steps=2", "batch_size=8", "data.num_train=32", "data.num_val=16",
        "eval.sizes=[16,32]", "progress=false", "model.kwargs.depth=1", "guidance.hidden_dim=16"])
    summary = trainer.run(cfg)
    model = asg_probe.load_checkpoint(tmp_path / "run")
    assert summary["steps"] == 2 and model.num_classes == SceneDataset(1).num_classes
    assert model.asg_meta["data_config"]["mean"] == pytest.approx(list(SceneDataset(1).mean))


def test_final_line_names_the_model_kwargs(tmp_path, capsys):
    # sdt-decay with decay_form=hybrid is another model than the default full form: the line says which
    cfg = tiny(tmp_path, "model.pos=sdt-decay", "model.kwargs.decay_form=hybrid", "max_steps=1", "eval.sizes=[32]")
    trainer.run(cfg)
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[asg-train]")][-1]
    assert "pos=sdt-decay depth=2 decay_form=hybrid " in line, line
