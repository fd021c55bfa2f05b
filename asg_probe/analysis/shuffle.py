"""Content or injection? The patch-shuffle test.

Each image's patches are shuffled by a fixed random permutation
and, per layer, two probes are fit on the shuffled tokens (CV split by image):
one decodes the patch's **original** position (possible only from content, since
the content moved with the patch) and one decodes its **slot** (possible only
from what the model injects at that slot). A model without positional injection
is permutation-equivariant, so its slot R² stays at 0; a model with APE/RoPE/bias
can decode slots. Tokens of the unshuffled images come from the same forward call.

Whether a model injects position at all is the equivariance certificate's question
(:func:`asg_probe.analysis.equivariance.check_equivariance`).
"""
from __future__ import annotations

import torch

from ..probes import CoordinateProbe, coordinate_targets
from ..results import AnalysisResult
from .layerwise import LayerwiseAccumulator, ProbeAccumulator, probe_images

#: Target columns of the shuffled-token probes: the patch's original position, then its slot.
SHUFFLE_TARGETS = ("original_row", "original_col", "slot_row", "slot_col")


class ShuffleAccumulator(ProbeAccumulator):
    """Streaming probes on shuffled tokens, per layer, for (original position, slot) targets.

    One :class:`~asg_probe.probes.CoordinateProbe` per layer fits the four columns of
    :data:`SHUFFLE_TARGETS` at once (they share ``X^T X``); :meth:`fitted` splits each
    into an ``"original"`` and a ``"slot"`` probe.
    """

    view = "shuffled"

    def __init__(self, n_folds=5, shuffle_seed=0, alphas=None, exact=True, method="fast"):
        super().__init__(n_folds=n_folds, alphas=alphas, exact=exact, method=method)
        self.shuffle_seed = shuffle_seed

    def _new_probe(self) -> CoordinateProbe:
        return super()._new_probe().set_params(control=False)

    def _targets(self, batch):
        coords = coordinate_targets(tuple(batch.grid), device=batch.perm.device)  # (N, 2)
        original = coords[batch.perm]                                             # (B, N, 2)
        slot = coords.expand_as(original)
        return torch.cat([original, slot], dim=-1), SHUFFLE_TARGETS                # (B, N, 4)

    def _solved(self, probe):
        return {"original": probe.select([0, 1]), "slot": probe.select([2, 3])}

    def fitted(self) -> dict:
        """``{layer: {"original": CoordinateProbe, "slot": CoordinateProbe}}``, solved once."""
        return super().fitted()


class ShuffleResult(AnalysisResult):
    """Per layer: R² of original position and of slot on shuffled tokens, and unshuffled R².

    :meth:`probe` returns the fitted probes (``"original"``, ``"slot"``, ``"unshuffled"``).
    """

    name = "shuffle_test"

    def __init__(self, rows, grid, num_images, checkpoint="", probes=None):
        self.rows = rows
        self.grid = tuple(grid)
        self.num_images = num_images
        self.checkpoint = checkpoint
        self.probes = dict(probes or {})

    @classmethod
    def from_accumulators(cls, shuffled, unshuffled, *, label=""):
        """The result of a :class:`ShuffleAccumulator` and a :class:`~asg_probe.analysis.layerwise.LayerwiseAccumulator`
        filled by one :func:`~asg_probe.extract.run_analyses` pass over the same images."""
        plain = unshuffled.fitted()
        probes = {layer: {task: probe.without_stats() for task, probe in dict(tasks, unshuffled=plain[layer]).items()}
                  for layer, tasks in shuffled.fitted().items()}
        return cls(shuffle_rows(probes), shuffled.grid, shuffled.num_images, checkpoint=label, probes=probes)

    def probe(self, layer, task="original") -> CoordinateProbe:
        """A layer's fitted probe: ``task`` is ``"original"``, ``"slot"`` (on shuffled tokens) or ``"unshuffled"``."""
        layer = int(layer)
        if layer not in self.probes:
            raise ValueError(f"no probe for layer {layer}: this result has layers {sorted(self.probes)}")
        if task not in self.probes[layer]:
            raise ValueError(f"task must be one of {', '.join(self.probes[layer])}; got {task!r}")
        return self.probes[layer][task]

    @staticmethod
    def source(r2_original, r2_slot, threshold=0.2):
        """Where a layer's position comes from: 'content', 'injected', 'both' or 'none'."""
        content, injected = r2_original > threshold, r2_slot > threshold
        return {(True, True): "both", (True, False): "content", (False, True): "injected"}.get(
            (content, injected), "none")

    def to_dict(self):
        return {"checkpoint": self.checkpoint, "num_images": self.num_images, "grid": list(self.grid),
                "layers": self.rows}

    def plot(self, ax=None):
        import numpy as np

        from ..plotting import integer_ticks, new_figure

        if ax is None:
            fig, axes = new_figure(5.6, 3.4)
            ax = axes[0][0]
        layers = np.array([r["layer"] for r in self.rows])
        width = 0.27
        # greys and a hatch, not model colours: next to a comparison figure, blue would read as "ape"
        series = [("r2_unshuffled", "unshuffled", "#d9d9d9", ""), ("r2_original", "shuffled → original position",
                                                                   "#404040", ""),
                  ("r2_slot", "shuffled → slot", "white", "////")]
        for i, (key, label, color, hatch) in enumerate(series):
            ax.bar(layers + (i - 1) * width, [r[key] for r in self.rows], width, label=label, color=color,
                   hatch=hatch, edgecolor="k", lw=0.5)
        ax.set_xlabel("layer (0 = patch embedding)")
        ax.set_ylabel("held-out R² (mean of row, col)")
        integer_ticks(ax, layers)
        ax.axhline(0, color="k", lw=0.5)
        low = min(min(r["r2_original"], r["r2_slot"], r["r2_unshuffled"]) for r in self.rows)
        ax.set_ylim(min(-0.05, low - 0.05), 1.02)
        ax.set_title(f"Content or injection?{' — ' + self.checkpoint if self.checkpoint else ''}", fontsize=9)
        ax.legend(fontsize=7)
        ax.figure.tight_layout()
        return ax.figure


