"""asg_train.reference: the recipe list matches the reference set; tables give intervals over seeds;
the paired tests are the textbook paired t-test."""
import math

import pytest

from asg_train import reference
from asg_train.config import CONFIG_DIR, resolve


def test_reference_recipes_exist_and_differ_only_in_mechanism():
    cfgs = [resolve(CONFIG_DIR / f"{r}.yaml") for r in reference.RECIPES]
    described = {(c["model"]["pos"], c["model"]["kwargs"].get("decay_form"),
                  c["guidance"]["target"] if c["guidance"]["enabled"] else None) for c in cfgs}
    assert described == {("none", None, None), ("ape", None, None), ("rope-mixed", None, None),
                         ("sdt-decay", None, None), ("sdt-decay", "hybrid", None), ("none", None, "true"),
                         ("none", None, "random"), ("none", None, "shuffled")}
    assert len({(c["optim"]["lr"], c["max_steps"], c["batch_size"], c["data"]["num_train"]) for c in cfgs}) == 1


def test_tabulate_mean_and_t_interval_over_seeds():
    row = {c: 0.5 for c in reference.COLUMNS}
    table = reference.tabulate({"ape": {0: {**row, "top1": 0.4}, 1: {**row, "top1": 0.6}},
                                "none": {0: {**row, "r2_control": None}}})
    lines = table.splitlines()
    # n = 2: mean 0.5, sd 0.1414, t(0.975, 1) = 12.706 -> half-width 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert lines[2].startswith("| ape (2) | 0.500 [-0.771, 1.771] |")
    assert lines[3].startswith("| none (1) | 0.500 |") and "–" in lines[3]


def test_paired_tests_match_scipy_and_pair_by_seed():
    from scipy.stats import ttest_rel

    a = {0: {"top1": 0.70}, 1: {"top1": 0.64}, 2: {"top1": 0.69}, 3: {"top1": 0.9}}
    b = {0: {"top1": 0.66}, 1: {"top1": 0.61}, 2: {"top1": 0.62}}  # seed 3 has no partner
    (row,) = reference.paired_tests({"x": a, "y": b}, claims=[("top1", "x", "y", "x beats y")])
    assert row["n"] == 3
    assert row["diff"] == pytest.approx((0.04 + 0.03 + 0.07) / 3)
    assert row["p"] == pytest.approx(ttest_rel([0.70, 0.64, 0.69], [0.66, 0.61, 0.62]).pvalue)
    lo, hi = row["ci"]
    assert lo < row["diff"] < hi and (lo > 0) == (row["p"] < 0.05)  # the interval and the test agree
    (none,) = reference.paired_tests({"x": a}, claims=[("top1", "x", "y", "no partner")])
    assert none["n"] == 0 and math.isnan(none["p"])
    text = reference.tabulate_paired([row, none])
    assert "| x beats y | top1 | x − y | 3 | +0.047 [" in text and "| no partner | top1 | x − y | 0 | – | – | – |" in text
    assert row["p_holm"] == pytest.approx(row["p"]) and math.isnan(none["p_holm"])  # a family of one finite p


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.03, 0.04 (m = 3): 3*0.01 = 0.03, 2*0.03 = 0.06, max(0.06, 1*0.04) = 0.06 (step-down monotone)
    adjusted = reference.holm([0.04, 0.01, float("nan"), 0.03])
    assert adjusted[0] == pytest.approx(0.06) and adjusted[1] == pytest.approx(0.03)
    assert math.isnan(adjusted[2]) and adjusted[3] == pytest.approx(0.06)
    assert reference.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_variants_map_to_recipe_files_or_overrides():
    assert reference.variant_args("cpu_scenes", "ape")[-1].endswith("cpu_scenes_ape.yaml")
    args = reference.variant_args("cpu_photos", "guidance_random")
    assert args[1].endswith("cpu_photos.yaml") and args[2:] == ["guidance.enabled=true", "guidance.target=random"]
    for variant in reference.VARIANTS:  # the recipe files say the same as the overrides
        from_file = resolve(CONFIG_DIR / f"cpu_scenes_{variant}.yaml")
        from_overrides = resolve(CONFIG_DIR / "cpu_scenes.yaml", reference.VARIANTS[variant])
        assert {k: v for k, v in from_file.items() if k not in ("out", "recipe")} == \
            {k: v for k, v in from_overrides.items() if k not in ("out", "recipe")}


