"""train.reference: the recipe list matches the bundled reference set; the table aggregates seeds."""
from asg_train import reference
from asg_train.config import CONFIG_DIR, resolve


def test_reference_recipes_exist_and_differ_only_in_mechanism():
    cfgs = [resolve(CONFIG_DIR / f"{r}.yaml") for r in reference.RECIPES]
    described = {(c["model"]["pos"], c["guidance"]["target"] if c["guidance"]["enabled"] else None) for c in cfgs}
    assert described == {("none", None), ("ape", None), ("rope-mixed", None), ("sdt-decay", None),
                         ("none", "true"), ("none", "random"), ("none", "shuffled")}
    assert len({(c["optim"]["lr"], c["max_steps"], c["batch_size"], c["data"]["num_train"]) for c in cfgs}) == 1


def test_tabulate_mean_std_over_seeds():
    row = {c: 0.5 for c in reference.COLUMNS}
    table = reference.tabulate({"ape": {0: {**row, "top1": 0.4}, 1: {**row, "top1": 0.6}},
                                "none": {0: {**row, "r2_control": None}}})
    lines = table.splitlines()
    assert lines[2].startswith("| ape | 0.500 ± 0.141 |")
    assert lines[3].startswith("| none | 0.500 |") and "–" in lines[3]


def test_variants_map_to_recipe_files_or_overrides():
    assert reference.variant_args("cpu_scenes", "ape")[-1].endswith("cpu_scenes_ape.yaml")
    args = reference.variant_args("cpu_photos", "guidance_random")
    assert args[1].endswith("cpu_photos.yaml") and args[2:] == ["guidance.enabled=true", "guidance.target=random"]
    for variant in reference.VARIANTS:  # the recipe files say the same as the overrides
        from_file = resolve(CONFIG_DIR / f"cpu_scenes_{variant}.yaml")
        from_overrides = resolve(CONFIG_DIR / "cpu_scenes.yaml", reference.VARIANTS[variant])
        assert {k: v for k, v in from_file.items() if k != "out"} == \
            {k: v for k, v in from_overrides.items() if k != "out"}
