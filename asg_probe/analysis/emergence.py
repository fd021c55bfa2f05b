"""Emergence: how spatial organisation appears during training, probe by snapshot.

A training run with ``snapshot_every`` / ``snapshot_schedule`` set keeps inference-only
checkpoints in ``RUN_DIR/snapshots/step_XXXXXXX.safetensors``. :func:`emergence` runs the
layerwise coordinate probes and the mean attention distance on every snapshot of one or
more runs, on the same images for every snapshot and run, with one forward pass per
snapshot per batch (the probe statistics and the attention reducer share it), and keeps
only the per-layer numbers, so memory is flat in the number of snapshots.

The summary says, for every run, the first snapshot step at which a chosen layer's
column R² reaches a threshold ("when does the model know the column?"), and for runs
that are seeds of one variant (``.../seed0``, ``.../seed1``), the mean and a 95% t
interval of that step over the seeds.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..results import AnalysisResult

__all__ = ["emergence", "EmergenceResult", "find_snapshots", "SNAPSHOT_DIR"]

SNAPSHOT_DIR = "snapshots"
_STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")
_METRICS = ("r2_row", "r2_col", "r2", "r2_control", "mean_attention_px")


def find_snapshots(run) -> list:
    """``[(step, path), ...]`` of a run, sorted by step.

    ``run`` is a run directory (its ``snapshots/`` folder is read, or the folder itself
    if it holds ``step_*.safetensors`` files) or a list of checkpoint files, whose step
    is read from the ``step_XXXXXXX`` file name or else from the checkpoint metadata.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> (run / "snapshots").mkdir()
    >>> for s in (0, 10, 2):
    ...     _ = (run / "snapshots" / f"step_{s:07d}.safetensors").write_bytes(b"")
    >>> [step for step, _ in find_snapshots(run)]
    [0, 2, 10]
    """
    from ..errors import UsageError

    if isinstance(run, (list, tuple)):
        found = []
        for path in run:
            path = Path(path)
            match = _STEP_FILE.match(path.name)
            step = int(match.group(1)) if match else _step_from_metadata(path)
            found.append((step, path))
        return sorted(found, key=lambda item: item[0])
    run = Path(run)
    folder = run / SNAPSHOT_DIR if (run / SNAPSHOT_DIR).is_dir() else run
    if not folder.is_dir():
        raise UsageError(f"{run} is not a run directory; pass a training run folder with snapshots/ "
                         "(train with snapshot_every=N) or a list of checkpoint files")
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))
    if not found:
        raise UsageError(f"no step_*.safetensors snapshots in {folder}; train with snapshot_every=N "
                         "(or snapshot_schedule=log) to keep them")
    return found


def _step_from_metadata(path) -> int:
    """The ``step`` recorded in an asg_probe checkpoint's metadata (header only, no weights read)."""
    import json

    from safetensors import safe_open

    from ..checkpoint import FORMAT_NAME
    from ..errors import UsageError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(FORMAT_NAME, "{}"))
    except Exception as exc:  # noqa: BLE001 - any unreadable header is one line for the user
        raise UsageError(f"{path}: cannot read its header ({exc}); pass step_XXXXXXX.safetensors files") from None
    step = meta.get("step", (meta.get("train") or {}).get("step"))
    if isinstance(step, bool) or not isinstance(step, (int, str)) or not str(step).isdigit():
        what = "no step" if step is None else f"a step of {step!r}"
        raise UsageError(f"{path}: {what} in its name (step_XXXXXXX.safetensors) or metadata; rename it")
    return int(step)


def _stored_architecture(path):
    """``(name, pos, kwargs)`` from an asg_probe checkpoint's header (no weights read); ``None``
    when the file does not say (it is compared after loading instead)."""
    import json

    from safetensors import safe_open

    from ..checkpoint import FORMAT_NAME

    try:
        with safe_open(str(path), framework="pt") as f:
            model = json.loads((f.metadata() or {}).get(FORMAT_NAME, "{}")).get("model")
    except Exception:  # noqa: BLE001 - unreadable: load_checkpoint says why, with the file's name
        return None
    if not isinstance(model, dict):
        return None
    return _architecture_key(model)


def _architecture_key(desc):
    return (desc.get("name"), desc.get("pos"), _json_key(desc.get("kwargs") or {}))


