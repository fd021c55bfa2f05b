"""One object per training task: its data, its trainable module, its evaluation and its exports.

The training loop (:mod:`asg_train.trainer`) knows only this interface, so it has no
task branches; a new task is a new :class:`Task` subclass registered in :data:`TASKS`.

================  ===========================  ==========================  ======================
task              data.kind                    module                      evaluation
================  ===========================  ==========================  ======================
classification    imagefolder, scenes,         backbone classifier         top-1 at the training
                  photos, synthetic                                        size and the transfer
                                                                           sweep
segmentation      ade20k                       backbone + UPerNet head     mIoU, pixel accuracy
depth             hypersim                     backbone + DPT head         AbsRel, RMSE, δ1–δ3
================  ===========================  ==========================  ======================

Examples
--------
>>> from asg_train.config import resolve
>>> task = make_task(resolve(overrides=["data.kind=synthetic"]))
>>> task.name, task.primary
('classification', 'top1')
"""
from __future__ import annotations

import csv
import io
import json
from functools import partial
from pathlib import Path

from asg_probe.files import atomic_write_text

from .evaluate import Confusion, DepthErrors, TopOne, evaluate_at, transfer_sizes
from .modules import ClassificationModule, DenseModule


class Task:
    """What differs between tasks; every method is called by the training loop.

    Attributes
    ----------
    name : str
        The ``task`` config value.
    primary : str
        The metric logged as ``val_<primary>`` by ``eval.every_epochs``.
    head : nn.Module or None
        A task head trained beside the backbone (dense tasks), saved in the training state.
    """

    name = ""
    primary = ""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.head = None

    def build_splits(self):
        """Train and validation datasets (:class:`asg_train.data.Splits`); one-line errors on bad data."""
        raise NotImplementedError

    def num_classes(self, splits) -> int:
        """Outputs of the backbone's own classifier (0: none)."""
        return 0

    def build_module(self, model, guidance_head):
        """The trainable module (contract in :mod:`asg_train.modules`)."""
        raise NotImplementedError

    def eval_sizes(self, train_size: int, patch: int) -> list[int]:
        """Image sizes of the final evaluation."""
        return [train_size]

    def new_metric(self):
        """A fresh accumulator of :mod:`asg_train.evaluate`."""
        raise NotImplementedError

    def predictor(self, module):
        """``images -> outputs`` for evaluation."""
        raise NotImplementedError

    def evaluate(self, module, dataset, sizes, *, train_size: int, **kwargs) -> tuple[dict, dict]:
        """``(metrics for the summary, document for eval.json)``; ``kwargs`` go to :func:`evaluate_at`."""
        was_training = module.training
        module.eval()
        predict = self.predictor(module)
        rows = [evaluate_at(predict, dataset, s, self.new_metric(), train_size=train_size, **kwargs) for s in sizes]
        module.train(was_training)
        return self.summarise(rows, train_size)

    def summarise(self, rows: list[dict], train_size: int) -> tuple[dict, dict]:
        row = next(r for r in rows if r["size"] == train_size)
        metrics = {k: v for k, v in row.items() if k not in ("size", "n", "unreadable")}
        return metrics, {"train_size": train_size, **row}

    def write_eval(self, run_dir: Path, doc: dict):
        atomic_write_text(Path(run_dir) / "eval.json", json.dumps(doc, indent=2))

    def head_state(self):
        return self.head.state_dict() if self.head is not None else None

    def load_head_state(self, state):
        if self.head is not None:
            self.head.load_state_dict(state)

    def export(self, run_dir: Path):
        """Inference files beside ``model.safetensors`` (the backbone is exported by the loop)."""

    def headline(self, metrics: dict) -> str:
        """The evaluation part of the run's one-line report."""
        raise NotImplementedError


class ClassificationTask(Task):
    """Image classification with the backbone's classifier; top-1 over the resolution-transfer sweep."""

    name = "classification"
    primary = "top1"

    def build_splits(self):
        from .data import build_image_splits

        return build_image_splits(self.cfg)

    def num_classes(self, splits) -> int:
        return splits.num_classes

    def build_module(self, model, guidance_head):
        return ClassificationModule(model, guidance_head)

    def eval_sizes(self, train_size, patch):
        sizes = self.cfg["eval"]["sizes"] or transfer_sizes(train_size, patch)
        return sorted(set(sizes) | {train_size})

    def new_metric(self):
        return TopOne()

    def predictor(self, module):
        return module.model

    def summarise(self, rows, train_size):
        top1 = next(r["top1"] for r in rows if r["size"] == train_size)
        metrics = {"top1": top1, "transfer": {str(r["size"]): r["top1"] for r in rows}}
        return metrics, {"train_size": train_size, "top1": top1, "sweep": rows}

    def write_eval(self, run_dir, doc):
        super().write_eval(run_dir, doc)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["size", "top1", "n", "unreadable"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(doc["sweep"])
        atomic_write_text(Path(run_dir) / "eval.csv", text.getvalue())

    def headline(self, metrics):
        return f"top1@{self.cfg['model']['img_size']} {metrics['top1']:.4f}"


class DenseTask(Task):
    """Segmentation or depth: a dense head on the token maps of ``dense.layers``."""

    def build_splits(self):
        from .dense_data import build_dense_splits

        return build_dense_splits(self.cfg)

    def task_loss(self):
        raise NotImplementedError

    def build_module(self, model, guidance_head):
        from .dense import build_dense_head

        self.head = build_dense_head(self.cfg, model)
        return DenseModule(model, self.head, self.cfg["dense"]["layers"], self.task_loss(), guidance_head)

    def predictor(self, module):
        return lambda x: module.predict(x)[0]

    def export(self, run_dir):
        from asg_probe.files import atomic_write_path
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu().clone() for k, v in self.head.state_dict().items()}
        meta = {"task": self.name, "layers": json.dumps(self.cfg["dense"]["layers"])}
        with atomic_write_path(Path(run_dir) / "dense_head.safetensors") as tmp:
            save_file(tensors, tmp, metadata=meta)


class SegmentationTask(DenseTask):
    """ADE20K semantic segmentation: per-pixel cross-entropy; mIoU and pixel accuracy."""

    name = "segmentation"
    primary = "miou"

    def task_loss(self):
        from .dense import segmentation_loss

        return partial(segmentation_loss, ignore_index=self.cfg["dense"]["ignore_index"])

    def new_metric(self):
        return Confusion(self.cfg["dense"]["num_classes"], self.cfg["dense"]["ignore_index"])

    def headline(self, metrics):
        return f"mIoU {metrics['miou']:.4f}"


class DepthTask(DenseTask):
    """Hypersim monocular depth: scale/shift-invariant loss; AbsRel, RMSE, δ1–δ3 after mean/std alignment."""

    name = "depth"
    primary = "abs_rel"

    def task_loss(self):
        from .dense import depth_task_loss

        return depth_task_loss

    def new_metric(self):
        return DepthErrors()

    def headline(self, metrics):
        return f"AbsRel {metrics['abs_rel']:.4f} δ1 {metrics['delta1']:.4f}"


TASKS = {t.name: t for t in (ClassificationTask, SegmentationTask, DepthTask)}


def make_task(cfg: dict) -> Task:
    """The :class:`Task` for ``cfg["task"]`` (a resolved config)."""
    return TASKS[cfg["task"]](cfg)
