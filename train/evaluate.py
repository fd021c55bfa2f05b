"""Evaluation: one DDP-aware loop over a validation set, and one metric accumulator per task.

:func:`evaluate_at` runs the predictions of a model at one image size over a strided shard of
the validation set on every process and feeds them to a metric accumulator; the accumulators'
statistics are summed over processes before the result is computed, so one process and eight
give the same numbers. Accumulators: :class:`TopOne` (classification), :class:`Confusion`
(segmentation: mIoU, pixel accuracy), :class:`DepthErrors` (AbsRel, RMSE, δ1–δ3).

Examples
--------
>>> import torch
>>> acc = TopOne()
>>> acc.update(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 0, -1]))
>>> acc.result(acc.state())                    # label -1 (unreadable placeholder) is left out
{'top1': 0.5, 'n': 2}
"""
from __future__ import annotations

import contextlib

import torch

from .data import BatchPlan, iterate_batches
from .dense import confusion_matrix, depth_metrics, mean_iou
from .dist import all_reduce_sum

DEPTH_KEYS = ("abs_rel", "rmse", "delta1", "delta2", "delta3")


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
    """Batch scaled by pixel count so memory stays about constant across the sweep.

    Examples
    --------
    >>> eval_batch_size(64, 224, 448)
    16
    """
    return max(1, int(base_batch * train_size ** 2 / size ** 2))


# --------------------------------------------------------------------------- accumulators

class TopOne:
    """Top-1 accuracy over images with a label (label ``-1``: an unreadable placeholder)."""

    def __init__(self):
        self.correct = self.total = 0

    def update(self, logits, labels):
        valid = labels >= 0
        self.correct += int((logits.argmax(-1)[valid] == labels[valid]).sum())
        self.total += int(valid.sum())

    def state(self) -> list[float]:
        return [self.correct, self.total]

    def result(self, state) -> dict:
        correct, total = state
        return {"top1": correct / max(total, 1), "n": int(total)}


class Confusion:
    """Segmentation: a confusion matrix over labelled pixels → mIoU and pixel accuracy.

    ``n`` counts the images with at least one labelled pixel.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.images = 0

    def update(self, logits, target):
        self.confusion += confusion_matrix(logits.argmax(1), target, self.num_classes, self.ignore_index)
        self.images += int((target != self.ignore_index).flatten(1).any(1).sum())

    def state(self) -> list[float]:
        return self.confusion.flatten().double().tolist() + [self.images]

    def result(self, state) -> dict:
        confusion = torch.tensor(state[:-1]).reshape(self.num_classes, self.num_classes)
        acc = float(confusion.diag().sum() / confusion.sum().clamp(min=1))
        return {"miou": mean_iou(confusion), "pixel_acc": acc, "n": int(state[-1])}


class DepthErrors:
    """Depth: :func:`asg_train.dense.depth_metrics` per image with valid pixels, averaged over images."""

    def __init__(self):
        self.sums = dict.fromkeys(DEPTH_KEYS, 0.0)
        self.images = 0

    def update(self, pred, target):
        for i in range(pred.shape[0]):
            if (target[i] > 0).any():
                m = depth_metrics(pred[i:i + 1], target[i:i + 1])
                for k in DEPTH_KEYS:
                    self.sums[k] += m[k]
                self.images += 1

    def state(self) -> list[float]:
        return [self.sums[k] for k in DEPTH_KEYS] + [self.images]

    def result(self, state) -> dict:
        n = max(state[-1], 1)
        return {**{k: v / n for k, v in zip(DEPTH_KEYS, state)}, "n": int(state[-1])}


# --------------------------------------------------------------------------- the loop

@torch.no_grad()
def evaluate_at(predict, dataset, size: int, metric, *, train_size: int, base_batch: int, device, ctx,
                amp=None, num_workers: int = 0, bar=None) -> dict:
    """``{"size", <metric's values>, "n", "unreadable"}`` of ``predict`` on ``dataset`` at ``size`` px.

    Parameters
    ----------
    predict : callable
        ``images on device -> outputs`` (logits, segmentation logits or depth maps).
    metric : TopOne, Confusion or DepthErrors
        A fresh accumulator; its statistics are summed over processes.
    bar : tqdm or None
        Advanced by one per batch (progress during a long evaluation).
    """
    plan = BatchPlan(len(dataset), eval_batch_size(base_batch, train_size, size), shuffle=False,
                     rank=ctx.rank, world_size=ctx.world_size, base_size=size)
    skipped = 0
    for x, target, n_bad in iterate_batches(dataset, plan.batches(0), num_workers=num_workers):
        skipped += n_bad
        with amp() if amp is not None else contextlib.nullcontext():
            out = predict(x.to(device, non_blocking=True))
        metric.update(out.float().cpu(), target)
        if bar is not None:
            bar.update(1)
    totals = all_reduce_sum(metric.state() + [skipped], device)
    return {"size": int(size), **metric.result(totals[:-1]), "unreadable": int(totals[-1])}


def num_eval_batches(dataset, sizes, *, train_size: int, base_batch: int, ctx) -> int:
    """This process's batches over all ``sizes`` (the length of the evaluation progress bar)."""
    return sum(len(BatchPlan(len(dataset), eval_batch_size(base_batch, train_size, s), shuffle=False,
                             rank=ctx.rank, world_size=ctx.world_size, base_size=s).batches(0)) for s in sizes)