def _json_key(value) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def _describe_architecture(key) -> str:
    name, pos, kwargs = key
    return f"{name} pos={pos}" + (f" {kwargs}" if kwargs != "{}" else "")


def check_one_architecture(run, snaps, loaded=None) -> None:
    """Every snapshot of one run must be the same architecture (name, mechanism, arguments):
    a snapshot of another model would be drawn into the run's curve as if it were a later
    step. Raises :class:`~asg_probe.errors.InputError` naming the first one that differs.

    ``loaded``: ``{path: architecture key}`` of snapshots already loaded; others are read
    from their headers.
    """
    from ..errors import InputError

    loaded = loaded or {}
    first = None
    for step, path in snaps:
        key = loaded.get(path) or _stored_architecture(path)
        if key is None:
            continue
        if first is None:
            first = (path, key)
        elif key != first[1]:
            raise InputError(f"{run}: snapshot {Path(path).name} is {_describe_architecture(key)}, but "
                             f"{Path(first[0]).name} is {_describe_architecture(first[1])}; a run's snapshots "
                             "must be one model: move the other one out of the run")


def seed_group(run_label: str) -> str:
    """The variant a run belongs to: its label without a trailing ``seedN`` part.

    >>> seed_group("runs/guidance/seed1"), seed_group("guidance-seed2"), seed_group("none")
    ('runs/guidance', 'guidance', 'none')
    """
    label = str(run_label).rstrip("/")
    stripped = re.sub(r"[/_\-]?seed\d+$", "", label)
    return stripped or label


