"""train.config, schedules, the batch plan and optimiser groups: fast, no training."""
import pytest

from asg_train import cli
from asg_train.config import ConfigError, apply_overrides, load_yaml, DEFAULTS, resolve
from asg_train.data import BatchPlan, random_resized_crop_box, sample_rng
from asg_train.schedule import guidance_lambda, lr_at
from asg_train.build import param_groups


def test_defaults_follow_spec_table():
    cfg = resolve(overrides=["data.kind=synthetic"])
    assert cfg["optim"]["lr"] == 7e-5 and cfg["optim"]["weight_decay"] == 0.01
    assert cfg["optim"]["warmup_steps"] == 3000 and cfg["optim"]["min_lr"] == 1e-8
    assert cfg["optim"]["grad_clip"] == 1.0 and cfg["epochs"] == 130 and cfg["batch_size"] == 32
    g = cfg["guidance"]
    assert (g["rc_lambda"], g["lambda_min"], g["warmup_steps_for_aux"], g["hidden_dim"]) == (300, 10, 60, 256)


def test_recipe_base_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("data: {kind: synthetic}\noptim: {lr: 0.001, warmup_steps: 5}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel: {pos: ape}\noptim: {warmup_steps: 7}\n")
    cfg = resolve(tmp_path / "child.yaml", ["optim.lr=2e-4", "seeds=[0,1,2]", "max_steps=5",
                                            "guidance.target=random", "model.kwargs.decay_form=hybrid",
                                            "optim.betas=[0.9,0.95]", "guidance.rc_lambda=30"])
    assert cfg["model"]["pos"] == "ape"                      # from the recipe
    assert cfg["optim"]["warmup_steps"] == 7                 # child beats base
    assert cfg["optim"]["lr"] == 2e-4                        # command line beats both, "2e-4" is a float
    assert cfg["seeds"] == [0, 1, 2] and cfg["max_steps"] == 5
    assert cfg["guidance"]["target"] == "random" and cfg["guidance"]["rc_lambda"] == 30.0
    assert isinstance(cfg["guidance"]["rc_lambda"], float)
    assert cfg["model"]["kwargs"] == {"decay_form": "hybrid"}
    assert cfg["optim"]["betas"] == [0.9, 0.95]
    assert cfg["model"]["name"] == load_yaml(DEFAULTS)["model"]["name"]  # untouched default


def test_string_keys_keep_yaml_lookalikes_as_text():
    cfg = resolve(overrides=["data.kind=synthetic", "guidance.target=true"])
    assert cfg["guidance"]["target"] == "true"