@pytest.mark.slow
def test_probe_a_tiny_run_end_to_end_with_cache_and_results_files(tmp_path, monkeypatch):
    """A 2-step run through probe_cached and main --probe-only: every table column, the rendered
    resolution columns, the probe cache reused, results.json with provenance and paired tests."""
    import json

    from asg_train import trainer

    out = tmp_path / "ref"
    for variant in ("none", "guidance"):
        cfg = resolve(CONFIG_DIR / f"cpu_scenes_{variant}.yaml", [
            f"out={out / variant / 'seed0'}", "max_steps=2", "batch_size=8", "data.num_train=32",
            "data.num_val=16", "eval.sizes=[16,32,64]", "progress=false", "model.kwargs.depth=1",
            "guidance.hidden_dim=16", "threads=1"])
        trainer.run(cfg)
    run = out / "none" / "seed0"
    row = reference.probe_cached(run, num_images=24)
    for col in reference.COLUMNS:
        assert col in row and row[col] is not None, col
    assert row["res_size_source"] == "rendered"
    assert len(row["layers_r2"]) == 2 and -1.0 <= row["r2_col"] <= 1.0
    # the cache answers for the same model and settings; other settings probe again
    monkeypatch.setattr(reference, "probe_run", lambda *a, **k: pytest.fail("the cache was not used"))
    assert reference.probe_cached(run, num_images=24) == row
    with pytest.raises(pytest.fail.Exception):
        reference.probe_cached(run, num_images=26)
    monkeypatch.undo()
    assert reference.main(["--out", str(out), "--probe-only", "--probe-images", "24"]) == 0
    def refuse(constant):
        raise AssertionError(f"results.json holds {constant}, which strict JSON parsers reject")

    doc = json.loads((out / "results.json").read_text(), parse_constant=refuse)
    assert doc["provenance"]["seeds"] == {"none": [0], "guidance": [0]}
    assert all(r["p"] is None for r in doc["paired_tests"])  # one seed each: no test, null not NaN
    claim = next(r for r in doc["paired_tests"] if (r["a"], r["b"], r["metric"]) == ("guidance", "none", "r2_col"))
    assert claim["n"] == 1 and claim["diff"] == pytest.approx(doc["runs"]["guidance"]["0"]["r2_col"]
                                                              - doc["runs"]["none"]["0"]["r2_col"])
    md = (out / "results.md").read_text()
    assert "| none (1) |" in md and "### paired tests over seeds" in md
    # erasure and offsets: cached per run beside the probe file, tabulated per layer, tested in their own family
    assert reference.main(["--out", str(out), "--probe-only", "--probe-images", "24", "--analyses", "erasure",
                           "offsets", "--erasure-images", "24", "--offset-images", "8"]) == 0
    doc = json.loads((out / "results.json").read_text(), parse_constant=refuse)
    row = doc["runs"]["guidance"]["0"]
    assert row["erase_layers"] == [0, 1] and 0 <= row["erase0_agreement"] <= 1
    assert row["erase0_kl_diff"] == pytest.approx(row["erase0_kl"] - row["erase0_kl_control"])
    assert row["offsets_layers"] == [1] and row["offsets_shuffled_max"] == row["offsets1_shuffled"]
    assert (run / "reference_erasure.json").is_file() and (run / "reference_offsets.json").is_file()
    assert {"paired_tests_erasure", "paired_tests_offsets"} <= set(doc)
    md = (out / "results.md").read_text()
    assert "| none (1) | 1 |" in md and "### tokens vs scores" in md


def test_bundled_models_become_run_folders_like_the_runs(tmp_path):
    import json

    import asg_probe
    from asg_probe.reference import list_reference_models, reference_path

    runs = reference.bundled_runs(tmp_path)
    assert set(runs) == set(reference.BUNDLED) and set(reference.BUNDLED.values()) <= set(list_reference_models())
    ape = runs["ape"]
    meta = asg_probe.load_checkpoint(ape).asg_meta
    assert json.loads((ape / "eval.json").read_text())["top1"] == meta["metrics"]["top1"]
    assert resolve(ape / "config.yaml")["model"]["pos"] == "ape"
    # the same weights as the bundled file (probing them is probe_run's job, tested on a tiny run above)
    assert (ape / "model.safetensors").read_bytes() == reference_path("ape").read_bytes()


def test_prediction_interval_and_bundled_check_by_hand():
    from scipy.stats import t as student_t

    lo, hi = reference.prediction_interval([0.8, 0.9, 1.0])
    half = student_t.ppf(0.975, 2) * 0.1 * (4 / 3) ** 0.5
    assert (lo, hi) == (pytest.approx(0.9 - half), pytest.approx(0.9 + half))
    assert all(math.isnan(v) for v in reference.prediction_interval([0.5]))
    seeds = {"x": {0: {"top1": 0.8}, 1: {"top1": 0.9}, 2: {"top1": 1.0}}, "y": {0: {"top1": 0.5}}}
    bundled = {"x": {0: {"top1": 0.45}}, "y": {0: {"top1": 0.5}}, "z": {0: {"top1": 0.9}}}
    rows = reference.bundled_check(seeds, bundled, metrics=[("top1", "top-1")])
    assert [r["inside"] for r in rows] == [True, None, None]  # 0.45 > 0.9 - half = 0.403; one seed; none
    bundled["x"] = {0: {"top1": 0.40}}
    rows = reference.bundled_check(seeds, bundled, metrics=[("top1", "top-1")])
    assert rows[0]["inside"] is False
    text = reference.tabulate_bundled_check(rows)
    assert "| x | top-1 | 0.400 | 0.800, 0.900, 1.000 | [0.403, 1.397] | **no** |" in text
    assert "| y | top-1 | 0.500 | 0.500 | – | – |" in text


