"""Train the CPU reference models and analyse them: one command from recipes to the results tables.

    python -m asg_train.reference --out runs/reference                 # train (skips finished runs), probe, tabulate
    python -m asg_train.reference --out runs/reference --seeds 0 1 2   # several seeds: mean and 95% interval
    python -m asg_train.reference --out runs/reference --probe-only
    python -m asg_train.reference --out runs/reference --probe-only --analyses probes erasure offsets --jobs 2
    python -m asg_train.reference --out runs/reference --seeds 1 2 --variants none guidance guidance_shuffled
    python -m asg_train.reference --base cpu_photos --out runs/photos     # the same set on the photo crops

For each variant (none, ape, rope-mixed, sdt-decay, sdt-hybrid, guidance, and two guidance controls:
a fixed random permutation of the targets, and a fresh one per image — position-free) it runs
``asg-train`` in this process (the recipe file ``<base>_<variant>.yaml`` where one exists, else
``<base>.yaml`` plus the variant's overrides), then analyses every finished run (``--analyses``):

* ``probes`` (always): on held-out images of the run's own validation split, last-layer
  coordinate R² (row, col); the slot control and selectivity; the random-initialisation
  baseline (the same architecture freshly initialised, 3 init seeds, same images and folds:
  ``r2_init``, ``r2_row_init``, ``r2_col_init`` and the learned gains ``r2_row_gain``,
  ``r2_col_gain``); the MDL compression of row and column (``compression_row/col``); an MLP
  probe on the same tokens; the patch-shuffle test (is position read from content or from an
  injected signal?); and resolution transfer on scenes rendered at 16 and 64 px. Kept in
  ``<run>/reference_probe.json``.
* ``erasure``: :func:`asg_probe.erase_position` at every layer (LEACE on (row, col), a random
  subspace of the same rank as the control): recovery R² at the last layer, top-1 agreement
  and KL against the unerased model beside the control. Kept in ``<run>/reference_erasure.json``.
* ``offsets``: :func:`asg_probe.attention_offsets` on scenes and on patch-shuffled scenes
  (the control: offsets between slots): held-out offset R² per layer. Kept in
  ``<run>/reference_offsets.json``.

Each cache is reused while the model, the settings and the version of what computes it match.
Every cell is a mean with a 95% interval over seeds, and each comparison the results page draws
a conclusion from is a paired t-test over seeds (:data:`PAIRED_CLAIMS`, :data:`ERASURE_CLAIMS`,
:data:`OFFSET_CLAIMS`), Holm-adjusted within its table. Results go to ``<out>/results.{json,md}``;
each run dir keeps its own ``command.txt`` (the exact command).

Examples
--------
>>> rows = paired_tests({"a": {0: {"m": 1.0}, 1: {"m": 2.0}}, "b": {0: {"m": 0.5}, 1: {"m": 1.0}}},
...                     claims=[("m", "a", "b", "a beats b")])
>>> rows[0]["n"], rows[0]["diff"]
(2, 0.75)
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
PROBE_VERSION = 4
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
           # the controls that replaced the content control (issue 19): random-init baseline, learned
           # gain over it, and the MDL compression (how easily position is extracted)
           "r2_init": last.get("r2_init"), "r2_row_init": last.get("r2_row_init"),
           "r2_col_init": last.get("r2_col_init"), "r2_row_gain": last.get("r2_row_gain"),
           "r2_col_gain": last.get("r2_col_gain"),
           "compression_row": last.get("compression_row"), "compression_col": last.get("compression_col"),
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


def _sha16(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _cached(cache: Path, key: dict, compute, redo: bool = False) -> dict:
    """``compute()``, kept in ``cache`` under ``key`` (reused while the key matches, redone with ``redo``)."""
    if cache.is_file() and not redo:
        doc = json.loads(cache.read_text())
        if doc.get("key") == key:
            return doc["result"]
    result = jsonable(compute())  # as the cache will give it back: undefined values None
    atomic_write_text(cache, json.dumps({"key": key, "result": result}, indent=1, allow_nan=False))
    return result


def probe_cached(run_dir: Path, num_images: int, reprobe: bool = False) -> dict:
    """:func:`probe_run`, kept in ``<run>/reference_probe.json`` for the same model, image count and version."""
    key = {"probe_version": PROBE_VERSION, "num_images": num_images,
           "model_sha256_16": _sha16(run_dir / "model.safetensors")}
    return _cached(run_dir / "reference_probe.json", key, lambda: probe_run(run_dir, num_images), reprobe)


#: Images of the two analyses beside the probes (scenes of the validation split, seed 0; see main's --help).
ERASURE_IMAGES, OFFSET_IMAGES = 256, 128


def _analysis_source(module: str) -> str:
    """A digest of the analysis module's source: its cached results are redone when the analysis changes."""
    import importlib

    return _sha16(Path(importlib.import_module(module).__file__))


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def erasure_run(run_dir: Path, num_images: int = ERASURE_IMAGES, batch_size: int = 64) -> dict:
    """:func:`asg_probe.erase_position` at every layer of one run, flattened to ``erase<L>_<field>``.

    Per erase layer ``L``: ``r2_at`` / ``r2_at_control`` (held-out R² at ``L`` after erasing
    position / the random subspace), ``r2_last``, ``r2_row_last``, ``r2_col_last``,
    ``r2_last_control``, ``r2_last_clean`` (recovery: read at the last layer), ``kl_diff`` =
    ``kl − kl_control`` and ``agreement_diff`` = ``agreement − agreement_control`` (the erasure's
    effect beyond the control's), and every scalar field of the analysis' effect row under its
    own name (``agreement``, ``kl``, ``accuracy``, ``edit`` and any field added later). The
    analysis' own JSON is kept whole under ``raw``.
    """
    import asg_probe

    model = asg_probe.load_checkpoint(run_dir).eval()
    res = asg_probe.erase_position(model, "scenes", num_images=num_images, batch_size=batch_size, progress=False,
                                   label=run_dir.parent.name)
    doc = res.to_dict()
    out = {}
    recovery = doc["recovery"]
    last = max(r["read_layer"] for r in recovery)
    for eff in doc["effect"]:
        L = eff["erase_layer"]
        at = next(r for r in recovery if r["erase_layer"] == L and r["read_layer"] == L)
        end = next(r for r in recovery if r["erase_layer"] == L and r["read_layer"] == last)
        row = {k: v for k, v in eff.items() if _scalar(v) and k != "erase_layer"}
        row.update({"r2_at": at.get("r2"), "r2_at_control": at.get("r2_control"), "r2_last": end.get("r2"),
                    "r2_row_last": end.get("r2_row"), "r2_col_last": end.get("r2_col"),
                    "r2_last_control": end.get("r2_control"), "r2_last_clean": end.get("r2_clean")})
        for name, a, b in (("kl_diff", "kl", "kl_control"), ("agreement_diff", "agreement", "agreement_control")):
            if _scalar(eff.get(a)) and _scalar(eff.get(b)):
                row[name] = eff[a] - eff[b]
        out.update({f"erase{L}_{k}": v for k, v in row.items()})
    out["erase_layers"] = [e["erase_layer"] for e in doc["effect"]]
    out["erase_read_last"] = last
    return {"metrics": out, "raw": doc}