@pytest.mark.parametrize("override, fragment", [
    ("max_step=3", "did you mean max_steps"),
    ("optim.lrr=1", "did you mean optim.lr"),
    ("lr=1", "did you mean optim.lr"),
    ("guidance.enabled=3", "expected true or false"),
    ("batch_size=2.5", "expected an integer"),
    ("guidance.target=shufled", "guidance.target must be"),
    ("seeds=3", "seeds must be a non-empty list"),
    ("noequals", "key=value"),
])
def test_bad_overrides_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        resolve(overrides=["data.kind=synthetic", override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_recipe_names_the_file(tmp_path):
    (tmp_path / "r.yaml").write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=r"optim.learning_rate.*r.yaml"):
        resolve(tmp_path / "r.yaml")


def test_cli_errors_before_any_work(tmp_path, capsys):
    rc = cli.main(["--config", str(DEFAULTS), "max_step=3", f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "max_steps" in err
    assert not (tmp_path / "run").exists()
    rc = cli.main(["--config", str(DEFAULTS), f"data.root={tmp_path / 'nope'}", f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "data folder not found" in err
    assert not (tmp_path / "run").exists()


def test_cli_print_config_round_trips(tmp_path, capsys):
    assert cli.main(["--config", str(DEFAULTS), "data.kind=synthetic", "optim.lr=3e-4", "--print-config"]) == 0
    text = capsys.readouterr().out
    saved = tmp_path / "config.yaml"
    saved.write_text(text)
    assert resolve(base=load_yaml(saved)) == resolve(overrides=["data.kind=synthetic", "optim.lr=3e-4"])


def test_seed_list_gives_one_run_dir_per_seed():
    cfg = resolve(overrides=["data.kind=synthetic", "seeds=[3,4]", "out=/x"])
    runs = cli.seed_runs(cfg)
    assert [(r["seed"], r["out"], r["seeds"]) for r in runs] == [(3, "/x/seed3", None), (4, "/x/seed4", None)]


def test_lr_schedule_values():
    kw = dict(lr=1e-3, min_lr=1e-8, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(0.5 * (1e-3 + 1e-8))      # half-way down the cosine
    assert lr_at(110, **kw) == pytest.approx(1e-8) and lr_at(500, **kw) == pytest.approx(1e-8)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lambda_schedule_values():
    kw = dict(lambda_min=10, rc_lambda=300, warmup_steps_for_aux=60)
    assert guidance_lambda(0, **kw) == 10.0
    assert guidance_lambda(30, **kw) == 155.0
    assert guidance_lambda(60, **kw) == 300.0 and guidance_lambda(10_000, **kw) == 300.0
    assert guidance_lambda(0, lambda_min=10, rc_lambda=300, warmup_steps_for_aux=0) == 300.0


def test_batch_plan_shards_are_disjoint_and_agree_on_sizes():
    kw = dict(num_samples=1000, batch_size=8, seed=5, world_size=3, sizes=[16, 32, 48], base_size=32)
    plans = [BatchPlan(rank=r, **kw).batches(epoch=2) for r in range(3)]
    assert len({len(p) for p in plans}) == 1
    seen = set()
    for step_batches in zip(*plans):
        sizes = {it[1] for b in step_batches for it in b}
        assert len(sizes) == 1                                       # one size per step on every rank
        size = sizes.pop()
        assert all(len(b) == max(1, round(8 * 32 ** 2 / size ** 2)) for b in step_batches)  # pixel budget
        for b in step_batches:
            idx = {it[0] for it in b}
            assert not idx & seen
            seen |= idx
    # a pure function of (seed, epoch): same again, different next epoch, resumable from the middle
    assert BatchPlan(rank=1, **kw).batches(2) == plans[1]
    assert BatchPlan(rank=1, **kw).batches(3) != plans[1]
    assert BatchPlan(rank=1, **kw).batches(2, start_batch=5) == plans[1][5:]


def test_eval_plan_covers_every_sample_once():
    plans = [BatchPlan(103, 10, shuffle=False, rank=r, world_size=2, base_size=32).batches(0) for r in range(2)]
    idx = sorted(it[0] for p in plans for b in p for it in b)
    assert idx == list(range(103))


def test_per_sample_augmentation_is_reproducible():
    a = random_resized_crop_box(sample_rng(0, 1, 7), 100, 80, (0.08, 1.0))
    assert a == random_resized_crop_box(sample_rng(0, 1, 7), 100, 80, (0.08, 1.0))
    assert a != random_resized_crop_box(sample_rng(0, 2, 7), 100, 80, (0.08, 1.0))


def test_param_groups_exclude_biases_norms_tokens_and_head():
    import asg_probe

    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", num_classes=3)
    head = asg_probe.GuidanceHead(model.embed_dim, hidden_dim=16)
    groups = {g["name"]: g for g in param_groups(model, head, 0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.05
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["guidance_head"]["weight_decay"] == 0.0
    assert "pos_embed" not in decayed and "cls_token" not in decayed
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)
    assert "blocks.0.attn.qkv.weight" in decayed and "head.weight" in decayed
    n_all = sum(len(g["params"]) for g in groups.values())
    assert n_all == len(list(model.parameters())) + len(list(head.parameters()))


def test_overrides_do_not_mutate_input():
    defaults = load_yaml(DEFAULTS)
    cfg = load_yaml(DEFAULTS)
    apply_overrides(cfg, ["optim.lr=1"], defaults)
    assert cfg == defaults


def test_packaged_recipes_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    from asg_train.config import CONFIG_DIR, find_recipe, list_recipes, run_label

    monkeypatch.chdir(tmp_path)  # not the repository: train/configs/... is no path from here
    packaged = CONFIG_DIR / "cpu_scenes_guidance.yaml"
    for spelling in ("cpu_scenes_guidance", "cpu_scenes_guidance.yaml", "train/configs/cpu_scenes_guidance.yaml"):
        assert find_recipe(spelling) == packaged
    cfg = resolve("cpu_scenes_guidance")
    assert cfg["guidance"]["enabled"] and cfg["recipe"] == "cpu_scenes_guidance"
    assert run_label(cfg) == "cpu_scenes_guidance"  # the progress bar's label, not "none seed 0"
    assert run_label(resolve(overrides=["data.kind=synthetic", "guidance.enabled=true"])) == "none + guidance (true)"
    with pytest.raises(ConfigError, match="did you mean cpu_scenes_guidance"):
        find_recipe("cpu_scenes_guidanc")
    assert cli.main(["--list-recipes"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed[:-1]] == list_recipes() and "default" not in list_recipes()
    assert "ASG" in next(line for line in listed if line.startswith("cpu_scenes_guidance "))


def test_help_lists_every_config_key(capsys):
    from asg_train.config import flatten, key_comments

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    keys = [k for k, _ in key_comments()]
    assert set(flatten(load_yaml(DEFAULTS))) <= set(keys)
    for key in ("max_steps", "guidance.target", "optim.lr", "--list-recipes"):
        assert f"  {key} " in text or key in text
    assert dict(key_comments())["guidance.target"].startswith('"true"')