def _synthetic_runs():
    """Per-run dicts as analyse_run returns them, with planted values (3 seeds, two variants)."""
    def run(col_gain, kl, kl_control, offsets4, layers=(0.4, 0.5)):
        return {"r2_col_gain": col_gain, "compression_col": 1.0 + col_gain / 10, "layers_r2": list(layers),
                "layers_r2_col": list(layers), "r2_col": col_gain,
                "erase0_r2_last": 0.3 + col_gain, "erase0_kl": kl, "erase0_kl_control": kl_control,
                "erase0_kl_diff": kl - kl_control, "erase0_agreement_matched": 0.9,
                "offsets4_scenes": offsets4, "offsets4_shuffled": offsets4 / 10, "offsets_shuffled_max": offsets4 / 10,
                "offsets_shuffled_max_layer": 4, "offsets_nonself_max": 0.0}
    return {"guidance": {0: run(0.56, 1.6, 0.1, 0.47), 1: run(0.52, 1.2, 0.1, 0.45), 2: run(0.60, 2.0, 0.2, 0.50)},
            "none": {0: run(0.00, 3.4, 0.1, 0.07), 1: run(0.01, 3.0, 0.2, 0.05), 2: run(0.00, 3.9, 0.1, 0.09)}}


def test_new_claims_paired_tests_against_zero_and_holm_within_a_family():
    from scipy.stats import ttest_1samp, ttest_rel

    runs = _synthetic_runs()
    rows = reference.paired_tests(runs, claims=[
        ("r2_col_gain", "guidance", "none", "gain"),
        ("erase0_kl_diff", "none", None, "erasure beyond control"),
        ("offsets4_scenes", "guidance", "none", "offsets")])
    gain, kl, off = rows
    assert gain["n"] == 3 and gain["diff"] == pytest.approx((0.56 + 0.51 + 0.60) / 3)
    assert gain["p"] == pytest.approx(ttest_rel([0.56, 0.52, 0.60], [0.00, 0.01, 0.00]).pvalue)
    # b = None: a one-sample test of the within-run difference, i.e. the paired test of erased vs control
    assert kl["b"] is None and kl["diff"] == pytest.approx((3.3 + 2.8 + 3.8) / 3)
    assert kl["p"] == pytest.approx(ttest_1samp([3.3, 2.8, 3.8], 0.0).pvalue)
    assert kl["p"] == pytest.approx(ttest_rel([3.4, 3.0, 3.9], [0.1, 0.2, 0.1]).pvalue)
    assert [r["p_holm"] for r in rows] == pytest.approx(reference.holm([r["p"] for r in rows]))
    assert off["p_holm"] >= off["p"] and min(r["p_holm"] for r in rows) == pytest.approx(3 * min(r["p"] for r in rows))
    text = reference.tabulate_paired(rows)
    assert "| erasure beyond control | erase0_kl_diff | none (vs 0) | 3 | +3.300 [" in text


def test_layer_tables_reconcile_and_report_carry_the_new_columns():
    runs = _synthetic_runs()
    table = reference.tabulate_by_layer(runs, "erase", [("kl_diff", "KL erased − control")], "erase layer")
    lines = table.splitlines()
    # none: 3.3, 2.8, 3.8 -> mean 3.3, sd 0.5, half-width t(0.975, 2) * 0.5 / sqrt(3) = 1.242
    assert lines[0] == "| run (seeds) | erase layer | KL erased − control |"
    assert lines[3] == "| none (3) | 0 | 3.300 [2.058, 4.542] |"
    assert reference.layer_keys(runs, "offsets", reference.OFFSET_COLUMNS) == [4]
    # a field the analysis gained later is shown, not dropped
    assert ("agreement_matched", "agreement_matched") in reference.extra_erasure_columns(runs)
    md = reference.report_markdown(runs, 500, analyses=reference.ANALYSES)
    for heading in ("### controls", "### erasure (", "### erasure: further fields", "### tokens vs scores",
                    "### attention offsets: paired tests over seeds", "| col gain |", "| compression col |"):
        assert heading in md, heading
    assert "content control" not in md and "selectivity (content)" not in md  # the removed control has no column
    # tokens (column R², mean 0.56) beside scores (the shuffled offset R², mean of 0.047, 0.045, 0.050)
    assert "| guidance (3) | 0.560 [0.461, 0.659] | – | 0.047 [" in md.split("### tokens vs scores")[1]