def erasure_cached(run_dir: Path, num_images: int = ERASURE_IMAGES, redo: bool = False) -> dict:
    """:func:`erasure_run`'s metrics, kept in ``<run>/reference_erasure.json`` (with the analysis' whole JSON)."""
    key = {"num_images": num_images, "model_sha256_16": _sha16(run_dir / "model.safetensors"),
           "analysis_source_16": _analysis_source("asg_probe.analysis.erasure")}
    return _cached(run_dir / "reference_erasure.json", key, lambda: erasure_run(run_dir, num_images), redo)["metrics"]


def offsets_run(run_dir: Path, num_images: int = OFFSET_IMAGES) -> dict:
    """:func:`asg_probe.attention_offsets` of one run on scenes and on patch-shuffled scenes, flattened.

    Per layer ``l`` (a block's attention): ``offsets<l>_scenes``, ``offsets<l>_shuffled`` (held-out
    offset R², heads pooled), ``offsets<l>_scenes_insample``, ``offsets<l>_shuffled_insample``
    and ``offsets<l>_shuffled_nonself`` (mean over heads of the in-sample share beyond the zero
    offset, patches shuffled). Over layers: ``offsets_shuffled_max`` (the largest held-out
    shuffled value), ``offsets_shuffled_max_layer`` (its layer) and ``offsets_nonself_max``.
    """
    import asg_probe

    model = asg_probe.load_checkpoint(run_dir).eval()
    out, raw = {}, {}
    for name, shuffled in (("scenes", False), ("shuffled", True)):
        res = asg_probe.attention_offsets(model, "scenes", num_images=num_images, progress=False,
                                          label=run_dir.parent.name, shuffle_patches=shuffled)
        doc = res.to_dict()
        raw[name] = {**doc, "layers": [{k: v for k, v in r.items() if k != "heads"} for r in doc["layers"]]}
        for row in doc["layers"]:
            layer = row["layer"]
            out[f"offsets{layer}_{name}"] = row.get("offset_r2_heldout", row["offset_r2"])
            out[f"offsets{layer}_{name}_insample"] = row["offset_r2"]
            nonself = [h.get("offset_r2_nonself") for h in row.get("heads", [])]
            nonself = [v for v in nonself if _scalar(v)]
            if shuffled and nonself:
                out[f"offsets{layer}_shuffled_nonself"] = sum(nonself) / len(nonself)
    layers = sorted(int(k[7:].split("_")[0]) for k in out if k.endswith("_shuffled") and k.startswith("offsets"))
    best = max(layers, key=lambda layer: out[f"offsets{layer}_shuffled"])
    out.update({"offsets_layers": layers, "offsets_shuffled_max": out[f"offsets{best}_shuffled"],
                "offsets_shuffled_max_layer": best,
                "offsets_nonself_max": max((out[f"offsets{layer}_shuffled_nonself"] for layer in layers
                                            if f"offsets{layer}_shuffled_nonself" in out), default=None)})
    return {"metrics": out, "raw": raw}