class EmergenceResult(AnalysisResult):
    """Per-run, per-snapshot, per-layer probe and attention numbers.

    ``runs`` is a list of ``{"run", "steps": [...], "layers": [{"layer", "r2_row": [...],
    "r2_col": [...], "r2": [...], "r2_control": [...], "mean_attention_px": [...]}]}``,
    one value per step, which is the layout of ``emergence.json``.
    """

    name = "emergence"

    def __init__(self, runs, *, threshold=0.5, summary_layer=-1, provenance=None):
        self.runs = runs
        self.threshold = float(threshold)
        self.summary_layer = int(summary_layer)
        self.provenance = dict(provenance or {})

    # -- tables -------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"runs": self.runs, "threshold": self.threshold, "summary_layer": self.summary_layer,
                "summary": self.summary_rows(), **({"provenance": self.provenance} if self.provenance else {})}

    def to_frame(self):
        """Long table: one row per (run, step, layer)."""
        import pandas as pd

        rows = []
        for run in self.runs:
            for entry in run["layers"]:
                for i, step in enumerate(run["steps"]):
                    row = {"run": run["run"], "step": int(step), "layer": entry["layer"]}
                    row.update({m: entry[m][i] for m in _METRICS if m in entry})
                    rows.append(row)
        return pd.DataFrame(rows)

    def _layer_entry(self, run, layer=None):
        layer = self.summary_layer if layer is None else int(layer)
        layers = [e["layer"] for e in run["layers"]]
        if layer < 0:
            layer = layers[layer]
        for entry in run["layers"]:
            if entry["layer"] == layer:
                return entry
        raise ValueError(f"layer {layer} was not analysed; analysed layers: {layers}")

    def first_step(self, run, metric="r2_col", threshold=None, layer=None):
        """First snapshot step at which ``metric`` of ``layer`` reaches ``threshold`` (``None``: never)."""
        threshold = self.threshold if threshold is None else threshold
        if isinstance(run, str):
            run = next(r for r in self.runs if r["run"] == run)
        values = self._layer_entry(run, layer)[metric]
        for step, value in zip(run["steps"], values):
            if value is not None and value >= threshold:
                return int(step)
        return None

    def summary_rows(self) -> list:
        """One row per run (first step the column passes the threshold, final R²), then one per
        seed group with ≥ 2 seeds (mean and 95% t interval of that step over seeds; a seed that
        never passes makes the group's interval undefined and is counted)."""
        rows = []
        for run in self.runs:
            entry = self._layer_entry(run)
            rows.append({"run": run["run"], "layer": entry["layer"], "threshold": self.threshold,
                         "first_step_col": self.first_step(run), "first_step_row": self.first_step(run, "r2_row"),
                         "final_step": int(run["steps"][-1]), "final_r2_col": entry["r2_col"][-1],
                         "final_r2_row": entry["r2_row"][-1], "final_r2_control": entry["r2_control"][-1],
                         "snapshots": len(run["steps"])})
        groups = {}
        for row in rows:
            groups.setdefault(seed_group(row["run"]), []).append(row)
        for group, members in groups.items():
            if len(members) < 2:
                continue
            steps = [m["first_step_col"] for m in members]
            finals = np.array([m["final_r2_col"] for m in members], dtype=float)
            passed = [s for s in steps if s is not None]
            row = {"run": f"{group} (mean of {len(members)} seeds)", "layer": members[0]["layer"],
                   "threshold": self.threshold, "seeds": len(members), "seeds_never_passing": len(steps) - len(passed),
                   "final_r2_col": float(finals.mean()),
                   "final_r2_col_ci": _interval(finals)}
            if len(passed) == len(steps):
                arr = np.array(passed, dtype=float)
                row["first_step_col"] = float(arr.mean())
                row["first_step_col_ci"] = _interval(arr)
            else:
                row["first_step_col"] = None
                row["first_step_col_ci"] = None
            rows.append(row)
        return rows

    def summary_frame(self):
        import pandas as pd

        return pd.DataFrame(self.summary_rows())

    # -- pictures -----------------------------------------------------------
    def plot(self, ax=None, metric_pair=("r2_col", "r2_row")):
        """Step × layer heatmaps of column and row R² per run, and the summary layer's column R²
        of every run against the (log-scaled) step."""
        from ..plotting import new_figure

        n = len(self.runs)
        fig, axes = new_figure(3.4, 2.8, ncols=3, nrows=n)
        for r, run in enumerate(self.runs):
            steps = run["steps"]
            layers = [e["layer"] for e in run["layers"]]
            for c, metric in enumerate(metric_pair):
                ax_ = axes[r][c]
                grid = np.array([[np.nan if v is None else v for v in e[metric]] for e in run["layers"]])
                image = ax_.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                                   interpolation="nearest")
                ax_.set_yticks(range(len(layers)), [str(lay) for lay in layers])
                ticks = _tick_positions(len(steps))
                ax_.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7, rotation=45)
                ax_.set_xlabel("training step (snapshot)")
                ax_.set_ylabel("layer")
                axis = "column" if metric == "r2_col" else "row"
                ax_.set_title(f"{_short_label(run['run'])}: {axis} R²", fontsize=9)
                fig.colorbar(image, ax=ax_, fraction=0.046, pad=0.04)
            axes[r][2].axis("off")
        curve_ax = axes[0][2]
        curve_ax.axis("on")
        for run in self.runs:
            entry = self._layer_entry(run)
            steps = np.array(run["steps"], dtype=float)
            colour = _run_color(run["run"])
            curve_ax.plot(steps, entry["r2_col"], marker="o", ms=3, color=colour, label=_short_label(run["run"]))
            curve_ax.plot(steps, entry["r2_control"], ls=":", lw=0.8, color=colour)
        curve_ax.set_xscale("symlog", linthresh=1)
        curve_ax.axhline(self.threshold, color="k", lw=0.6, ls="--")
        curve_ax.set_xlabel("training step (log; dotted: control)")
        curve_ax.set_ylabel(f"layer {self._layer_entry(self.runs[0])['layer']} column R²")
        curve_ax.set_ylim(-0.05, 1.02)
        curve_ax.grid(alpha=0.3)
        curve_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        return f"EmergenceResult(\n{self.summary_frame().to_string(index=False)}\n)"


def _short_label(run_label: str) -> str:
    """How a run is named in a figure: a run folder ``.../guidance/seed0`` as ``guidance/seed0``,
    any other label as its display name (the JSON keeps the full label).

    >>> _short_label("/work/runs/guidance/seed0"), _short_label("runs/none"), _short_label("ape")
    ('guidance/seed0', 'none', 'ape')
    """
    from ..plotting import display_name

    parts = str(run_label).replace("\\", "/").rstrip("/").split("/")
    if len(parts) > 1 and re.fullmatch(r"seed\d+", parts[-1]):
        return f"{display_name(parts[-2])}/{parts[-1]}"
    return display_name(parts[-1])


