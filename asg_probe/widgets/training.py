"""The comparison explorer across training: a step slider (with play) over runs' snapshots.

A run trained with ``snapshot_every`` / ``snapshot_schedule`` keeps
``RUN_DIR/snapshots/step_XXXXXXX.safetensors``. :class:`TrainingExplorer` is the
:class:`~asg_probe.widgets.ComparisonExplorer` with one more control, a training-step
slider: every run is shown at the snapshot nearest the chosen step, through the same
panels (attention, probe field, token layout). Snapshots are loaded only when the
slider reaches them, and the views of a few are kept (:class:`RunSnapshots`).
"""
from __future__ import annotations

import bisect
from collections import OrderedDict

import ipywidgets as widgets

from .explorer import MEAN_HEAD, ComparisonExplorer, model_header

__all__ = ["TrainingExplorer", "RunSnapshots"]


class RunSnapshots:
    """One run's snapshots, each turned into a :class:`ModelView` on first use.

    Parameters
    ----------
    run : path or list of paths
        A run directory (its ``snapshots/`` folder) or checkpoint files, as
        :func:`asg_probe.analysis.emergence.find_snapshots` reads them.
    images : optional
        The image set every snapshot is shown on (see :class:`ModelView`).
    label : str
    cache_size : int, default=4
        Views kept (their tokens, probes and layouts); the least recently shown goes first.
    **view_kwargs
        Passed to :class:`ModelView`.

    Attributes
    ----------
    steps : list of int
        Snapshot steps, ascending.
    loads : int
        Checkpoints read so far (a step shown again after eviction is read again).

    Examples
    --------
    >>> import asg_probe, tempfile, pathlib
    >>> from asg_probe.widgets import RunSnapshots
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> for s in (0, 8):
    ...     _ = asg_probe.save_checkpoint(run / "snapshots" / f"step_{s:07d}",
    ...                                   asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1))
    >>> snaps = RunSnapshots(run, num_images=4, embedding="pca")
    >>> snaps.steps, snaps.nearest(5), snaps.loads
    ([0, 8], 8, 0)
    >>> snaps.view(8).depth, snaps.loads
    (1, 1)
    """

    def __init__(self, run, images=None, label=None, *, cache_size=4, **view_kwargs):
        from ..analysis.emergence import _run_label, find_snapshots

        found = find_snapshots(run)
        self.steps = [int(step) for step, _ in found]
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"{label or run}: two snapshots have the same step; steps {self.steps}")
        self.paths = {int(step): path for step, path in found}
        self.label = str(label) if label is not None else _run_label(run, 0)
        self.images = images
        self.cache_size = max(1, int(cache_size))
        self.view_kwargs = view_kwargs
        self.loads = 0
        self._views = OrderedDict()

    def __repr__(self):
        return f"RunSnapshots({self.label!r}, steps={self.steps}, loaded={list(self._views)})"

    def nearest(self, step) -> int:
        """The snapshot step closest to ``step`` (the earlier one on a tie)."""
        step = int(step)
        i = bisect.bisect_left(self.steps, step)
        candidates = self.steps[max(i - 1, 0):i + 1]
        return min(candidates, key=lambda s: (abs(s - step), s))

    def loaded(self, step) -> bool:
        """Whether the view of snapshot ``step`` is in the cache."""
        return int(step) in self._views

    def view(self, step):
        """The :class:`ModelView` of snapshot ``step`` (exact step; see :meth:`nearest`)."""
        from .. import load_checkpoint
        from .view import ModelView

        step = int(step)
        if step not in self.paths:
            raise ValueError(f"{self.label} has no snapshot at step {step}; steps: {self.steps}")
        if step not in self._views:
            model = load_checkpoint(self.paths[step])
            self.loads += 1
            self._views[step] = ModelView(model, self.images, self.label, **self.view_kwargs)
            while len(self._views) > self.cache_size:
                self._views.popitem(last=False)
        self._views.move_to_end(step)
        return self._views[step]


def _as_runs(runs, labels):
    if isinstance(runs, dict):
        items = list(runs.items())
    else:
        from ..analysis.emergence import _run_label

        runs = [runs] if isinstance(runs, str) or hasattr(runs, "is_dir") else list(runs)
        items = [(_run_label(run, i), run) for i, run in enumerate(runs)]
    if labels is not None:
        if len(labels) != len(items):
            raise ValueError(f"{len(labels)} labels for {len(items)} runs")
        items = [(label, run) for label, (_, run) in zip(labels, items)]
    if not items:
        raise ValueError("no runs given")
    if len({str(k) for k, _ in items}) != len(items):
        raise ValueError(f"two runs have the same label: {[k for k, _ in items]}; pass labels=")
    return [(str(k), v) for k, v in items]