def offsets_cached(run_dir: Path, num_images: int = OFFSET_IMAGES, redo: bool = False) -> dict:
    """:func:`offsets_run`'s metrics, kept in ``<run>/reference_offsets.json``."""
    key = {"num_images": num_images, "model_sha256_16": _sha16(run_dir / "model.safetensors"),
           "analysis_source_16": _analysis_source("asg_probe.analysis.attention_offsets")}
    return _cached(run_dir / "reference_offsets.json", key, lambda: offsets_run(run_dir, num_images), redo)["metrics"]


# Table 1: accuracy and resolution; table 2: what the probes read from the last layer; table 3: its controls
# (the random-initialisation baseline, the learned gain over it, and the MDL compression; they replace the
# content control, which measured a shifted R²).
TABLES = {
    "accuracy": [("top1", "top-1 @32"), ("top1_half", "@16 (resized)"), ("top1_double", "@64 (resized)"),
                 ("res_r2_16", "probe R² @16 (rendered)"), ("res_r2_64", "probe R² @64 (rendered)"),
                 ("res_retained_16", "retained @16"), ("res_retained_64", "retained @64")],
    "probes": [("r2_row", "R² row"), ("r2_col", "R² col"), ("r2_control", "slot control"),
               ("selectivity", "selectivity (slot)"), ("mlp_r2_col", "MLP R² col"),
               ("shuffle_r2_original", "shuffle: original"), ("shuffle_r2_slot", "shuffle: slot")],
    "controls": [("r2_row_init", "R² row at init"), ("r2_row_gain", "row gain"), ("r2_col_init", "R² col at init"),
                 ("r2_col_gain", "col gain"), ("compression_row", "compression row"),
                 ("compression_col", "compression col")],
}
COLUMNS = [c for cols in TABLES.values() for c, _ in cols]