def _run_color(run_label: str) -> str:
    """The colour of the model a run trains (seeds of one variant share it): ``.../guidance_shuffled/seed1``
    is drawn in ``guidance-shuffled``'s colour.

    >>> from asg_probe.plotting import MODEL_COLORS
    >>> _run_color("runs/guidance_shuffled/seed1") == MODEL_COLORS["guidance-shuffled"]
    True
    """
    from ..plotting import model_color

    return model_color(_short_label(seed_group(run_label)).split("/")[-1])


def _tick_positions(n: int, most: int = 8) -> list:
    if n <= most:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, most).round().astype(int).tolist()))


def _interval(values) -> list:
    """95% t interval of a mean over seeds, ``[lo, hi]`` (``None`` for one value)."""
    from ..probes.metrics import fold_interval

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    return [float(v) for v in fold_interval(values)]


def _run_label(run, index: int) -> str:
    if isinstance(run, (list, tuple)):
        first = Path(run[0]) if run else None
        return str(first.parent) if first is not None else f"run {index}"
    run = Path(run)
    return str(run.parent if run.name == SNAPSHOT_DIR else run)


def _snapshot_rows(model, imageset, *, layers, batch_size, device, n_folds, control_seed):
    """Per-layer numbers of one snapshot from one forward pass per batch."""
    from ..extract import run_analyses
    from ..geometry import model_geometry
    from ..inputs import ImageBatches
    from .attention_distance import AttentionDistanceAccumulator
    from .layerwise import LayerwiseAccumulator, LayerwiseResult

    data = ImageBatches.prepare(model, imageset, batch_size=batch_size)
    geo = model_geometry(model)
    probes = LayerwiseAccumulator(n_folds=n_folds, control_seed=control_seed, online_code=False)  # R² only
    attention = AttentionDistanceAccumulator(geo.patch_size, geo.num_prefix_tokens)
    run_analyses(model, data, [probes, attention], layers=layers, device=device, progress=False)
    layerwise = LayerwiseResult.from_accumulator(probes)
    mean_px = {row["layer"]: row["mean_px"] for row in attention.result().to_dict()["layers"]}
    return {row["layer"]: {"r2_row": row["r2_row"], "r2_col": row["r2_col"], "r2": row["r2"],
                           "r2_control": row["r2_control"],
                           # layer 0 (patch embedding) has no attention
                           "mean_attention_px": mean_px.get(row["layer"])}
            for row in layerwise.rows}, data