def shuffle_test(model, images=None, *, num_images=64, img_size=None, batch_size=32, layers=None, n_folds=5,
                 seed=0, device="cpu", progress=True, label="", checkpoint=None):
    """Does each layer know the patch's original position (content) or its slot (injection)?

    Parameters
    ----------
    model : nn.Module
    images, num_images, img_size, batch_size, seed, device, progress
        As in :func:`asg_probe.layerwise_probes`; ``seed`` also seeds the per-image shuffles.
    layers : list of int, optional
        Default: all, ``0..depth``.
    n_folds : int
        Cross-validation folds, split by image.
    label : str
        Display name stored in the result (its JSON ``checkpoint`` field).
    checkpoint : str, optional
        Deprecated alias of ``label``.

    Returns
    -------
    ShuffleResult
        Columns ``r2_original``, ``r2_slot`` (shuffled images) and ``r2_unshuffled``
        (the ordinary probe on the same images), per layer, plus a ``source`` verdict;
        the fitted probes through :meth:`ShuffleResult.probe`.

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    >>> res = shuffle_test(m, torch.randn(10, 3, 32, 32), progress=False)
    >>> res.rows[0]["r2_slot"] < 0.05   # no injection: slots are not decodable
    True
    """
    from ..extract import run_analyses
    from ..inputs import display_label

    label = display_label(label, checkpoint)
    data = probe_images(model, images, n_folds, num_images=num_images, img_size=img_size, batch_size=batch_size,
                        seed=seed)
    plain, shuffled = run_analyses(model, data, [LayerwiseAccumulator(n_folds=n_folds, online_code=False),
                                                 ShuffleAccumulator(n_folds=n_folds, shuffle_seed=seed)],
                                   layers=layers, device=device, progress=progress, desc="shuffle test")
    return ShuffleResult.from_accumulators(shuffled, plain, label=label).record_inputs(data, device=device)


def shuffle_rows(probes):
    """Result rows from ``{layer: {"original", "slot", "unshuffled": fitted CoordinateProbe}}``."""
    rows = []
    for layer, tasks in probes.items():
        o_row, o_col = (float(v) for v in tasks["original"].cv_r2_)
        s_row, s_col = (float(v) for v in tasks["slot"].cv_r2_)
        r2_original, r2_slot = 0.5 * (o_row + o_col), 0.5 * (s_row + s_col)
        unshuffled = float(tasks["unshuffled"].cv_r2_.mean())
        rows.append({"layer": layer, "r2_unshuffled": unshuffled, "r2_original": r2_original, "r2_slot": r2_slot,
                     "r2_original_row": o_row, "r2_original_col": o_col, "r2_slot_row": s_row,
                     "r2_slot_col": s_col, "source": ShuffleResult.source(r2_original, r2_slot)})
    return rows