#: The comparisons RESULTS.md draws conclusions from, each a paired test over seeds (same seed:
#: same initialisation draw and data order): (metric, variant a, variant b, the claim a − b tests).
#: ``b = None`` tests a's value against zero over seeds (for a within-run difference such as
#: ``erase0_kl_diff`` = erased − control, the paired test of the two).
PAIRED_CLAIMS = [
    ("r2_col", "guidance", "none", "guidance builds the column"),
    ("r2_col", "guidance", "guidance_shuffled", "…through its spatial signal, not the auxiliary loss"),
    ("mlp_r2_col", "guidance", "guidance_shuffled", "…also read by an MLP probe"),
    ("r2_col", "guidance_shuffled", "none", "the position-free control stays at none's level"),
    ("r2_col_gain", "guidance", "none", "guidance's column is learned, not given by architecture at init"),
    ("r2_col_gain", "guidance", "guidance_shuffled", "…and its learned gain comes from the spatial signal"),
    ("r2_row_gain", "guidance", "none", "guidance adds row position beyond what init gives, more than none"),
    ("compression_col", "guidance", "guidance_shuffled", "guidance's column is easier to extract (MDL)"),
    ("r2_col_gain", "ape", "none", "ape's column is given at init by its table; training lowers it"),
    ("r2_col_gain", "rope-mixed", "none", "rope-mixed learns a column"),
    ("r2_col", "guidance_random", "guidance", "a fixed permutation of the targets builds the column too"),
    ("shuffle_r2_slot", "ape", "none", "ape decodes the slot (an injection)"),
    ("shuffle_r2_original", "guidance", "none", "guidance reads the original position from content"),
    ("top1", "guidance", "none", "accuracy: guidance vs no position"),
    ("top1", "guidance_shuffled", "none", "accuracy cost of the auxiliary loss alone"),
    ("top1", "guidance", "guidance_shuffled", "accuracy: the spatial signal vs the loss alone"),
    ("top1", "rope-mixed", "none", "accuracy: rope-mixed vs no position"),
    ("top1", "sdt-hybrid", "sdt-decay", "accuracy: SDT hybrid vs full decay"),
    ("res_retained_64", "guidance", "ape", "fraction of the 32-px probe R² kept at 64 px"),
    # the papers' headline comparisons and the relative mechanisms
    ("top1", "guidance", "ape", "accuracy: guidance vs ape (the ASG paper's claim)"),
    ("top1", "guidance", "rope-mixed", "accuracy: guidance vs rope-mixed (the ASG paper's claim)"),
    ("top1", "sdt-decay", "none", "accuracy: SDT decay vs no position"),
    ("r2_col", "rope-mixed", "none", "rope-mixed builds a column"),
    ("shuffle_r2_slot", "rope-mixed", "none", "rope-mixed decodes the slot"),
    ("r2_col", "sdt-hybrid", "none", "SDT's relative decay puts no column in the tokens"),
]

#: Erasure (``--analyses erasure``): recovery after erasing at layer 0, and effects beside the control.
ERASURE_CLAIMS = [
    ("erase0_r2_last", "guidance", "guidance_shuffled",
     "after layer-0 erasure guidance recovers more position than the position-free control"),
    ("erase0_r2_last", "guidance", "none", "…and more than none"),
    ("erase0_r2_col_last", "guidance", "none", "…the column included"),
    ("erase0_r2_last", "rope-mixed", "ape", "rope-mixed re-injects position after layer-0 erasure; ape does not"),
    ("erase0_r2_last", "ape", "none", "ape recovers no more than none once its table is erased"),
    ("erase0_agreement", "ape", "none", "layer-0 erasure changes ape's and none's output alike"),
    ("erase0_kl_diff", "ape", None, "erasing position at layer 0 changes ape's output more than the control"),
    ("erase0_kl_diff", "none", None, "…and none's (row position from content)"),
    ("erase3_kl_diff", "sdt-decay", None, "erasing at layer 3 changes sdt-decay's output more than the control"),
    ("erase3_kl_diff", "rope-mixed", None, "…rope-mixed's"),
    ("erase3_kl_diff", "ape", None, "…ape's"),
    ("erase3_kl_diff", "guidance", None, "…guidance's"),
]

#: Attention offsets (``--analyses offsets``): where the relative mechanisms keep position.
OFFSET_CLAIMS = [
    ("offsets1_shuffled", "sdt-decay", "none", "SDT's decay puts offset structure into the scores (layer 1, shuffled)"),
    ("offsets3_shuffled", "sdt-decay", "none", "…and at layer 3"),
    ("offsets_shuffled_max", "sdt-hybrid", "sdt-decay", "SDT hybrid vs full decay: largest shuffled offset R²"),
    ("offsets4_shuffled", "rope-mixed", "none", "rope-mixed's last-block scores carry an additive offset term"),
    ("offsets_shuffled_max", "ape", "none", "ape puts no offset structure into its scores"),
    ("offsets_shuffled_max", "guidance", "none", "nor does guidance (patches shuffled)"),
    ("offsets4_scenes", "guidance", "none", "on scenes guidance's last-block scores are more offset-structured"),
    ("offsets4_scenes", "guidance", "guidance_shuffled", "…than the position-free control's"),
]