def emergence(runs, images=None, *, layers=None, num_images=64, img_size=None, batch_size=32, device="cpu",
              seed=0, progress=True, threshold=0.5, summary_layer=-1, n_folds=5, control_seed=0,
              max_snapshots=None, labels=None):
    """Layerwise probes and attention distance on every training snapshot of one or more runs.

    Parameters
    ----------
    runs : path, or list of paths / lists of checkpoint files
        Training run directories with ``snapshots/step_XXXXXXX.safetensors`` (train with
        ``snapshot_every=N`` or ``snapshot_schedule=log``), or explicit lists of snapshot files.
    images : None, str, Path, ImageSet or uint8 tensor
        The same images are used for every snapshot of every run. ``None``: held-out
        procedural scenes when the first run trained on scenes (its ``config.yaml`` /
        checkpoint metadata says so), else the embedded photographs.
    layers : list of int, optional
        Layers to probe (default: all, ``0..depth``).
    num_images, img_size, batch_size, device, seed, progress
        As for :func:`asg_probe.layerwise_probes`.
    threshold : float
        Column R² a layer must reach for the summary's "first step".
    summary_layer : int
        Layer the summary and the curves use (negative counts from the end).
    max_snapshots : int, optional
        Analyse at most this many snapshots per run, spread evenly over the run (first and
        last always kept).
    labels : list of str, optional
        Display names of the runs (default: their folders).

    Returns
    -------
    EmergenceResult

    Examples
    --------
    >>> import asg_probe, tempfile, pathlib
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> for step in (0, 5):
    ...     m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", num_classes=2)
    ...     _ = asg_probe.save_checkpoint(run / "snapshots" / f"step_{step:07d}.safetensors", m, step=step)
    >>> res = emergence([run], num_images=10, progress=False)
    >>> res.runs[0]["steps"]
    [0, 5]
    """
    from .. import __version__
    from ..checkpoint import load_checkpoint
    from ..errors import UsageError
    from ..progress import progress_bar

    if isinstance(runs, (str, Path)):
        runs = [runs]
    runs = list(runs)
    if not runs:
        raise UsageError("emergence needs at least one run directory (or list of snapshot files)")
    if not 0 < float(threshold) <= 1:
        raise UsageError(f"threshold must be in (0, 1], got {threshold}")
    if labels is not None and len(labels) != len(runs):
        raise UsageError(f"{len(labels)} labels for {len(runs)} runs")
    found = [find_snapshots(run) for run in runs]
    if max_snapshots is not None:
        if int(max_snapshots) < 2:
            raise UsageError("max_snapshots must be at least 2 (the first and the last snapshot)")
        found = [_spread(snaps, int(max_snapshots)) for snaps in found]
    for run, snaps in zip(runs, found):  # before any work: from the headers
        check_one_architecture(run, snaps)

    imageset = None
    out_runs = []
    total = sum(len(snaps) for snaps in found)
    bar = progress_bar(total=total, desc="emergence", unit="snapshot", disable=not progress)
    provenance_images = None
    try:
        for index, (run, snaps) in enumerate(zip(runs, found)):
            label = labels[index] if labels is not None else _run_label(run, index)
            steps, per_layer, loaded = [], {}, {}
            for step, path in snaps:
                model = load_checkpoint(path)
                config = getattr(model, "asg_config", None)
                if isinstance(config, dict):  # files without a header are compared once loaded
                    loaded[path] = _architecture_key(config)
                    check_one_architecture(run, [(s, p) for s, p in snaps if p in loaded], loaded)
                if imageset is None:
                    imageset = _load_once(model, images, run, num_images=num_images, img_size=img_size, seed=seed)
                rows, data = _snapshot_rows(model, imageset, layers=layers, batch_size=batch_size, device=device,
                                            n_folds=n_folds, control_seed=control_seed)
                provenance_images = provenance_images or data.provenance()
                steps.append(int(step))
                for layer, values in rows.items():
                    entry = per_layer.setdefault(layer, {"layer": int(layer), **{m: [] for m in _METRICS}})
                    for metric in _METRICS:
                        entry[metric].append(values[metric])
                del model  # one snapshot in memory at a time
                bar.update(1)
            out_runs.append({"run": label, "steps": steps, "layers": [per_layer[k] for k in sorted(per_layer)]})
    finally:
        bar.close()
    provenance = {"package_version": __version__, "images": provenance_images, "device": str(device),
                  "n_folds": int(n_folds), "control_seed": int(control_seed)}
    return EmergenceResult(out_runs, threshold=threshold, summary_layer=summary_layer, provenance=provenance)


def _spread(snaps, most: int):
    if len(snaps) <= most:
        return snaps
    keep = sorted(set(np.linspace(0, len(snaps) - 1, most).round().astype(int).tolist()))
    return [snaps[i] for i in keep]


def _load_once(model, images, run, *, num_images, img_size, seed):
    """The image set every snapshot is probed on: uint8, normalised later per model."""
    from ..data import load_images

    if images is None:
        images = "scenes" if _trained_on_scenes(model, run) else None
    if isinstance(images, np.ndarray):
        import torch

        images = torch.as_tensor(images)
    if hasattr(images, "shape") or hasattr(images, "images"):  # a tensor or an ImageSet: use as is
        return images
    size = img_size
    if size is None:
        from ..geometry import input_config

        size = input_config(model)[2]
    return load_images(images, num_images=num_images, img_size=int(size), seed=seed)


def _trained_on_scenes(model, run) -> bool:
    from ..checkpoint import trained_on_scenes

    if trained_on_scenes(model):
        return True
    if not isinstance(run, (list, tuple)):
        folder = Path(run)
        folder = folder.parent if folder.name == SNAPSHOT_DIR else folder
        cfg = folder / "config.yaml"
        if cfg.is_file():
            import yaml

            try:
                return ((yaml.safe_load(cfg.read_text()) or {}).get("data") or {}).get("kind") == "scenes"
            except yaml.YAMLError:
                return False
    return False
