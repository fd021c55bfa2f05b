"""Top-1 at the training size and the resolution-transfer sweep (SPEC §1), DDP-aware."""
from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import torch

from .data import BatchPlan, iterate_batches
from .dist import all_reduce_sum


def transfer_sizes(train_size: int, patch: int) -> list[int]:
    """SPEC's 160..416 step 16 for 224-px models, scaled to ``train_size`` and rounded to the patch.

    Examples
    --------
    >>> transfer_sizes(224, 16)[:3], transfer_sizes(224, 16)[-1]
    ([160, 176, 192], 416)
    >>> transfer_sizes(32, 4)
    [24, 28, 32, 36, 40, 44, 48, 52, 56, 60]
    """
    scale = train_size / 224
    sizes = []
    for s in range(160, 417, 16):
        px = max(patch, int(round(s * scale / patch)) * patch)
        if px not in sizes:
            sizes.append(px)
    return sizes


def eval_batch_size(base_batch: int, train_size: int, size: int) -> int:
    """Batch scaled by pixel count so memory stays about constant across the sweep."""
    return max(1, int(base_batch * train_size ** 2 / size ** 2))


@torch.no_grad()
def evaluate(model, dataset, sizes, *, train_size: int, base_batch: int, device, ctx, amp=None,
             num_workers: int = 0, progress=None) -> list[dict]:
    """Top-1 on ``dataset`` at each size: ``[{"size", "top1", "n", "unreadable"}]``.

    Every process evaluates a strided shard; counts are summed over processes.
    """
    was_training = model.training
    model.eval()
    rows = []
    for size in sizes:
        plan = BatchPlan(len(dataset), eval_batch_size(base_batch, train_size, size), shuffle=False,
                         rank=ctx.rank, world_size=ctx.world_size, base_size=size)
        correct = total = skipped = 0
        for x, y, n_bad in iterate_batches(dataset, plan.batches(0), num_workers=num_workers):
            skipped += n_bad
            valid = y >= 0
            if not valid.any():
                continue
            x, y = x[valid].to(device, non_blocking=True), y[valid].to(device, non_blocking=True)
            with amp() if amp is not None else contextlib.nullcontext():
                logits = model(x)
            correct += int((logits.argmax(-1) == y).sum())
            total += int(y.numel())
        correct, total, skipped = all_reduce_sum([correct, total, skipped], device)
        rows.append({"size": int(size), "top1": correct / max(total, 1), "n": int(total),
                     "unreadable": int(skipped)})
        if progress is not None:
            progress(rows[-1])
    model.train(was_training)
    return rows


def write_eval(run_dir, rows: list[dict], train_size: int) -> dict:
    """``eval.json`` and ``eval.csv`` beside the checkpoint; returns the JSON document."""
    run_dir = Path(run_dir)
    at_train = next((r for r in rows if r["size"] == train_size), None)
    doc = {"train_size": train_size, "top1": at_train["top1"] if at_train else None, "sweep": rows}
    (run_dir / "eval.json").write_text(json.dumps(doc, indent=2))
    with open(run_dir / "eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["size", "top1", "n", "unreadable"])
        writer.writeheader()
        writer.writerows(rows)
    return doc