class TrainingExplorer(ComparisonExplorer):
    """The comparison explorer over training: runs side by side, one step slider for all.

    Everything of :class:`ComparisonExplorer` (layer, head, query patch, image, the
    attention / probe field / token layout panels) plus a **step** slider and a play
    button. The slider runs over every step that any run has a snapshot of; each run
    shows its snapshot nearest the chosen step (the earlier on a tie), and its header
    says which step that is.

    Parameters
    ----------
    runs : dict, list or path
        ``{label: run}`` or a list of runs; a run is a training directory with
        ``snapshots/`` or a list of checkpoint files. Labels of a list are the run folders.
    images : optional
        One image set for every run and step (see :class:`ModelView`).
    step : int, optional
        Initial step (default: the last).
    labels : list of str, optional
        Names of the runs (with a list of runs).
    cache_size : int, default=4
        Snapshot views kept per run.
    interval : int, default=1500
        Milliseconds between steps when playing (the first visit of a step loads a
        checkpoint and runs the model).
    image_index, layer, head, query, show, orientation
        As in :class:`ComparisonExplorer`.
    **view_kwargs
        Passed to :class:`ModelView` (``num_images``, ``embedding``, ``n_folds``, ...).

    Attributes
    ----------
    step : ipywidgets.SelectionSlider
        Its value is a training step.
    play : ipywidgets.Play
        Linked (kernel side) to ``step.index``.
    snapshots : dict
        ``{label: RunSnapshots}``.
    shown_steps : dict
        ``{label: step of the snapshot shown}``.
    last_render : dict
        As in :class:`ComparisonExplorer`, plus ``step`` (the slider's) and
        ``snapshot_step`` (the snapshot's) for each run.

    Examples
    --------
    >>> import asg_probe, tempfile, pathlib, torch
    >>> from asg_probe.widgets import TrainingExplorer
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> for s in (0, 4, 16):
    ...     _ = torch.manual_seed(s)
    ...     m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    ...     _ = asg_probe.save_checkpoint(run / "snapshots" / f"step_{s:07d}", m)
    >>> ex = TrainingExplorer({"ape": run}, num_images=4, embedding="pca", layer=0)
    >>> ex.step.options, ex.step.value
    ((0, 4, 16), 16)
    >>> ex.play.value = 1                    # what the play button does
    >>> ex.step.value, ex.shown_steps["ape"]
    (4, 4)
    """

    def __init__(self, runs, images=None, *, step=None, labels=None, cache_size=4, interval=1500,
                 image_index=0, layer=None, head=MEAN_HEAD, query=None, show=None, orientation="columns",
                 **view_kwargs):
        self.snapshots = OrderedDict(
            (label, RunSnapshots(run, images, label, cache_size=cache_size, **view_kwargs))
            for label, run in _as_runs(runs, labels))
        all_steps = sorted({s for snaps in self.snapshots.values() for s in snaps.steps})
        step = all_steps[-1] if step is None else min(all_steps, key=lambda s: (abs(s - int(step)), s))
        style = {"description_width": "60px"}
        self.step = widgets.SelectionSlider(options=all_steps, value=step, description="step",
                                            continuous_update=False, style=style)
        self.play = widgets.Play(value=all_steps.index(step), min=0, max=len(all_steps) - 1, step=1,
                                 interval=int(interval), description="play through training")
        # A kernel-side link, as in LayerSlider: tests driving `play.value` see the slider follow.
        self._link = widgets.link((self.play, "value"), (self.step, "index"))
        self.shown_steps = {}
        super().__init__(self._select_snapshots(), images, image_index=image_index, layer=layer, head=head,
                         query=query, show=show, orientation=orientation)
        self.depth_controls.children = (widgets.HBox([self.play, self.step]),) + self.depth_controls.children
        self.widget.add_class("asg-training-explorer")
        self.step.observe(self._on_change, names="value")

    def _select_snapshots(self):
        """Point every shown run at its snapshot nearest the slider's step (loading it if needed)."""
        step = int(self.step.value)
        # Before the base constructor has built the run selector, every run is shown.
        selected = self.models.value if hasattr(self, "models") else tuple(self.snapshots)
        current = OrderedDict()
        for label, snaps in self.snapshots.items():
            if label in selected or label not in self.shown_steps:
                shown = snaps.nearest(step)
                if not snaps.loaded(shown) and hasattr(self, "status"):
                    self._busy(f"{label}: loading the snapshot of step {shown}")
                current[label] = snaps.view(shown)
                self.shown_steps[label] = shown
            else:  # a hidden run keeps its last snapshot; nothing is loaded for it
                current[label] = self.views[label]
        return current

    def update(self):
        """Show every run at its snapshot nearest the chosen step, then redraw as the explorer does."""
        try:
            self.views.update(self._select_snapshots())
        except Exception as exc:  # a notebook callback has nowhere else to report to
            from .panels import traceback_html

            self.last_error = exc
            self.status.value = traceback_html(exc)
            return self
        step = int(self.step.value)
        for i, (label, shown) in enumerate(self.shown_steps.items()):
            note = f"step {shown}" if shown == step else f"step {shown} (nearest to {step})"
            self._panels[label]["header"].value = model_header(label, self.views[label], i, note)
        super().update()
        for label, state in self.last_render.items():
            state.update(step=step, snapshot_step=self.shown_steps[label])
        return self

    def _draw(self, label, kind, key, draw):
        # The same layer/head/image/query at another snapshot is another picture.
        super()._draw(label, kind, (self.shown_steps[label],) + tuple(key), draw)
