"""How good a probe is, beyond R²: held-out cell accuracy, and the R² helper the probes share.

:class:`CellAccuracy` is a second streaming pass: each image is scored by the
fold model that never saw it, and only counts are kept, so memory is flat and
counters of several processes add up.
"""
from __future__ import annotations

import numpy as np
import torch

from ..distributed import all_reduce_sum
from ..layers.grid import grid_coords
from ._inputs import as_features, as_index
from .targets import check_grid

__all__ = ["CellAccuracy", "r2_columns", "fold_interval"]


def fold_interval(values, level: float = 0.95) -> list:
    """``[lo, hi]`` Student-t interval of the mean of per-fold scores: ``mean ± t(1 - (1 - level)/2, k-1)·sd/√k``.

    ``values`` (k,) are the held-out scores of the ``k`` CV folds (NaN folds are left out;
    ``sd`` with ``ddof=1``). The folds share training images, so this interval is the usual
    CV approximation, not an exact coverage guarantee; with fewer than two valid folds it is
    ``[nan, nan]``.

    Examples
    --------
    >>> lo, hi = fold_interval([0.8, 0.9, 1.0])
    >>> round(lo, 4), round(hi, 4)
    (0.6516, 1.1484)
    """
    from scipy.stats import t as student_t

    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    if v.size < 2:
        return [float("nan"), float("nan")]
    half = float(student_t.ppf(0.5 + 0.5 * float(level), v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    mean = float(v.mean())
    return [mean - half, mean + half]


def r2_columns(y: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
    """R² of each column of ``pred`` (n, T) against ``y`` (n, T), SST around ``y``'s own mean.

    Examples
    --------
    >>> y = torch.tensor([[0.0], [1.0], [2.0]])
    >>> r2_columns(y, y).tolist(), r2_columns(y, torch.ones(3, 1)).tolist()
    ([1.0], [0.0])
    """
    sst = ((y - y.mean(0)) ** 2).sum(0)
    sse = ((y - pred) ** 2).sum(0)
    return (1 - sse / sst).double().cpu().numpy()


class CellAccuracy:
    """Held-out accuracy of decoding each patch's grid cell from the linear probe.

    A second streaming pass: every image is scored by the fold model that did not
    see it (``result.fold_coef_`` at the chosen alpha), its ``(row, col)``
    prediction is rounded to the nearest cell (clipped to the grid) and counted
    correct when both indices match. Only counts are kept, so memory is flat and
    counters from several processes add up. Accuracy is pooled over all tokens
    (each token is held out exactly once); chance is ``1 / N``.

    Parameters
    ----------
    result : RidgeCVResult or CoordinateProbe
        Anything with the fold models ``fold_coef_`` (F, T, D) and ``fold_intercept_``
        (F, T): a :func:`~asg_probe.probes.solve_ridge_cv` result or a fitted
        :class:`~asg_probe.probes.CoordinateProbe`, from statistics accumulated with
        the same folds.
    grid : (int, int)
    columns : (int, int), default=(0, 1)
        Which target columns of ``result`` are the normalised row and column.

    Examples
    --------
    >>> from asg_probe.probes import RidgeStats, coordinate_targets, solve_ridge_cv
    >>> g = torch.Generator().manual_seed(0)
    >>> Y = coordinate_targets((3, 4))
    >>> X = Y @ torch.randn(2, 6, generator=g) + 0.01 * torch.randn(8, 12, 6, generator=g)
    >>> stats = RidgeStats(n_folds=4); stats.update(X, Y, torch.arange(8))
    >>> acc = CellAccuracy(solve_ridge_cv(stats), (3, 4)); acc.update(X, torch.arange(8))
    >>> acc.accuracy
    1.0
    """

    _COUNTS = ("correct", "within_one", "total", "cell_correct", "cell_total")

    def __init__(self, result, grid, columns=(0, 1)):
        self.grid = check_grid(grid)
        self.columns = tuple(int(c) for c in columns)
        self.n_folds = result.fold_coef_.shape[0]
        self._coef = torch.as_tensor(np.asarray(result.fold_coef_)[:, self.columns, :])       # (F, 2, D)
        self._icpt = torch.as_tensor(np.asarray(result.fold_intercept_)[:, self.columns])     # (F, 2)
        N = self.grid[0] * self.grid[1]
        self.correct = torch.zeros(self.n_folds, dtype=torch.float64)
        self.within_one = torch.zeros(self.n_folds, dtype=torch.float64)
        self.total = torch.zeros(self.n_folds, dtype=torch.float64)
        self.cell_correct = torch.zeros(N, dtype=torch.float64)
        self.cell_total = torch.zeros(N, dtype=torch.float64)

    def update(self, X, image_index) -> None:
        """Score a batch ``X`` (B, N, D) of images with global indices ``image_index`` (B,)."""
        X = as_features(X, ndims=(3,))
        B, N, D = X.shape
        gh, gw = self.grid
        if N != gh * gw or D != self._coef.shape[-1]:
            raise ValueError(f"X must be (B, {gh * gw}, {self._coef.shape[-1]}) for grid {gh}x{gw}, "
                             f"got {tuple(X.shape)}")
        idx = as_index(image_index, B)
        dev = X.device
        true = grid_coords((gh, gw), device=dev, dtype=torch.float64)                 # (N, 2)
        top = torch.tensor([gh - 1, gw - 1], dtype=torch.float64, device=dev)
        folds = torch.remainder(idx.detach().cpu().long(), self.n_folds)
        for f in folds.unique().tolist():
            sel = (folds == f).nonzero().reshape(-1).to(dev)
            pred = X.index_select(0, sel).to(torch.float64) @ self._coef[f].to(dev).T + self._icpt[f].to(dev)
            cell = torch.minimum(torch.round(pred * top).clamp_min(0), top)             # (b, N, 2)
            err = (cell - true).abs()
            hit = (err.sum(-1) == 0).to(torch.float64)
            self.correct[f] += hit.sum().cpu()
            self.within_one[f] += (err.amax(-1) <= 1).sum().cpu().to(torch.float64)
            self.total[f] += hit.numel()
            self.cell_correct += hit.sum(0).cpu()
            self.cell_total += hit.shape[0]

    def merge(self, other: "CellAccuracy") -> "CellAccuracy":
        """Add ``other``'s counts into these (in place) and return ``self``."""
        for k in self._COUNTS:
            getattr(self, k).add_(getattr(other, k))
        return self

    def all_reduce(self, group=None) -> "CellAccuracy":
        """Sum counts over ``torch.distributed`` ranks (no-op when not distributed)."""
        all_reduce_sum([getattr(self, k) for k in self._COUNTS], group)
        return self

    @property
    def accuracy(self) -> float:
        """Fraction of held-out tokens whose exact cell is decoded."""
        return float(self.correct.sum() / self.total.sum().clamp_min(1))

    @property
    def accuracy_within_one(self) -> float:
        """Fraction decoded within one cell (Chebyshev distance <= 1)."""
        return float(self.within_one.sum() / self.total.sum().clamp_min(1))

    @property
    def chance(self) -> float:
        return 1.0 / (self.grid[0] * self.grid[1])

    def accuracy_map(self) -> np.ndarray:
        """Per-cell accuracy, ``(gh, gw)``; NaN for cells never scored."""
        acc = self.cell_correct / self.cell_total
        return acc.reshape(self.grid).numpy()


