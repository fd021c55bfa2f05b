"""Layerwise coordinate probes: at which depth does each token know where it is?

For every layer (0 = tokens entering block 1, ``i`` = output of block ``i``) a
ridge probe maps patch tokens to normalised (row, col), regularisation chosen by
k-fold cross-validation split by image, scored by held-out R², with a 95% interval
(``r2_ci``, ``r2_row_ci``, ``r2_col_ci``, ...) from the delete-one-fold jackknife with refits
(:mod:`asg_probe.probes.intervals`): it covers the expected R² *at this number of images*
(R² rises with the number of images; ``num_images`` is recorded beside every interval).
What each control answers:

* ``r2_control`` / ``selectivity``: the *slot* control (slot ``i`` asked for the coordinates of
  slot ``perm[i]``, averaged over ``n_control_seeds`` permutations, spread in ``r2_control_std``),
  solved by any code that tells slots apart: true minus control separates a code of *geometry*
  from mere slot *identity*. It does not say whether position was learned, nor whether it is
  read off content;
* ``compression_row`` / ``compression_col``: minimum description length by Voita & Titov's online
  code (:mod:`asg_probe.probes.mdl`): how *easily* position is extracted (1: no better than
  sending the targets uniformly; large: a few images suffice);
* ``r2_init``, ``r2_row_init``, ``r2_col_init`` and the learned gain ``r2_gain`` (``r2 - r2_init``,
  also per row and column): the random-initialisation baseline, the same architecture freshly
  initialised (:func:`asg_probe.reinit.reinitialised`, ``n_init_seeds`` seeds, spread in
  ``r2_init_std``), probed on the same images and folds: is the decodability learned, or given by
  the architecture and the image statistics?

The small non-linear probe gets the same controls, with the same meanings, as ``mlp_*`` fields
(``mlp_r2``, ``mlp_r2_control``, ``mlp_selectivity``, ``mlp_r2_init``, ``mlp_r2_gain``...):
:func:`mlp_layer_probe` for one layer of a model.

Each layer's probe is a streaming :class:`asg_probe.probes.CoordinateProbe`
(statistics, not tokens), so the cost is one forward pass (one more per init seed) and memory
does not grow with the number of images; the result keeps the fitted probes
(:meth:`LayerwiseResult.probe`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..extract import Accumulator, batch_grid
from ..probes import (CellAccuracy, CoordinateProbe, control_seeds, control_target_names, coordinate_targets,
                      final_norm, jackknife_cv_r2, jackknife_interval, mlp_controls, online_code,
                      slot_control_targets)
from ..results import AnalysisResult

#: Slot-control seeds by default: extra target columns, cheap.
N_CONTROL_SEEDS = 5
#: Freshly initialised copies probed for the random-initialisation baseline by default.
N_INIT_SEEDS = 3
#: What every ``*_ci`` is, recorded in the result.
INTERVAL = ("95%, delete-one-fold jackknife with refits (asg_probe.probes.intervals): covers the expected "
            "held-out R² at num_images images")


class ProbeAccumulator(Accumulator):
    """One streaming :class:`~asg_probe.probes.CoordinateProbe` per layer: the base of the probe analyses.

    Follows :class:`~asg_probe.extract.Accumulator`: each batch's tokens go to
    ``probes[layer].partial_fit``; :meth:`all_reduce` sums the probes' statistics over
    processes (once); :meth:`fitted` solves them (once). Subclasses choose the probe
    (:meth:`_new_probe`) and the targets (:meth:`_targets`; ``None``: the grid's coordinates).
    """

    def __init__(self, n_folds=5, alphas=None, exact=True, method="fast", norm=None):
        self.n_folds = n_folds
        self.norm = norm  # applied to every layer's tokens first (final_norm), or None
        self.alphas = alphas
        self.exact = exact
        self.method = method
        self.probes = {}
        self.grid = None
        self._fitted = None

    def _new_probe(self) -> CoordinateProbe:
        return CoordinateProbe(n_folds=self.n_folds, alphas=self.alphas, exact=self.exact, method=self.method)

    #: Whether layers of different grids (a grid backbone's stages) can be fed: only where
    #: :meth:`_grid_targets` is defined, since the targets depend on the grid.
    per_layer_grids = False

    def _targets(self, batch):
        """``(y, target_names)`` for ``partial_fit``, or ``None`` for the grid's coordinates."""
        return None

    def _grid_targets(self, batch, grid):
        """:meth:`_targets` for the layers whose grid is ``grid``; ``batch.grid`` unless :attr:`per_layer_grids`."""
        return self._targets(batch)

    def update(self, batch):
        self.grid = batch_grid(self.grid, batch)
        self.grids = getattr(self, "grids", {})
        targets = {}   # grid -> (y, names): computed once per grid and batch
        for layer, tokens in batch.tokens.items():
            grid = tuple(batch.grids.get(layer, self.grid))
            if self.grids.setdefault(layer, grid) != grid:
                raise ValueError(f"all images must have one size; layer {layer} had grid {self.grids[layer]}, "
                                 f"now {grid}")
            if grid not in targets:
                targets[grid] = self._grid_targets(batch, grid) or (None, None)
            y, names = targets[grid]
            if self.norm is not None:
                with torch.no_grad():
                    tokens = self.norm(tokens)
            if layer not in self.probes:
                self.probes[layer] = self._new_probe()
            self.probes[layer].partial_fit(tokens, batch.image_index, grid=grid, y=y, target_names=names)
        self._fitted = None

    def all_reduce(self, group=None):
        """Sum every layer's statistics over torch.distributed processes (once; no-op in one process)."""
        for layer in sorted(self.probes):
            self.probes[layer].all_reduce(group)

    def _solved(self, probe):
        return probe

    def fitted(self) -> dict:
        """``{layer: fitted probe}``, solved once (after :meth:`all_reduce`)."""
        if self._fitted is None:
            self.all_reduce()  # a no-op when run_analyses already did it
            self._fitted = {layer: self._solved(self.probes[layer].finalize()) for layer in sorted(self.probes)}
        return self._fitted

    @property
    def num_images(self) -> int:
        """Images seen (by every process, once reduced)."""
        if not self.probes:
            return 0
        return int(self.probes[min(self.probes)].stats_.n_images.sum())


class LayerwiseAccumulator(ProbeAccumulator):
    """Per layer, a probe of the grid coordinates and its slot controls (:class:`ProbeAccumulator`).

    Target columns: ``row``, ``col``, then the slot control of each control seed
    (``control_row``, ``control_col`` for ``control_seed``, ``control_row_s{seed}``... for the
    next ``n_control_seeds - 1``). The probes also stream the online code's first blocks
    (``online_code``, for ``compression_row``/``compression_col``). The fitted probes
    (:meth:`fitted`) predict ``row``/``col``, with ``control_cv_r2_`` the first slot-control seed;
    every column's scores are in their ``cv_results_``.

    Examples
    --------
    >>> import asg_probe, torch
    >>> from asg_probe.extract import run_analyses
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    >>> (acc,) = run_analyses(m, [(torch.randn(5, 3, 32, 32), torch.arange(5))], [LayerwiseAccumulator()],
    ...                       progress=False)
    >>> sorted(acc.fitted()), acc.fitted()[0].coef_.shape
    ([0, 1], (2, 128))
    """

    def __init__(self, n_folds=5, control_seed=0, alphas=None, exact=True, method="fast",
                 n_control_seeds=N_CONTROL_SEEDS, norm=None, online_code=True):
        super().__init__(n_folds=n_folds, alphas=alphas, exact=exact, method=method, norm=norm)
        self.control_seed = control_seed
        self.seeds = control_seeds(control_seed, n_control_seeds)
        self.online_code = bool(online_code)
        self._cached = None

    def _new_probe(self) -> CoordinateProbe:
        return super()._new_probe().set_params(control=True, control_seed=self.control_seed,
                                               online_code=self.online_code)

    # the targets are normalised grid coordinates, so layers of different grids (a grid
    # backbone's stages) are probed for the same thing and compare
    per_layer_grids = True

    def _targets(self, batch):
        return self._grid_targets(batch, tuple(batch.grid))

    def _grid_targets(self, batch, grid):
        device = next(iter(batch.tokens.values())).device
        if getattr(self, "_cached", None) is None:
            self._cached = {}
        key = (grid, str(device))
        if key not in self._cached:   # the same for every image of a grid
            self._cached[key] = torch.cat([coordinate_targets(grid), slot_control_targets(grid, self.seeds)],
                                          dim=1).to(device)
        return self._cached[key], ("row", "col") + control_target_names(self.seeds)

    def _solved(self, probe):
        return probe.select([0, 1], control_columns=[2, 3])


class InitBaselineAccumulator(ProbeAccumulator):
    """Per layer, the plain (row, col) probe of a freshly initialised model: no controls, no online code.

    Fed the same images (and so the same folds) as the model's own :class:`LayerwiseAccumulator`.
    """

    # targets are each layer's own grid coordinates (normalised), as for LayerwiseAccumulator
    per_layer_grids = True

    def _new_probe(self) -> CoordinateProbe:
        return super()._new_probe().set_params(control=False)


class CellAccuracyAccumulator(Accumulator):
    """Second pass: held-out per-cell classification accuracy of fitted probes, per layer.

    Parameters
    ----------
    probes : dict
        ``{layer: fitted CoordinateProbe}`` (e.g. :meth:`LayerwiseAccumulator.fitted`);
        each image is scored by the fold model that never saw it.
    grid : (int, int)
    """

    def __init__(self, probes, grid, norm=None):
        self.counters = {layer: CellAccuracy(probe, grid) for layer, probe in probes.items()}
        self.norm = norm  # the probes' token view (final_norm), or None
        self._reduced = False

    def update(self, batch):
        for layer, tokens in batch.tokens.items():
            if self.norm is not None:
                with torch.no_grad():
                    tokens = self.norm(tokens)
            self.counters[layer].update(tokens, batch.image_index)

    def all_reduce(self, group=None):
        """Sum the counts over torch.distributed processes (once; no-op in one process)."""
        if not self._reduced:
            for layer in sorted(self.counters):
                self.counters[layer].all_reduce(group)
            self._reduced = True

    def accuracy(self):
        """``{layer: held-out exact-cell accuracy}``."""
        self.all_reduce()
        return {layer: c.accuracy for layer, c in self.counters.items()}


def _geomean(a, b):
    return float(math.sqrt(a * b))


def _control_columns(names, prefix):
    """Indices of a control's (row, col) column pairs, one pair per seed, in seed order."""
    rows = [i for i, n in enumerate(names) if n == f"{prefix}_row" or n.startswith(f"{prefix}_row_s")]
    cols = [i for i, n in enumerate(names) if n == f"{prefix}_col" or n.startswith(f"{prefix}_col_s")]
    return list(zip(rows, cols))


def _spread(values):
    # sample std over seeds; 0 with a single seed (no spread measured)
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _replicates(probe, columns):
    """Delete-one-fold jackknife replicates ``(F, len(columns))`` of the probe's CV R² (at its alphas)."""
    res = probe.cv_results_
    return jackknife_cv_r2(probe.stats_, res.alpha_[list(columns)], columns)


def _row(layer, probe, grid=None):
    """One table row, and the jackknife replicates its intervals came from (``{"row", "col", "r2"}``).

    Every R² has a 95% interval (:func:`~asg_probe.probes.jackknife_interval` of the
    delete-one-fold replicates). The slot control is the mean over its seeds' columns (row, col,
    and their average per seed), with ``r2_control_std`` the sample std over seeds of the per-seed
    (row + col) / 2. ``compression_row``/``compression_col`` need the online code's statistics and
    the ``grid`` (row and column levels).
    """
    res = probe.cv_results_
    names, r2 = res.target_names, res.cv_r2_
    main = [names.index(n) for n in probe.target_names_]
    r2_row, r2_col = (float(r2[i]) for i in main)
    mean = 0.5 * (r2_row + r2_col)
    pairs = _control_columns(names, "control")
    reps = _replicates(probe, main + [c for pair in pairs for c in pair])
    rep = {"row": reps[:, 0], "col": reps[:, 1], "r2": 0.5 * (reps[:, 0] + reps[:, 1])}
    per_seed = [0.5 * (r2[a] + r2[b]) for a, b in pairs]
    rep_control = np.mean([0.5 * (reps[:, 2 + 2 * i] + reps[:, 3 + 2 * i]) for i in range(len(pairs))], axis=0)
    control = float(np.mean(per_seed))
    out = {"layer": int(layer), "r2_row": r2_row, "r2_col": r2_col, "r2": mean,
           "r2_control": control, "selectivity": mean - control,
           "alpha": _geomean(probe.alpha_[0], probe.alpha_[1]),
           "alpha_row": float(probe.alpha_[0]), "alpha_col": float(probe.alpha_[1]),
           "alpha_at_edge": bool(probe.alpha_at_edge_.any()),
           "r2_control_row": float(np.mean([r2[a] for a, _ in pairs])),
           "r2_control_col": float(np.mean([r2[b] for _, b in pairs])),
           "r2_control_std": _spread(per_seed), "n_control_seeds": len(pairs),
           "r2_ci": jackknife_interval(mean, rep["r2"]), "r2_row_ci": jackknife_interval(r2_row, rep["row"]),
           "r2_col_ci": jackknife_interval(r2_col, rep["col"]),
           "r2_control_ci": jackknife_interval(control, rep_control),
           "selectivity_ci": jackknife_interval(mean - control, rep["r2"] - rep_control)}   # paired over folds
    if grid is not None and getattr(probe.stats_, "head", None) is not None:
        code = online_code(probe.stats_, res.alpha_[main], main, levels=list(grid))
        out["compression_row"], out["compression_col"] = (float(c) for c in code["compression"])
    return out, rep


def _init_rows(rows, replicates, init_probes):
    """Add the random-initialisation baseline to ``rows`` (in place).

    ``init_probes``: one ``{layer: fitted probe}`` per init seed (same images and folds as the
    model's). Per layer: ``r2_init``, ``r2_row_init``, ``r2_col_init`` (means over seeds), their
    intervals (jackknife of the seed-averaged replicates: the seeds are fixed, the images vary),
    ``r2_init_std`` (sample std over seeds of each seed's (row + col) / 2), ``n_init_seeds``, and
    the learned gains ``r2_gain``, ``r2_row_gain``, ``r2_col_gain`` (model minus init) with paired
    intervals (the same folds, replicate by replicate).
    """
    for row in rows:
        layer = row["layer"]
        seeds = [probes[layer] for probes in init_probes]
        r2s = np.array([p.cv_r2_ for p in seeds])                                  # (S, 2)
        reps = np.mean([_replicates(p, [0, 1]) for p in seeds], axis=0)           # (F, 2)
        init = {"row": float(r2s[:, 0].mean()), "col": float(r2s[:, 1].mean())}
        init["r2"] = 0.5 * (init["row"] + init["col"])
        rep_init = {"row": reps[:, 0], "col": reps[:, 1], "r2": 0.5 * (reps[:, 0] + reps[:, 1])}
        own = replicates[layer]
        for key, field in (("r2", "r2"), ("row", "r2_row"), ("col", "r2_col")):
            row[f"{field}_init"] = init[key]
            row[f"{field}_init_ci"] = jackknife_interval(init[key], rep_init[key])
            gain = row[field] - init[key]
            row[f"{field}_gain"] = gain
            row[f"{field}_gain_ci"] = jackknife_interval(gain, own[key] - rep_init[key])
        row["r2_init_std"] = _spread(list(0.5 * (r2s[:, 0] + r2s[:, 1])))
        row["n_init_seeds"] = len(seeds)


class LayerwiseResult(AnalysisResult):
    """Per-layer probe scores, and the fitted probes themselves.

    ``rows`` is a list of dicts, one per layer (see :meth:`to_dict`);
    :meth:`probe` returns a layer's fitted :class:`~asg_probe.probes.CoordinateProbe`
    (``coef_``, ``intercept_``, ``predict``), to apply it elsewhere.

    Examples
    --------
    >>> import asg_probe, torch
    >>> model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    >>> res = asg_probe.layerwise_probes(model, torch.randn(10, 3, 32, 32), progress=False)
    >>> probe = res.probe(0)
    >>> probe.coef_.shape, bool(abs(probe.cv_r2_.mean() - res.rows[0]["r2"]) < 1e-12)
    ((2, 128), True)
    """

    name = "layerwise"

    def __init__(self, rows, grid, num_images, checkpoint="", img_size=None, extra=None, probes=None):
        self.rows = rows
        self.grid = tuple(grid) if grid else None
        self.num_images = num_images
        self.checkpoint = checkpoint
        self.img_size = img_size
        self.extra = extra or {}
        self.probes = dict(probes or {})
        self.replicates = {}   # {layer: {"row", "col", "r2": jackknife replicates}}, for paired comparisons

    @classmethod
    def from_probes(cls, probes, grid, num_images, label="", img_size=None):
        """Rows from ``{layer: fitted CoordinateProbe}`` (true task + control); the probes are kept
        without their streamed statistics (:meth:`~asg_probe.probes.CoordinateProbe.without_stats`)."""
        rows, replicates = [], {}
        for layer, probe in probes.items():
            row, replicates[int(layer)] = _row(layer, probe, grid)
            rows.append(row)
        kept = {layer: probe.without_stats() for layer, probe in probes.items()}
        result = cls(rows, grid, num_images, checkpoint=label, img_size=img_size, probes=kept,
                     extra={"interval": INTERVAL})
        result.replicates = replicates
        return result

    def add_init_baseline(self, init_probes) -> "LayerwiseResult":
        """Add ``r2_init``... and the learned gains from one ``{layer: fitted probe}`` per init seed
        (the same images and folds as this result's); see :func:`layerwise_probes`."""
        _init_rows(self.rows, self.replicates, init_probes)
        return self

    @classmethod
    def from_accumulator(cls, acc, *, label="", img_size=None):
        """The result of a :class:`LayerwiseAccumulator` that :func:`~asg_probe.extract.run_analyses` filled.

        Where layers have grids of their own (a grid backbone's stages), each row says its
        ``grid`` and ``stride`` (pixels per token); ``grid`` of the result is the first layer's."""
        grids = getattr(acc, "grids", {})
        first = grids[min(grids)] if grids else acc.grid
        result = cls.from_probes(acc.fitted(), first, acc.num_images, label=label, img_size=img_size)
        if len(set(grids.values())) > 1:
            side = img_size[0] if isinstance(img_size, (list, tuple)) else img_size
            result.add_column("grid", {layer: list(g) for layer, g in grids.items()})
            if side:
                result.add_column("stride", {layer: int(side) // g[0] for layer, g in grids.items()})
        return result

    def probe(self, layer) -> CoordinateProbe:
        """The fitted probe of ``layer`` (negative counts from the end), e.g. to predict on new tokens.

        Its ``cv_r2_`` are this table's ``r2_row``/``r2_col``, ``control_cv_r2_`` the first
        slot-control seed (the table averages the seeds); ``probe(layer).cv_results_`` holds every
        control column (``target_names``), and ``probe(layer).select([2, 3])`` is the first seed's
        slot-control probe.
        """
        if not self.probes:
            raise ValueError("this result carries no fitted probes (it was built from rows alone)")
        layers = sorted(self.probes)
        key = int(layer)
        if key < 0 and layers:
            key = layers[-1] + 1 + key
        if key not in self.probes:
            raise ValueError(f"no probe for layer {layer}: this result has layers {layers}")
        return self.probes[key]

    def add_column(self, name, values_by_layer):
        for row in self.rows:
            row[name] = values_by_layer.get(row["layer"])

    def to_dict(self):
        return {"checkpoint": self.checkpoint, "num_images": self.num_images, "img_size": self.img_size,
                "grid": list(self.grid) if self.grid else None, "layers": self.rows, **self.extra}

    def r2(self, column="r2"):
        """``(layers, values)`` numpy arrays of one column."""
        return (np.array([r["layer"] for r in self.rows]), np.array([r[column] for r in self.rows]))

    def plot(self, ax=None, label=None):
        """Row, column and mean R² per layer, control task dashed (row/column in their own colours,
        never a model's: :data:`~asg_probe.plotting.ROW_COLOR`, :data:`~asg_probe.plotting.COL_COLOR`)."""
        from ..plotting import COL_COLOR, ROW_COLOR, integer_ticks, new_figure

        if ax is None:
            fig, axes = new_figure(6.4, 3.4)
            ax = axes[0][0]
        fig = ax.figure
        layers, _ = self.r2()
        styles = [("r2_row", "row", "-", "o", ROW_COLOR), ("r2_col", "col", "-", "s", COL_COLOR),
                  ("r2", "mean", "-", None, "0.55"), ("r2_control", "slot control", "--", None, "0.55"),
                  ("r2_init", "random init", ":", None, "0.35")]
        styles = [s for s in styles if all(r.get(s[0]) is not None for r in self.rows)]   # init: when computed
        for col, name, ls, marker, color in styles:
            ax.plot(layers, self.r2(col)[1], ls=ls, marker=marker, ms=4, lw=2 if col == "r2" else 1.2, color=color,
                    label=f"{label + ' ' if label else ''}{name}")
        ax.set_xlabel("layer (0 = patch embedding)")
        ax.set_ylabel(f"held-out R² (split by image, {self.num_images} images)")
        low = min(float(np.nanmin(self.r2(c)[1])) for c, *_ in styles)
        ax.set_ylim(min(-0.05, low - 0.05), 1.02)
        integer_ticks(ax, layers)
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3)
        title = "Coordinate probes"
        if self.checkpoint:
            title += f" — {self.checkpoint}"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # over no curve
        fig.tight_layout()
        return fig

    def summary_line(self):
        last = self.rows[-1]
        best = max(self.rows, key=lambda r: r["r2"])
        init = f", random init {last['r2_init']:.2f}" if last.get("r2_init") is not None else ""
        return (f"last layer R² row/col {last['r2_row']:.2f}/{last['r2_col']:.2f} "
                f"(control {last['r2_control']:.2f}{init}); best layer {best['layer']} R² {best['r2']:.2f}; "
                f"{self.num_images} images")


def compare_layerwise(results, labels=None, column="r2", ax=None):
    """All models' R² curves on one axis, coloured by mechanism.

    Parameters
    ----------
    results : list of LayerwiseResult
    labels : list of str, optional
        Legend labels (default: each result's checkpoint); mechanism names pick the colour.
    """
    from ..plotting import display_name, integer_ticks, model_color, new_figure

    if ax is None:
        fig, axes = new_figure(5.6, 3.6)
        ax = axes[0][0]
    labels = labels or [r.checkpoint or f"model {i}" for i, r in enumerate(results)]
    all_layers = set()
    for res, label in zip(results, labels):
        layers, values = res.r2(column)
        all_layers.update(int(v) for v in layers)
        color = model_color(label)
        ax.plot(layers, values, marker="o", ms=3, color=color, label=display_name(label))
        ax.plot(layers, res.r2("r2_control")[1], ls=":", color=color, lw=0.8)
    ax.set_xlabel("layer (0 = patch embedding)")
    ax.set_ylabel(f"held-out {column.replace('r2', 'R²')}  (dotted: slot control)")
    integer_ticks(ax, sorted(all_layers))
    ax.axhline(0, color="k", lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # outside the curves
    ax.figure.tight_layout()
    return ax.figure


def probe_images(model, images, n_folds, *, num_images=64, img_size=None, batch_size=32, seed=0):
    """:class:`~asg_probe.inputs.ImageBatches` for a cross-validated probe: at least ``n_folds`` images.

    Raises :class:`~asg_probe.errors.UsageError` (one line) when there are fewer.
    """
    from ..errors import UsageError
    from ..inputs import ImageBatches

    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                batch_size=batch_size, seed=seed)
    if data.num_images < n_folds:
        raise UsageError(f"{data.num_images} images are too few for {n_folds}-fold cross-validation; "
                         f"use at least {n_folds} (--num-images)")
    return data


def init_baseline_probes(model, data, seeds, *, layers, n_folds=5, alphas=None, exact=True, tokens="pre_norm",
                         device="cpu", progress=False) -> list:
    """The random-initialisation baseline's probes: one ``{layer: fitted probe}`` per seed.

    Each seed's :func:`~asg_probe.reinit.reinitialised` copy of ``model`` is probed on ``data`` (the
    same :class:`~asg_probe.inputs.ImageBatches`, hence the same images and folds as the model's own
    probes), one forward pass each; hand the list to :meth:`LayerwiseResult.add_init_baseline`.
    """
    from ..extract import run_analyses
    from ..reinit import reinitialised

    out = []
    for s in seeds:
        fresh = reinitialised(model, s)
        base = InitBaselineAccumulator(n_folds=n_folds, alphas=alphas, exact=exact, norm=final_norm(fresh, tokens))
        (base,) = run_analyses(fresh, data, [base], layers=layers, device=device, progress=progress,
                               desc=f"random init {s}")
        out.append(base.fitted())
    return out


def layerwise_probes(model, images=None, *, num_images=64, img_size=None, batch_size=32, layers=None,
                     n_folds=5, control_seed=0, alphas=None, cell_accuracy=False, seed=0, device="cpu",
                     progress=True, label="", exact=True, checkpoint=None, n_control_seeds=N_CONTROL_SEEDS,
                     tokens="pre_norm", init_baseline=True, n_init_seeds=N_INIT_SEEDS, init_seed=0):
    """Fit cross-validated coordinate probes on every layer of ``model``.

    Parameters
    ----------
    model : nn.Module
        A timm-style ViT (``patch_embed``, ``blocks``), e.g. from :func:`asg_probe.load_checkpoint`.
    images : None, str, Path, ImageSet or tensor
        ``None`` uses the embedded photographs; a folder is searched recursively;
        a uint8 tensor ``(N, 3, H, W)`` is normalised with the model's mean/std; a
        float tensor is used as is.
    num_images, img_size, seed
        How many images, at which size (default: the model's), which deterministic crops.
    layers : list of int, optional
        Default: all, ``0..depth``.
    n_folds : int
        Cross-validation folds, split by image.
    control_seed : int
        First control seed: seed ``control_seed`` gives today's slot permutation
        (:func:`~asg_probe.probes.control_permutation`); seeds ``control_seed + 1, ...`` follow.
    n_control_seeds : int, default=5
        Slot-control permutations; ``r2_control`` is their mean (so it equals the
        single-permutation value of earlier versions only with ``n_control_seeds=1``),
        ``r2_control_std`` their spread.
    init_baseline : bool, default=True
        Also probe ``n_init_seeds`` freshly initialised copies of the model
        (:func:`asg_probe.reinit.reinitialised`, seeds ``init_seed, init_seed + 1, ...``) on the
        same images and folds: ``r2_init``, ``r2_row_init``, ``r2_col_init``, the learned gains
        ``r2_gain``, ``r2_row_gain``, ``r2_col_gain``, with intervals. Costs one forward pass per
        seed; ``False`` skips it (the fields are then absent).
    n_init_seeds, init_seed : int
        How many initialisations, and the first seed.
    tokens : {"pre_norm", "post_norm"}, default="pre_norm"
        Probe each layer's output as is, or after the model's final norm (:func:`~asg_probe.probes.final_norm`);
        pass the same to the MLP probe's tokens to compare linear and non-linear decoding.
    alphas : array-like, optional
        Ridge penalties searched (default :data:`asg_probe.probes.DEFAULT_ALPHAS`, extended
        past an end while a layer's CV R² still climbs towards it; a grid you pass is searched as given).
    cell_accuracy : bool
        Also report held-out per-cell classification accuracy (costs a second forward pass).
    exact : bool, default=True
        Accumulate every product in float64 (see :class:`~asg_probe.probes.RidgeStats`): results
        independent of batching and process count to rounding. ``False`` forms the Gram matrices
        in float32, about 5% faster overall on CPU, but R² moves by up to ~1e-3 (bundled ``ape`` model).
    batch_size, device, progress
        Images per forward pass, where the model runs, whether to show a progress bar.
    label : str
        Display name stored in the result (its JSON ``checkpoint`` field) and shown in plots.
    checkpoint : str, optional
        Deprecated alias of ``label``.

    Returns
    -------
    LayerwiseResult
        Rows per layer, and the fitted probes (:meth:`LayerwiseResult.probe`).

    Examples
    --------
    >>> import asg_probe
    >>> model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape")
    >>> res = asg_probe.layerwise_probes(model, num_images=10, progress=False)
    >>> res.to_frame().columns[:4].tolist()
    ['layer', 'r2_row', 'r2_col', 'r2']
    """
    from ..extract import run_analyses
    from ..inputs import display_label

    label = display_label(label, checkpoint)
    if init_baseline and int(n_init_seeds) < 1:
        raise ValueError(f"n_init_seeds must be >= 1 with init_baseline, got {n_init_seeds}")
    norm = final_norm(model, tokens)
    data = probe_images(model, images, n_folds, num_images=num_images, img_size=img_size, batch_size=batch_size,
                        seed=seed)
    acc = LayerwiseAccumulator(n_folds=n_folds, control_seed=control_seed, alphas=alphas, exact=exact,
                               n_control_seeds=n_control_seeds, norm=norm)
    (acc,) = run_analyses(model, data, [acc],
                          layers=layers, device=device, progress=progress, desc="layerwise")
    result = LayerwiseResult.from_accumulator(acc, label=label, img_size=data.img_size)
    if init_baseline:
        seeds = list(range(int(init_seed), int(init_seed) + int(n_init_seeds)))
        result.add_init_baseline(init_baseline_probes(model, data, seeds, layers=sorted(acc.probes), n_folds=n_folds,
                                                      alphas=alphas, exact=exact, tokens=tokens, device=device,
                                                      progress=progress))
        result.extra["init_seeds"] = seeds
    if cell_accuracy:
        (cells,) = run_analyses(model, data, [CellAccuracyAccumulator(acc.fitted(), acc.grid, norm)], layers=layers,
                                device=device, progress=progress, desc="cell accuracy")
        result.add_column("cell_accuracy", cells.accuracy())
    return result.record_inputs(data, device=device)


def _layer_reservoir(model, data, layer, targets, norm, *, max_tokens, seed, device):
    """One layer's tokens over ``data`` sampled into a :class:`~asg_probe.probes.TokenReservoir` (bounded memory)."""
    from ..extract import forward_tokens
    from ..probes import TokenReservoir

    model = model.to(device).eval()
    res = TokenReservoir(max_tokens, seed)
    for x, idx in data:
        tokens = forward_tokens(model, x.to(device), layers=[layer])[layer]
        if norm is not None:
            with torch.no_grad():
                tokens = norm(tokens)
        res.update(tokens, targets.to(tokens.device), idx)
    return res


def mlp_layer_probe(model, images=None, *, layer=-1, num_images=64, img_size=None, batch_size=32, seed=0,
                    tokens="pre_norm", n_control_seeds=N_CONTROL_SEEDS, control_seed=0, init_baseline=True,
                    n_init_seeds=N_INIT_SEEDS, init_seed=0, n_folds=5, device="cpu", **mlp_params) -> dict:
    """The MLP probe of one layer with the linear probe's controls: ``mlp_*`` fields (:func:`~asg_probe.probes.mlp_controls`).

    The same images, folds, tokens (``tokens``, as :func:`layerwise_probes`), slot-control
    permutations (``control_seed``, ``n_control_seeds``) and initialisations (``init_seed``,
    ``n_init_seeds``: :func:`asg_probe.reinit.reinitialised`) as the linear probe's, so that
    ``mlp_r2_control``, ``mlp_selectivity``, ``mlp_r2_init`` and ``mlp_r2_gain`` compare with
    ``r2_control``, ``selectivity``, ``r2_init`` and ``r2_gain``. One forward pass per model (one
    more per init seed) up to ``layer``; tokens are sampled into a bounded reservoir
    (:class:`~asg_probe.probes.MLPProbe`'s ``max_tokens``), so memory does not grow with the images.

    Parameters
    ----------
    layer : int, default=-1
        0 = patch embedding, ``i`` = output of block ``i``; negative counts from the last block.
    mlp_params
        :class:`~asg_probe.probes.MLPProbe` parameters (``hidden``, ``steps``, ``max_tokens``, ``seed``...).

    Examples
    --------
    >>> import asg_probe
    >>> model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    >>> out = mlp_layer_probe(model, torch.randn(10, 3, 32, 32), n_control_seeds=1, n_init_seeds=1, steps=20)
    >>> sorted(k for k in out if k.endswith("_gain"))
    ['mlp_r2_col_gain', 'mlp_r2_gain', 'mlp_r2_row_gain']
    """
    from ..geometry import model_geometry, resolve_layers
    from ..probes import MLPProbe
    from ..reinit import reinitialised

    if init_baseline and int(n_init_seeds) < 1:
        raise ValueError(f"n_init_seeds must be >= 1 with init_baseline, got {n_init_seeds}")
    geo = model_geometry(model)
    (layer,) = resolve_layers([layer], geo.depth, first=geo.first_layer)
    params = {**MLPProbe().get_params(), "n_folds": n_folds, **mlp_params}
    data = probe_images(model, images, n_folds, num_images=num_images, img_size=img_size, batch_size=batch_size,
                        seed=seed)
    grid = tuple(geo.grid((1, 3, *data.img_size)))
    seeds = control_seeds(control_seed, n_control_seeds) if n_control_seeds else []
    targets = torch.cat([coordinate_targets(grid)] + ([slot_control_targets(grid, seeds)] if seeds else []), dim=1)

    def sample(m):
        return _layer_reservoir(m, data, layer, targets, final_norm(m, tokens), max_tokens=params["max_tokens"],
                                seed=params["seed"], device=device)

    inits = []
    if init_baseline:
        inits = [sample(reinitialised(model, s)) for s in range(int(init_seed), int(init_seed) + int(n_init_seeds))]
    out = mlp_controls(sample(model), len(seeds), inits, **params)
    return {"layer": layer, "num_images": data.num_images, **out}
