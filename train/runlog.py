"""What a run reports while it trains: the metrics log and the progress bars (process 0 only).

Examples
--------
>>> import tempfile, pathlib
>>> run = pathlib.Path(tempfile.mkdtemp())
>>> log = MetricsLog(run, enabled=True, resume_step=None)
>>> log.write({"step": 1, "loss": 2.5})
>>> (run / "metrics.jsonl").read_text()
'{"step": 1, "loss": 2.5}\\n'
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from asg_probe.files import atomic_write_text

METRIC_FIELDS = ["step", "epoch", "lr", "lambda", "loss", "loss_task", "loss_coord", "train_acc",
                 "grad_norm", "images_per_s", "unreadable", "elapsed_s"]


def _csv_text(rows, header: bool) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\r\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


class MetricsLog:
    """``metrics.jsonl`` + ``metrics.csv`` on process 0.

    A resume keeps the rows up to the checkpoint's step and drops the rest (they belong to the
    part of the run that is trained again); both files are rewritten atomically, then rows
    are appended. Appending, not rewriting, keeps a row O(1) on runs of many thousand rows;
    the most a kill can leave is a line cut short, which the next start drops (the CSV is
    rebuilt from the JSON lines).
    """

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.csv = Path(run_dir) / "metrics.csv"
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the half-written last line of a killed run
                    continue
            rows = [r for r in rows if r.get("step", 0) <= resume_step]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(self.csv, _csv_text(rows, header=True))

    def write(self, row: dict):
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            f.write(_csv_text([row], header=False))


def progress_bar(ctx, enabled: bool, **kwargs):
    """A tqdm bar on process 0 when ``enabled``; None elsewhere (one bar per run, not per process)."""
    if not (enabled and ctx.is_main):
        return None
    from asg_probe.progress import progress_bar as bar

    return bar(dynamic_ncols=True, leave=False, **kwargs)
