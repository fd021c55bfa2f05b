"""Train the CPU reference models and probe them: one command from recipes to a results table.

    python -m asg_train.reference --out runs/reference                 # train (skips finished runs), probe, tabulate
    python -m asg_train.reference --out runs/reference --seeds 0 1 2   # several seeds, mean ± std in the table
    python -m asg_train.reference --out runs/reference --probe-only
    python -m asg_train.reference --out runs/reference --seeds 1 2 --variants none guidance guidance_shuffled
    python -m asg_train.reference --base cpu_photos --out runs/photos     # the same set on the photo crops

For each variant (none, ape, rope-mixed, sdt-decay, guidance, and two guidance controls: a fixed
random permutation of the targets, and a fresh one per image — position-free) it runs
``asg-train`` in this process (the recipe file ``<base>_<variant>.yaml`` where one exists, else
``<base>.yaml`` plus the variant's overrides), then fits the probes of ``asg_probe`` on held-out
images of the run's own validation split: last-layer coordinate R² (row, col), the control-task R² and selectivity, and the
patch-shuffle test (is position read from content or from an injected signal?). Results go to
``<out>/results.{json,md}``; each run dir keeps its own ``command.txt`` (the exact command).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from asg_probe.files import atomic_write_text

from .config import CONFIG_DIR

VARIANTS = {
    "none": [],
    "ape": ["model.pos=ape"],
    "rope-mixed": ["model.pos=rope-mixed"],
    "sdt-decay": ["model.pos=sdt-decay"],
    "guidance": ["guidance.enabled=true"],
    "guidance_random": ["guidance.enabled=true", "guidance.target=random"],
    "guidance_shuffled": ["guidance.enabled=true", "guidance.target=shuffled"],
}
RECIPES = [f"cpu_scenes_{v}" for v in VARIANTS]  # the reference set (all but guidance_shuffled are bundled)


def variant_args(base: str, variant: str) -> list[str]:
    recipe = CONFIG_DIR / f"{base}_{variant}.yaml"
    if recipe.is_file():
        return ["--config", str(recipe)]
    return ["--config", str(CONFIG_DIR / f"{base}.yaml"), *VARIANTS[variant]]


def train_all(out: Path, seeds, overrides=(), base: str = "cpu_scenes", variants=None) -> None:
    """Train every (seed, variant) run under ``out`` that has no exported model yet; resume partial ones."""
    from . import cli

    # seed-major: a complete matched set exists after the first seed, before the others start
    for seed in seeds:
        for variant in variants or VARIANTS:
            run_dir = out / variant / f"seed{seed}"
            if not (run_dir / "model.safetensors").is_file():
                args = [*variant_args(base, variant), f"out={run_dir}", f"seed={seed}", *overrides]
                if (run_dir / "train_state.pt").is_file():
                    args.append("--resume")
                rc = cli.main(args)
                if rc != 0:
                    raise SystemExit(f"training {variant} seed {seed} failed (exit {rc})")


def probe_run(run_dir: Path, num_images: int, tokens: str = "pre_norm") -> dict:
    import asg_probe
    from asg_probe.analysis.shuffle import shuffle_test

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
    # the small MLP probe of asg_probe on the same last-layer patch tokens as the linear probe
    # (pre- or post-final-norm, `tokens`), held out by image.
    import torch
    from asg_probe.probes import final_norm
    from asg_probe.extract import forward_tokens
    from asg_probe.probes import MLPProbe

    norm, depth = final_norm(model, tokens), max(r["layer"] for r in layer.rows)
    with torch.no_grad():
        last_tokens = torch.cat([forward_tokens(model, b, layers=[depth])[depth] for b in images.split(100)])
        if norm is not None:
            last_tokens = norm(last_tokens)
    p = model.patch_embed.patch_size[0]
    mlp = MLPProbe(seed=0).fit(last_tokens, grid=(images.shape[-2] // p, images.shape[-1] // p))
    eval_doc = json.loads((run_dir / "eval.json").read_text())
    sweep = {r["size"]: r["top1"] for r in eval_doc["sweep"]}
    size = eval_doc["train_size"]
    return {"top1": eval_doc["top1"], "top1_half": sweep.get(size // 2), "top1_double": sweep.get(size * 2),
            "r2_row": last["r2_row"], "r2_col": last["r2_col"], "r2_control": last.get("r2_control"),
            "selectivity": last.get("selectivity"), "mlp_r2_row": float(mlp.heldout_r2_[0]),
            "mlp_r2_col": float(mlp.heldout_r2_[1]), "shuffle_r2_original": shuffle["r2_original"],
            "shuffle_r2_slot": shuffle["r2_slot"], "shuffle_source": shuffle["source"],
            "layers_r2": [r["r2"] for r in layer.rows]}


COLUMNS = ["top1", "top1_half", "top1_double", "r2_row", "r2_col", "r2_control", "selectivity",
           "mlp_r2_row", "mlp_r2_col", "shuffle_r2_original", "shuffle_r2_slot"]


def tabulate(results: dict) -> str:
    """Markdown table: one row per recipe, mean ± std over seeds where there are several."""
    head = "| run | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for recipe, per_seed in results.items():
        cells = []
        for col in COLUMNS:
            values = [r[col] for r in per_seed.values() if r.get(col) is not None]
            if not values:
                cells.append("–")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}")
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m asg_train.reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/reference")
    p.add_argument("--base", default="cpu_scenes", help="recipe family in train/configs (cpu_scenes, cpu_photos)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--probe-images", type=int, default=500)
    p.add_argument("--probe-only", action="store_true")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                   help="train only these (default: all); every finished run under --out is probed and tabulated")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="passed to every training run (put them before --seeds/--variants)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.probe_only:
        train_all(out, args.seeds, args.overrides, base=args.base, variants=args.variants)
    # every finished run under --out goes into the table, whichever command trained it
    runs = [(v, int(d.name[4:]), d) for v in VARIANTS for d in sorted((out / v).glob("seed*"))
            if (d / "model.safetensors").is_file()]
    results: dict = {}
    for recipe, seed, run_dir in runs:
        results.setdefault(recipe, {})[seed] = probe_run(run_dir, args.probe_images)
        print(f"probed {recipe} seed {seed}", file=sys.stderr)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    table = tabulate(results)
    atomic_write_text(out / "results.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
