"""Train the CPU reference models and probe them: one command from recipes to a results table.

    python -m asg_train.reference --out runs/reference                 # train (skips finished runs), probe, tabulate
    python -m asg_train.reference --out runs/reference --seeds 0 1 2   # several seeds: mean and 95% interval
    python -m asg_train.reference --out runs/reference --probe-only
    python -m asg_train.reference --out runs/reference --seeds 1 2 --variants none guidance guidance_shuffled
    python -m asg_train.reference --base cpu_photos --out runs/photos     # the same set on the photo crops

For each variant (none, ape, rope-mixed, sdt-decay, guidance, and two guidance controls: a fixed
random permutation of the targets, and a fresh one per image — position-free) it runs
``asg-train`` in this process (the recipe file ``<base>_<variant>.yaml`` where one exists, else
``<base>.yaml`` plus the variant's overrides), then fits the probes of ``asg_probe`` on held-out
images of the run's own validation split: last-layer coordinate R² (row, col), the control-task R² and selectivity, and the
patch-shuffle test (is position read from content or from an injected signal?), the content
(Hewitt & Liang) control, an MLP probe on the same tokens, and resolution transfer on scenes rendered
at 16 and 64 px. Every cell is a mean with a 95% interval over seeds, and each comparison the
results page draws a conclusion from is a paired t-test over seeds (:data:`PAIRED_CLAIMS`).
Results go to ``<out>/results.{json,md}``; each run dir keeps its own ``command.txt`` (the exact
command) and its probe numbers in ``reference_probe.json`` (reused while model and settings match).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from asg_probe.files import atomic_write_text
from asg_probe.results import jsonable

from .config import CONFIG_DIR

VARIANTS = {
    "none": [],
    "ape": ["model.pos=ape"],
    "rope-mixed": ["model.pos=rope-mixed"],
    "sdt-decay": ["model.pos=sdt-decay"],
    "sdt-hybrid": ["model.pos=sdt-decay", "model.kwargs.decay_form=hybrid"],
    "guidance": ["guidance.enabled=true"],
    "guidance_random": ["guidance.enabled=true", "guidance.target=random"],
    "guidance_shuffled": ["guidance.enabled=true", "guidance.target=shuffled"],
}
RECIPES = [f"cpu_scenes_{v}" for v in VARIANTS]  # the reference set (seed 0 of each bundled, except sdt-hybrid)


def variant_args(base: str, variant: str) -> list[str]:
    recipe = CONFIG_DIR / f"{base}_{variant}.yaml"
    if recipe.is_file():
        return ["--config", str(recipe)]
    return ["--config", str(CONFIG_DIR / f"{base}.yaml"), *VARIANTS[variant]]


def train_all(out: Path, seeds, overrides=(), base: str = "cpu_scenes", variants=None) -> None:
    """Train every (seed, variant) run under ``out`` that has no exported model yet; resume partial ones."""
    from . import cli
    from .rundir import run_files

    # seed-major: a complete matched set exists after the first seed, before the others start
    for seed in seeds:
        for variant in variants or VARIANTS:
            run_dir = out / variant / f"seed{seed}"
            if not (run_dir / "model.safetensors").is_file():
                args = [*variant_args(base, variant), f"out={run_dir}", f"seed={seed}", *overrides]
                if run_files(run_dir):  # a partial run (even one killed before its first checkpoint)
                    args.append("--resume")
                rc = cli.main(args)
                if rc != 0:
                    raise SystemExit(f"training {variant} seed {seed} failed (exit {rc})")


#: The bundled file of each variant's seed 0 (``asg_probe/reference/<name>.safetensors``).
BUNDLED = {"none": "none", "ape": "ape", "rope-mixed": "rope-mixed", "sdt-decay": "sdt-decay",
           "guidance": "guidance", "guidance_random": "guidance-random", "guidance_shuffled": "guidance-shuffled"}


def bundled_runs(out: Path) -> dict:
    """The bundled models as run folders under ``<out>/bundled`` (weights, config, eval), ready to probe.

    The bundled files are earlier trainings of seed 0 of the same recipes; a run's folder is
    rebuilt from the metadata the file carries (its resolved config and its ``eval.json``), so the
    bundled models are probed exactly like the runs of the table and can be compared with them.
    Returns ``{variant: run_dir}``.
    """
    import shutil

    import yaml
    from safetensors import safe_open

    from asg_probe.reference import reference_path

    runs = {}
    for variant, name in BUNDLED.items():
        src = reference_path(name)
        with safe_open(str(src), "pt") as f:
            meta = json.loads(f.metadata()["asg_probe"])
        run_dir = out / "bundled" / variant / "seed0"
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, run_dir / "model.safetensors")
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(meta["config"], sort_keys=False))
        atomic_write_text(run_dir / "eval.json", json.dumps(meta["train"]["eval"]))
        runs[variant] = run_dir
    return runs


#: Bumped whenever probe_run computes something different: cached probe files of another version are redone.
PROBE_VERSION = 3
#: Input sizes of the resolution-transfer columns (scenes rendered at each size; probes fit at 32 px).
RESOLUTION_SIZES = (16, 32, 64)


def probe_run(run_dir: Path, num_images: int, tokens: str = "pre_norm") -> dict:
    """Every number of one run's table row, from its exported model and its ``eval.json``."""
    import torch

    import asg_probe
    from asg_probe.analysis.resolution import resolution_transfer
    from asg_probe.analysis.shuffle import shuffle_test
    from asg_probe.extract import forward_tokens
    from asg_probe.probes import MLPProbe, final_norm

    from .config import load_yaml, merge
    from .tasks import make_task

    model = asg_probe.load_checkpoint(run_dir).eval()
    cfg = load_yaml(run_dir / "config.yaml")
    # Held-out images of the run's own data, normalised exactly as in training
    # (a float tensor is used as is by the probes).
    cfg = merge(cfg, {"data": {"num_train": 1, "num_val": num_images}})
    images = make_task(cfg).build_splits().val.images[:num_images]
    layer = asg_probe.layerwise_probes(model, images=images, progress=False, tokens=tokens)
    last = layer.rows[-1]
    shuffle = shuffle_test(model, images=images, progress=False).rows[-1]
    # A linear probe can miss position that is encoded non-linearly (the guidance head is an MLP):
    # the small MLP probe on the same last-layer patch tokens as the linear probe (`tokens`).
    norm, depth = final_norm(model, tokens), max(r["layer"] for r in layer.rows)
    with torch.no_grad():
        last_tokens = torch.cat([forward_tokens(model, b, layers=[depth])[depth] for b in images.split(100)])
        if norm is not None:
            last_tokens = norm(last_tokens)
    p = model.patch_embed.patch_size[0]
    mlp = MLPProbe(seed=0).fit(last_tokens, grid=(images.shape[-2] // p, images.shape[-1] // p))
    # Resolution transfer on scenes rendered at each size (not resized), last layer: absolute R² and
    # the fraction of the 32-px R² retained.
    res = resolution_transfer(model, images="scenes", sizes=list(RESOLUTION_SIZES), layers=[depth],
                              num_images=num_images, progress=False)
    res_rows = {r["size"]: r for r in res.rows if r["layer"] == depth}
    eval_doc = json.loads((run_dir / "eval.json").read_text())
    sweep = {r["size"]: r["top1"] for r in eval_doc["sweep"]}
    size = eval_doc["train_size"]
    out = {"top1": eval_doc["top1"], "top1_half": sweep.get(size // 2), "top1_double": sweep.get(size * 2),
           "r2_row": last["r2_row"], "r2_col": last["r2_col"], "r2_col_ci": last.get("r2_col_ci"),
           "r2_control": last.get("r2_control"), "selectivity": last.get("selectivity"),
           "r2_col_init": last.get("r2_col_init"), "r2_col_gain": last.get("r2_col_gain"),
           "compression_col": last.get("compression_col"),
           "mlp_r2_row": float(mlp.heldout_r2_[0]), "mlp_r2_col": float(mlp.heldout_r2_[1]),
           "shuffle_r2_original": shuffle["r2_original"], "shuffle_r2_slot": shuffle["r2_slot"],
           "shuffle_source": shuffle["source"], "layers_r2": [r["r2"] for r in layer.rows],
           "layers_r2_col": [r["r2_col"] for r in layer.rows]}
    for s in RESOLUTION_SIZES:
        if s != size:
            out[f"res_r2_{s}"] = res_rows[s]["r2"]
            out[f"res_retained_{s}"] = res_rows[s].get("r2_retained")
    out["res_size_source"] = res.to_dict().get("size_source")
    return out


def probe_cached(run_dir: Path, num_images: int, reprobe: bool = False) -> dict:
    """:func:`probe_run`, kept in ``<run>/reference_probe.json`` for the same model, image count and version."""
    import hashlib

    digest = hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    key = {"probe_version": PROBE_VERSION, "num_images": num_images, "model_sha256_16": digest}
    cache = run_dir / "reference_probe.json"
    if cache.is_file() and not reprobe:
        doc = json.loads(cache.read_text())
        if doc.get("key") == key:
            return doc["result"]
    result = jsonable(probe_run(run_dir, num_images))  # as the cache will give it back: undefined values None
    atomic_write_text(cache, json.dumps({"key": key, "result": result}, indent=1, allow_nan=False))
    return result


# Table 1: accuracy and resolution; table 2: what the probes read from the last layer.
TABLES = {
    "accuracy": [("top1", "top-1 @32"), ("top1_half", "@16 (resized)"), ("top1_double", "@64 (resized)"),
                 ("res_r2_16", "probe R² @16 (rendered)"), ("res_r2_64", "probe R² @64 (rendered)"),
                 ("res_retained_16", "retained @16"), ("res_retained_64", "retained @64")],
    "probes": [("r2_row", "R² row"), ("r2_col", "R² col"), ("r2_control", "slot control"),
               ("selectivity", "selectivity (slot)"), ("r2_col_init", "R² col at init"),
               ("r2_col_gain", "R² col gain"), ("compression_col", "compression col"), ("mlp_r2_col", "MLP R² col"),
               ("shuffle_r2_original", "shuffle: original"), ("shuffle_r2_slot", "shuffle: slot")],
}
COLUMNS = [c for cols in TABLES.values() for c, _ in cols]

#: The comparisons RESULTS.md draws conclusions from, each a paired test over seeds (same seed:
#: same initialisation draw and data order): (metric, variant a, variant b, the claim a − b tests).
PAIRED_CLAIMS = [
    ("r2_col", "guidance", "none", "guidance builds the column"),
    ("r2_col", "guidance", "guidance_shuffled", "…through its spatial signal, not the auxiliary loss"),
    ("mlp_r2_col", "guidance", "guidance_shuffled", "…also read by an MLP probe"),
    ("r2_col", "guidance_shuffled", "none", "the position-free control stays at none's level"),
    ("r2_col_gain", "guidance", "none", "guidance's column is learned, not given by architecture at init"),
    ("r2_col", "guidance_random", "guidance", "a fixed permutation of the targets builds the column too"),
    ("shuffle_r2_slot", "ape", "none", "ape decodes the slot (an injection)"),
    ("shuffle_r2_original", "guidance", "none", "guidance reads the original position from content"),
    ("top1", "guidance", "none", "accuracy: guidance vs no position"),
    ("top1", "guidance_shuffled", "none", "accuracy cost of the auxiliary loss alone"),
    ("top1", "guidance", "guidance_shuffled", "accuracy: the spatial signal vs the loss alone"),
    ("top1", "rope-mixed", "none", "accuracy: rope-mixed vs no position"),
    ("top1", "sdt-hybrid", "sdt-decay", "accuracy: SDT hybrid vs full decay"),
    ("res_retained_64", "guidance", "ape", "fraction of the 32-px probe R² kept at 64 px"),
    # the papers' headline comparisons and the relative mechanisms, testable once each has three seeds
    ("top1", "guidance", "ape", "accuracy: guidance vs ape (the ASG paper's claim)"),
    ("top1", "guidance", "rope-mixed", "accuracy: guidance vs rope-mixed (the ASG paper's claim)"),
    ("top1", "sdt-decay", "none", "accuracy: SDT decay vs no position"),
    ("r2_col", "rope-mixed", "none", "rope-mixed builds a column"),
    ("shuffle_r2_slot", "rope-mixed", "none", "rope-mixed decodes the slot"),
    ("r2_col", "sdt-hybrid", "none", "SDT's relative decay puts no column in the tokens"),
]


def interval(values, level: float = 0.95):
    """``(mean, lo, hi, n)``: the Student-t interval of the mean over seeds (lo = hi = nan below 2 values)."""
    from asg_probe.probes.metrics import fold_interval

    values = [float(v) for v in values if v is not None and v == v]
    if not values:
        return float("nan"), float("nan"), float("nan"), 0
    lo, hi = fold_interval(values, level)
    return statistics.fmean(values), lo, hi, len(values)


def prediction_interval(values, level: float = 0.95):
    """``(lo, hi)``: where one more run of the recipe should fall, from the seeds' values.

    ``mean ± t(0.975, n−1)·sd·√(1 + 1/n)`` (normal runs assumed). A single further run, such as a
    bundled model trained apart from the table, is compared with this interval, not with the
    interval of the mean, which shrinks with n and is meant for means (nan below 2 values).

    >>> lo, hi = prediction_interval([0.8, 0.9, 1.0])  # t(0.975, 2) = 4.303, sd 0.1
    >>> round(lo, 3), round(hi, 3)
    (0.403, 1.397)
    """
    from scipy.stats import t as student_t

    values = [float(v) for v in values if v is not None and v == v]
    if len(values) < 2:
        return float("nan"), float("nan")
    mean, sd, n = statistics.fmean(values), statistics.stdev(values), len(values)
    half = float(student_t.ppf(0.5 + 0.5 * level, n - 1)) * sd * (1 + 1 / n) ** 0.5
    return mean - half, mean + half


#: What the bundled models are checked on against the seeds of their recipe.
BUNDLED_CHECK = [("top1", "top-1 @32"), ("r2_col", "R² col"), ("mlp_r2_col", "MLP R² col"),
                 ("shuffle_r2_slot", "shuffle: slot")]


def bundled_check(results: dict, bundled: dict, metrics=None) -> list[dict]:
    """Each bundled model's value beside its recipe's seeds: their range and the 95% prediction
    interval for one more run (:func:`prediction_interval`); ``inside`` is None without two seeds."""
    rows = []
    for variant, per_seed in bundled.items():
        (value_doc,) = per_seed.values()
        seeds = results.get(variant, {})
        for metric, heading in metrics or BUNDLED_CHECK:
            values = [r.get(metric) for r in seeds.values() if r.get(metric) is not None]
            lo, hi = prediction_interval(values)
            value = value_doc.get(metric)
            inside = None if lo != lo or value is None else bool(lo <= value <= hi)
            rows.append({"variant": variant, "metric": metric, "heading": heading, "value": value,
                         "seeds": values, "prediction_interval": [lo, hi], "inside": inside})
    return rows


def tabulate_bundled_check(rows) -> str:
    lines = ["| bundled model | metric | bundled | seeds of the table | 95% prediction interval, one more run | inside |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        seeds = ", ".join(f"{v:.3f}" for v in r["seeds"]) or "–"
        lo, hi = r["prediction_interval"]
        interval_text = "–" if lo != lo else f"[{lo:.3f}, {hi:.3f}]"
        inside = {None: "–", True: "yes", False: "**no**"}[r["inside"]]
        value = "–" if r["value"] is None else f"{r['value']:.3f}"
        lines.append(f"| {r['variant']} | {r['heading']} | {value} | {seeds} | {interval_text} | {inside} |")
    return "\n".join(lines)


def _cell(values) -> str:
    mean, lo, hi, n = interval(values)
    if n == 0:
        return "–"
    if n == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def tabulate(results: dict, columns=None) -> str:
    """Markdown table: one row per variant (seed count in brackets), mean and 95% interval over seeds.

    ``columns`` is a list of ``(key, heading)`` (default: every column of :data:`TABLES`).
    """
    columns = columns or [c for cols in TABLES.values() for c in cols]
    head = "| run (seeds) | " + " | ".join(h for _, h in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for recipe, per_seed in results.items():
        cells = [_cell([r.get(col) for r in per_seed.values()]) for col, _ in columns]
        lines.append(f"| {recipe} ({len(per_seed)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_tests(results: dict, claims=None) -> list[dict]:
    """One paired t-test per claim over the seeds both variants have (two-sided).

    Returns dicts with the claim, ``n``, the mean difference a − b, its 95% interval and ``p``
    (nan with fewer than two pairs or zero spread).
    """
    from scipy.stats import ttest_rel

    rows = []
    for metric, a, b, claim in claims or PAIRED_CLAIMS:
        seeds = sorted(set(results.get(a, {})) & set(results.get(b, {})))
        pairs = [(results[a][s].get(metric), results[b][s].get(metric)) for s in seeds]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None and x == x and y == y]
        diffs = [x - y for x, y in pairs]
        mean, lo, hi, n = interval(diffs)
        p = float("nan")
        if n >= 2 and statistics.stdev(diffs) > 0:
            p = float(ttest_rel([x for x, _ in pairs], [y for _, y in pairs]).pvalue)
        rows.append({"metric": metric, "a": a, "b": b, "claim": claim, "n": n, "diff": mean,
                     "ci": [lo, hi], "p": p})
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
    return rows


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (nan stays nan, outside the family).

    Many claims are tested on the same few seeds; a claim is supported at level 0.05 over the
    whole table when its adjusted p is below 0.05 (family-wise error, no independence assumed).

    >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03, float("nan")])][:3]
    [0.03, 0.06, 0.06]
    """
    finite = sorted((p, i) for i, p in enumerate(pvalues) if p == p)
    adjusted, running = [float("nan")] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))  # monotone in the sorted order
        adjusted[i] = running
    return adjusted


def tabulate_paired(rows) -> str:
    def fmt(p):
        return "–" if p is None or p != p else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")

    lines = ["| claim | metric | a − b | n | mean difference [95% CI] | p (paired t) | p (Holm, all rows) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "–" if r["n"] == 0 else (f"{r['diff']:+.3f}" if r["n"] == 1 else
                                        f"{r['diff']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]")
        lines.append(f"| {r['claim']} | {r['metric']} | {r['a']} − {r['b']} | {r['n']} | {diff} | {fmt(r['p'])} "
                     f"| {fmt(r.get('p_holm'))} |")
    return "\n".join(lines)


def tabulate_layers(results: dict, key: str = "layers_r2") -> str:
    """Mean over seeds of a per-layer list (default: the mean (row, col) R²), one row per variant."""
    depth = max(len(r[key]) for per_seed in results.values() for r in per_seed.values())
    lines = ["| run | " + " | ".join(str(i) for i in range(depth)) + " |", "|---" * (depth + 1) + "|"]
    for recipe, per_seed in results.items():
        cols = [[r[key][i] for r in per_seed.values() if len(r[key]) > i] for i in range(depth)]
        lines.append(f"| {recipe} | " + " | ".join(f"{statistics.fmean(c):.3f}" for c in cols) + " |")
    return "\n".join(lines)


def report_markdown(results: dict, num_images: int) -> str:
    """Every table of RESULTS.md's reference section, in one document."""
    parts = [f"Probes on {num_images} held-out scenes per run; cells: mean [95% Student-t interval over seeds].", ""]
    for name, cols in TABLES.items():
        parts += [f"### {name}", "", tabulate(results, cols), ""]
    parts += ["### paired tests over seeds", "", tabulate_paired(paired_tests(results)), ""]
    parts += ["### mean (row, col) R² by layer", "", tabulate_layers(results), ""]
    parts += ["### column R² by layer", "", tabulate_layers(results, "layers_r2_col"), ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m asg_train.reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/reference")
    p.add_argument("--base", default="cpu_scenes", help="recipe family in train/configs (cpu_scenes, cpu_photos)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--probe-images", type=int, default=500)
    p.add_argument("--probe-only", action="store_true")
    p.add_argument("--train-only", action="store_true", help="train, then stop (probe later with --probe-only)")
    p.add_argument("--bundled", action="store_true", help="also probe the bundled models (earlier seed-0 runs) "
                                                           "the same way, in a table of their own")
    p.add_argument("--reprobe", action="store_true", help="probe again even where <run>/reference_probe.json "
                                                           "holds results for the same model and settings")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                   help="train only these (default: all); every finished run under --out is probed and tabulated")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="passed to every training run (put them before --seeds/--variants)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.probe_only:
        train_all(out, args.seeds, args.overrides, base=args.base, variants=args.variants)
        if args.train_only:
            return 0
    # every finished run under --out goes into the table, whichever command trained it
    runs = [(v, int(d.name[4:]), d) for v in VARIANTS for d in sorted((out / v).glob("seed*"))
            if (d / "model.safetensors").is_file()]
    results: dict = {}
    for recipe, seed, run_dir in runs:
        results.setdefault(recipe, {})[seed] = probe_cached(run_dir, args.probe_images, args.reprobe)
        print(f"probed {recipe} seed {seed}", file=sys.stderr)
    import datetime

    import asg_probe

    doc = {"provenance": {"asg_probe_version": asg_probe.__version__, "probe_version": PROBE_VERSION,
                          "date": datetime.date.today().isoformat(), "probe_images": args.probe_images,
                          "probe_images_source": "each run's own validation split (scenes); resolution "
                                                 "columns: scenes rendered at each size",
                          "seeds": {v: sorted(per_seed) for v, per_seed in results.items()}},
           "runs": results, "paired_tests": paired_tests(results)}
    text = report_markdown(results, args.probe_images)
    if args.bundled:
        bundled = {v: {0: probe_cached(d, args.probe_images, args.reprobe)} for v, d in bundled_runs(out).items()}
        doc["bundled"] = bundled
        check = bundled_check(results, bundled)
        doc["bundled_check"] = check
        text += "\n".join(["", "### the bundled models (seed 0, trained earlier with the same recipes)", "",
                           tabulate({f"{v} bundled": r for v, r in bundled.items()}), "",
                           "### the bundled models against the seeds of their recipe", "",
                           tabulate_bundled_check(check), ""])
    atomic_write_text(out / "results.json", json.dumps(jsonable(doc), indent=2, allow_nan=False))  # undefined p: null
    atomic_write_text(out / "results.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
