"""Coordinate probes: how linearly (and non-linearly) patch tokens encode their grid position.

One concern per module, so each is found by its name:

=================  ==========================================================================
``targets``        what is regressed: :func:`coordinate_targets` (normalised row, col; defined in
                   :mod:`asg_probe.layers.grid`), the slot control (:func:`control_permutation`),
                   :func:`probe_targets` stacking both, and
                   :class:`FactoredTargets` (per-image targets kept as shared columns + a label lookup)
``stats``          :class:`RidgeStats`, per-fold float64 sufficient statistics streamed from
                   batches of tokens (``fold = image_index % n_folds``), mergeable across processes
``solver``         :func:`solve_ridge_cv` → :class:`RidgeCVResult`: every fold and alpha from the
                   statistics alone; ``method="fast"`` or the ``"eigh"`` reference
``_lapack``        the solver's fast path (``dsytrd`` without the GIL, tridiagonal solves)
``metrics``        :class:`CellAccuracy` (held-out cell decoding), :func:`r2_columns`,
                   :func:`fold_interval` (t interval over CV folds: too narrow for CV R², kept for
                   quantities that are independent across folds)
``intervals``      :func:`jackknife_cv_r2`, :func:`jackknife_interval`: the 95% intervals of CV R²
                   that cover (delete-one-fold jackknife with refits)
``mdl``            :func:`online_code`: minimum description length (Voita & Titov's online code)
                   from the streamed statistics
``coordinate``     :class:`CoordinateProbe`, the estimator every analysis uses: ``fit``, or
                   ``partial_fit`` per batch + ``all_reduce`` + ``finalize``; ``predict``, ``score``
``tokens``         :func:`final_norm`: which tokens a probe reads (``TOKENS``: pre- or post-final-norm)
``reservoir``      :class:`TokenReservoir`, a bounded order-free token sample
``mlp``            :class:`MLPProbe`, a small non-linear probe on such a sample, and
                   :func:`mlp_controls`: the linear probe's controls for it (``mlp_*`` fields)
=================  ==========================================================================

Examples
--------
>>> import torch
>>> from asg_probe.probes import CoordinateProbe, coordinate_targets
>>> g = torch.Generator().manual_seed(0)
>>> coords = coordinate_targets((4, 5))                       # (20, 2)
>>> X = coords @ torch.randn(2, 8, generator=g) + 0.01 * torch.randn(10, 20, 8, generator=g)
>>> probe = CoordinateProbe(n_folds=5).fit(X, grid=(4, 5))
>>> bool(probe.cv_r2_.min() > 0.99)
True
"""
from .coordinate import ONLINE_HEAD_BLOCKS, CoordinateProbe
from .intervals import jackknife_cv_r2, jackknife_interval
from .mdl import online_code
from .metrics import CellAccuracy, fold_interval, r2_columns
from .mlp import MLPProbe, mlp_controls
from .reservoir import TokenReservoir
from .solver import DEFAULT_ALPHAS, METHODS, RidgeCVResult, solve_ridge_cv
from .stats import RidgeStats
from .tokens import TOKENS, final_norm
from .targets import (TARGET_NAMES, FactoredTargets, control_permutation, control_seeds, control_target_names,
                      coordinate_targets, probe_targets, slot_control_targets)

__all__ = [
    "DEFAULT_ALPHAS", "METHODS", "TARGET_NAMES", "coordinate_targets", "control_permutation", "probe_targets",
    "FactoredTargets", "control_seeds",
    "control_target_names", "slot_control_targets",
    "RidgeStats", "RidgeCVResult", "solve_ridge_cv", "CellAccuracy", "r2_columns", "fold_interval", "CoordinateProbe",
    "TokenReservoir", "MLPProbe", "mlp_controls", "TOKENS", "final_norm", "jackknife_cv_r2", "jackknife_interval", "online_code",
    "ONLINE_HEAD_BLOCKS",
]