#: Each family of claims, Holm-adjusted within itself: (results.json key, heading, claims).
CLAIM_FAMILIES = {"probes": ("paired_tests", "paired tests over seeds", PAIRED_CLAIMS),
                  "erasure": ("paired_tests_erasure", "erasure: paired tests over seeds", ERASURE_CLAIMS),
                  "offsets": ("paired_tests_offsets", "attention offsets: paired tests over seeds", OFFSET_CLAIMS)}

#: Columns of the erasure table (one row per variant × erase layer): field after ``erase<L>_``.
ERASURE_COLUMNS = [("r2_at", "R² at L after erasure"), ("r2_at_control", "control"),
                   ("r2_last", "recovery: R² at last layer"), ("r2_col_last", "recovery: col"),
                   ("r2_last_control", "control"), ("agreement", "top-1 agreement"),
                   ("agreement_control", "control"), ("kl_diff", "KL erased − control"),
                   ("accuracy", "accuracy erased"), ("accuracy_control", "control"),
                   ("edit", "edit"), ("edit_control", "control edit")]

#: Columns of the offsets table (one row per variant × layer): field after ``offsets<l>_``.
OFFSET_COLUMNS = [("scenes", "scenes (held out)"), ("shuffled", "patches shuffled (held out)"),
                  ("shuffled_nonself", "shuffled, beyond self (in sample)")]

#: Tokens vs scores, one row per variant.
RECONCILE_COLUMNS = [("r2_col", "tokens: R² col"), ("shuffle_r2_slot", "tokens: slot R² (shuffled)"),
                     ("offsets_shuffled_max", "scores: largest offset R² (shuffled, held out)"),
                     ("offsets_nonself_max", "scores: largest beyond self (shuffled)")]


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
    """One paired t-test per claim over the seeds both variants have (two-sided), Holm over the claims.

    Returns dicts with the claim, ``n``, the mean difference a − b, its 95% interval, ``p`` (nan
    with fewer than two pairs or zero spread) and ``p_holm`` (:func:`holm` over the claims given).
    A claim with ``b = None`` tests a's values against zero (a one-sample t-test, which for a
    within-run difference is the paired test of its two parts).
    """
    from scipy.stats import ttest_1samp, ttest_rel

    def value(run, metric):
        v = run.get(metric)
        return v if v is not None and v == v else None

    rows = []
    for metric, a, b, claim in claims or PAIRED_CLAIMS:
        if b is None:
            pairs = [(value(r, metric), 0.0) for _, r in sorted(results.get(a, {}).items())]
        else:
            seeds = sorted(set(results.get(a, {})) & set(results.get(b, {})))
            pairs = [(value(results[a][s], metric), value(results[b][s], metric)) for s in seeds]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        diffs = [x - y for x, y in pairs]
        mean, lo, hi, n = interval(diffs)
        p = float("nan")
        if n >= 2 and statistics.stdev(diffs) > 0:
            xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
            p = float(ttest_1samp(xs, 0.0).pvalue if b is None else ttest_rel(xs, ys).pvalue)
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

    lines = ["| claim | metric | a − b | n | mean difference [95% CI] | p (paired t) | p (Holm, this table) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "–" if r["n"] == 0 else (f"{r['diff']:+.3f}" if r["n"] == 1 else
                                        f"{r['diff']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]")
        pair = f"{r['a']} − {r['b']}" if r["b"] is not None else f"{r['a']} (vs 0)"
        lines.append(f"| {r['claim']} | {r['metric']} | {pair} | {r['n']} | {diff} | {fmt(r['p'])} "
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


def layer_keys(results: dict, prefix: str, columns) -> list[int]:
    """The layers ``l`` with some ``<prefix><l>_<column>`` key in any run, sorted."""
    import re

    names = "|".join(re.escape(c) for c, _ in columns)
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)_(?:{names})$")
    return sorted({int(m.group(1)) for per_seed in results.values() for r in per_seed.values() for k in r
                   if (m := pattern.match(k))})


