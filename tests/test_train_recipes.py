"""Every packaged recipe resolves, names a real mechanism, and stays matched to its base."""
from pathlib import Path

import pytest

import asg_probe
from asg_train import trainer
from asg_train.config import CONFIG_DIR, changed_keys, resolve

RECIPES = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.name != "default.yaml")
# What a per-mechanism recipe may change relative to its architecture's base recipe.
# what a mechanism variant may change (recipe: its own name, recorded for labels)
MECHANISM_KEYS = {"out", "recipe", "model.pos", "guidance.enabled", "guidance.target", "data.multires_sizes"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_resolves_to_a_known_mechanism(recipe):
    cfg = resolve(recipe)
    assert cfg["model"]["pos"] in asg_probe.list_positions()
    assert cfg["model"]["name"] in asg_probe.list_models()


@pytest.mark.parametrize("arch", ["vits16", "vitb16"])
def test_imagenet100_recipes_cover_every_mechanism(arch):
    base = resolve(CONFIG_DIR / f"in100_{arch}.yaml")
    assert base["optim"]["lr"] == 7e-5 and base["guidance"]["rc_lambda"] == 300 and base["epochs"] == 130
    found = set()
    for v in CONFIG_DIR.glob(f"in100_{arch}_*.yaml"):
        cfg = resolve(v)
        found.add(cfg["model"]["pos"] + ("+" + cfg["guidance"]["target"] if cfg["guidance"]["enabled"] else ""))
    assert found >= {"none", "ape", "rope-axial", "rope-mixed", "alibi2d", "relpos", "rmt-decay", "sdt-decay",
                     "none+true", "none+random"}


@pytest.mark.parametrize("family", ["in100_vits16", "in100_vitb16", "ade20k_vits16", "ade20k_vitb16",
                                    "hypersim_vits16", "hypersim_vitb16"])
def test_mechanism_recipes_are_matched_to_their_base(family):
    base = resolve(CONFIG_DIR / f"{family}.yaml")
    variants = sorted(CONFIG_DIR.glob(f"{family}_*.yaml"))
    assert len(variants) >= 4
    for v in variants:
        extra = set(changed_keys(base, resolve(v))) - MECHANISM_KEYS
        assert not extra, f"{v.name} changes {extra}: the comparison would not be matched"


def test_dense_recipes_follow_spec():
    ade, hyp = resolve(CONFIG_DIR / "ade20k_vits16.yaml"), resolve(CONFIG_DIR / "hypersim_vits16.yaml")
    assert (ade["task"], ade["model"]["img_size"], ade["batch_size"], ade["epochs"]) == ("segmentation", 336, 16, 130)
    assert (hyp["task"], hyp["model"]["img_size"], hyp["epochs"]) == ("depth", 224, 100)
    assert ade["guidance"]["rc_lambda"] == 30 and hyp["guidance"]["rc_lambda"] == 70
    assert ade["dense"]["layers"] == [2, 5, 8, 11] and ade["dense"]["num_classes"] == 150


def test_imagenet100_recipe_runs_a_step_on_a_tiny_image_tree(tmp_path):
    from PIL import Image

    for split in ("train.X1", "train.X2", "val.X"):
        for c in range(2):
            d = tmp_path / "in100" / split / f"n0{c}"
            d.mkdir(parents=True)
            Image.new("RGB", (260, 240), (40 + 100 * c, 90, 30)).save(d / "a.jpg")
    cfg = resolve(CONFIG_DIR / "in100_vits16_guidance.yaml", [
        f"data.root={tmp_path / 'in100'}", f"out={tmp_path / 'run'}", "max_steps=1", "batch_size=2",
        "model.kwargs.depth=1", "num_workers=0", "progress=false", "eval.sizes=[224]", "device=cpu",
        "data.num_classes=null"])
    summary = trainer.run(cfg)
    assert summary["steps"] == 1 and summary["guidance"] == "true"
    model = asg_probe.load_checkpoint(Path(tmp_path / "run"))
    assert model.num_prefix_tokens == 5 and model.num_classes == 2  # 1 cls + 4 registers
