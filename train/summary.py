"""Several seeds → one table: mean ± std of top-1 at the training size and across the sweep."""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from asg_probe.files import atomic_write_text


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_seed_summary(out, summaries: list[dict]) -> str:
    """Write ``summary.csv``/``summary.json``/``summary.md`` in ``out``; return the Markdown table.

    Rows: the metric (``top1`` at the training size, ``final_loss``, then ``top1@<size>``
    for every size of the sweep); columns: mean, std, and each seed's value.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [s["seed"] for s in summaries]
    metrics = {"top1": [s.get("top1") for s in summaries],
               "final_loss": [s.get("final_loss") for s in summaries],
               "final_loss_coord": [s.get("final_loss_coord") for s in summaries]}
    sizes = sorted({int(k) for s in summaries for k in s.get("transfer", {})})
    for size in sizes:
        metrics[f"top1@{size}"] = [s.get("transfer", {}).get(str(size)) for s in summaries]
    rows = []
    for name, values in metrics.items():
        mean, std = mean_std(values)
        rows.append({"metric": name, "mean": mean, "std": std, **{f"seed{k}": v for k, v in zip(seeds, values)}})
    atomic_write_text(out / "summary.json", json.dumps({"seeds": seeds, "rows": rows, "runs": summaries}, indent=2))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "summary.csv", text.getvalue())

    def fmt(v):
        return "–" if v is None else f"{v:.4f}"

    lines = [f"| metric | mean ± std (n={len(seeds)}) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for r in rows:
        ms = "–" if r["mean"] is None else f"{r['mean']:.4f} ± {r['std']:.4f}"
        lines.append(f"| {r['metric']} | {ms} | " + " | ".join(fmt(r[f'seed{s}']) for s in seeds) + " |")
    table = "\n".join(lines)
    atomic_write_text(out / "summary.md", table + "\n")
    return table