def tabulate_by_layer(results: dict, prefix: str, columns, layer_heading: str = "layer") -> str:
    """Markdown table, one row per variant × layer: cells ``<prefix><layer>_<column>``, mean [95% CI over seeds].

    >>> runs = {"x": {0: {"erase0_kl": 1.0, "erase1_kl": 0.5}, 1: {"erase0_kl": 3.0, "erase1_kl": 0.5}}}
    >>> print(tabulate_by_layer(runs, "erase", [("kl", "KL")], "erase layer"))
    | run (seeds) | erase layer | KL |
    |---|---|---|
    | x (2) | 0 | 2.000 [-10.706, 14.706] |
    | x (2) | 1 | 0.500 [0.500, 0.500] |
    """
    layers = layer_keys(results, prefix, columns)
    lines = [f"| run (seeds) | {layer_heading} | " + " | ".join(h for _, h in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for recipe, per_seed in results.items():
        for layer in layers:
            cells = [_cell([r.get(f"{prefix}{layer}_{col}") for r in per_seed.values()]) for col, _ in columns]
            if any(c != "–" for c in cells):
                lines.append(f"| {recipe} ({len(per_seed)}) | {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def extra_erasure_columns(results: dict) -> list:
    """Scalar fields of the erasure's effect rows that :data:`ERASURE_COLUMNS` does not show (fields
    the analysis gained later, such as a further control), so that the report shows them too."""
    import re

    # the effect row's fields as of the first version of erase_position, shown or summarised elsewhere
    known = {c for c, _ in ERASURE_COLUMNS} | {"r2_row_last", "r2_last_clean", "rank", "kl", "kl_control",
                                               "agreement_diff", "accuracy_clean", "relative_change",
                                               "relative_change_control"}
    found = {m.group(1) for per_seed in results.values() for r in per_seed.values() for k in r
             if (m := re.match(r"erase\d+_(.+)$", k))}
    return [(f, f) for f in sorted(found - known)]


def tabulate_reconcile(results: dict) -> str:
    """Tokens vs scores, one row per variant with offsets: :data:`RECONCILE_COLUMNS` and the layer of the peak."""
    rows = {v: per_seed for v, per_seed in results.items()
            if any("offsets_shuffled_max" in r for r in per_seed.values())}
    lines = ["| run (seeds) | " + " | ".join(h for _, h in RECONCILE_COLUMNS) + " | layer of the largest (per seed) |",
             "|---" * (len(RECONCILE_COLUMNS) + 2) + "|"]
    for recipe, per_seed in rows.items():
        cells = [_cell([r.get(col) for r in per_seed.values()]) for col, _ in RECONCILE_COLUMNS]
        where = ", ".join(str(r.get("offsets_shuffled_max_layer", "–")) for _, r in sorted(per_seed.items()))
        lines.append(f"| {recipe} ({len(per_seed)}) | " + " | ".join(cells) + f" | {where} |")
    return "\n".join(lines)


def report_markdown(results: dict, num_images: int, analyses=("probes",), erasure_images: int = ERASURE_IMAGES,
                    offset_images: int = OFFSET_IMAGES) -> str:
    """Every table of RESULTS.md's reference sections, in one document."""
    parts = [f"Probes on {num_images} held-out scenes per run; cells: mean [95% Student-t interval over seeds]; "
             "paired tests Holm-adjusted within each table.", ""]
    for name, cols in TABLES.items():
        parts += [f"### {name}", "", tabulate(results, cols), ""]
    parts += ["### paired tests over seeds", "", tabulate_paired(paired_tests(results)), ""]
    parts += ["### mean (row, col) R² by layer", "", tabulate_layers(results), ""]
    parts += ["### column R² by layer", "", tabulate_layers(results, "layers_r2_col"), ""]
    if "erasure" in analyses:
        parts += [f"### erasure (LEACE at each layer; {erasure_images} validation scenes, about half fit the eraser, "
                  "the rest held out; control: random subspace of the same rank)", "",
                  tabulate_by_layer(results, "erase", ERASURE_COLUMNS, "erase layer"), ""]
        extra = extra_erasure_columns(results)
        if extra:
            parts += ["### erasure: further fields of erase_position", "",
                      tabulate_by_layer(results, "erase", extra, "erase layer"), ""]
        parts += ["### erasure: paired tests over seeds", "",
                  tabulate_paired(paired_tests(results, ERASURE_CLAIMS)), ""]
    if "offsets" in analyses:
        parts += [f"### attention offsets (held-out offset R², heads pooled; {offset_images} validation scenes)", "",
                  tabulate_by_layer(results, "offsets", OFFSET_COLUMNS), "",
                  "### tokens vs scores", "", tabulate_reconcile(results), "",
                  "### attention offsets: paired tests over seeds", "",
                  tabulate_paired(paired_tests(results, OFFSET_CLAIMS)), ""]
    return "\n".join(parts)


ANALYSES = ("probes", "erasure", "offsets")


def analyse_run(run_dir: Path, analyses, probe_images: int, erasure_images: int, offset_images: int,
                redo: bool = False) -> dict:
    """One run's row: the probes, then each further analysis asked for, merged into one flat dict."""
    row = dict(probe_cached(run_dir, probe_images, redo))
    if "erasure" in analyses:
        row.update(erasure_cached(run_dir, erasure_images, redo))
    if "offsets" in analyses:
        row.update(offsets_cached(run_dir, offset_images, redo))
    return row


def _analyse_job_here(job):
    """:func:`_analyse_job` in this process, with the threads torch already has."""
    import time

    recipe, seed, run_dir, kwargs = job
    start = time.perf_counter()
    return recipe, seed, analyse_run(run_dir, **kwargs), time.perf_counter() - start


def _analyse_job(job):
    """A worker of ``--jobs``: one thread, one run (the caches are per-run files, so workers never share one)."""
    import time

    import torch

    torch.set_num_threads(1)
    recipe, seed, run_dir, kwargs = job
    start = time.perf_counter()
    row = analyse_run(run_dir, **kwargs)
    return recipe, seed, row, time.perf_counter() - start


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
    p.add_argument("--reprobe", action="store_true", help="analyse again even where the run's cache "
                                                           "(reference_{probe,erasure,offsets}.json) holds results "
                                                           "for the same model and settings")
    p.add_argument("--analyses", nargs="+", choices=ANALYSES, default=["probes"],
                   help="what to run on every finished run (probes always; erasure: asg_probe.erase_position at "
                        "every layer; offsets: asg_probe.attention_offsets on scenes and patch-shuffled scenes)")
    p.add_argument("--erasure-images", type=int, default=ERASURE_IMAGES,
                   help="validation scenes of the erasure (about half fit the eraser, the rest are held out)")
    p.add_argument("--offset-images", type=int, default=OFFSET_IMAGES, help="validation scenes of the offsets")
    p.add_argument("--jobs", type=int, default=1, help="analyse this many runs at once, one thread each "
                                                       "(default 1: one process, torch's threads)")
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
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    analyses = ["probes", *[a for a in ANALYSES[1:] if a in args.analyses]]
    kwargs = {"analyses": analyses, "probe_images": args.probe_images, "erasure_images": args.erasure_images,
              "offset_images": args.offset_images, "redo": args.reprobe}
    jobs = [(recipe, seed, run_dir, kwargs) for recipe, seed, run_dir in runs]
    rows: dict = {}
    if args.jobs == 1:
        done = map(_analyse_job_here, jobs)
    else:
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
        done = pool.map(_analyse_job, jobs)
    for recipe, seed, row, seconds in done:
        rows[recipe, seed] = row
        print(f"analysed {recipe} seed {seed} ({', '.join(analyses)}; {seconds:.0f} s)", file=sys.stderr)
    if args.jobs > 1:
        pool.shutdown()
    results: dict = {}
    for recipe, seed, _ in runs:  # in the order of VARIANTS and seeds, however the workers finished
        results.setdefault(recipe, {})[seed] = rows[recipe, seed]
    import datetime

    import asg_probe

    doc = {"provenance": {"asg_probe_version": asg_probe.__version__, "probe_version": PROBE_VERSION,
                          "date": datetime.date.today().isoformat(), "probe_images": args.probe_images,
                          "probe_images_source": "each run's own validation split (scenes); resolution "
                                                 "columns: scenes rendered at each size",
                          "analyses": analyses,
                          "seeds": {v: sorted(per_seed) for v, per_seed in results.items()}},
           "runs": results}
    if "erasure" in analyses:
        doc["provenance"]["erasure_images"] = args.erasure_images
    if "offsets" in analyses:
        doc["provenance"]["offset_images"] = args.offset_images
    for name in analyses:
        key, _, claims = CLAIM_FAMILIES[name]
        doc[key] = paired_tests(results, claims)
    text = report_markdown(results, args.probe_images, analyses, args.erasure_images, args.offset_images)
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
