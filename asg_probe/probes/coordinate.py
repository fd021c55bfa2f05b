"""The linear coordinate probe every analysis uses: :class:`CoordinateProbe`.

A scikit-learn estimator (``fit``/``predict``/``score``, learned state ending in
``_``) that also streams: :meth:`~CoordinateProbe.partial_fit` adds a batch of
tokens with their global image indices to the probe's :class:`~asg_probe.probes.RidgeStats`,
:meth:`~CoordinateProbe.all_reduce` sums them over ``torch.distributed`` ranks,
and :meth:`~CoordinateProbe.finalize` solves (:func:`~asg_probe.probes.solve_ridge_cv`).
An in-memory ``fit`` is the same stream over chunks of ``batch_size`` images, so
both routes give the same model.

Examples
--------
>>> import torch
>>> from asg_probe.probes import coordinate_targets
>>> g = torch.Generator().manual_seed(0)
>>> X = coordinate_targets((4, 5)) @ torch.randn(2, 8, generator=g) + 0.01 * torch.randn(10, 20, 8, generator=g)
>>> probe = CoordinateProbe(n_folds=5)
>>> for start in range(0, 10, 4):                     # batches of tokens, e.g. from a forward pass
...     _ = probe.partial_fit(X[start:start + 4], torch.arange(start, min(start + 4, 10)), grid=(4, 5))
>>> bool(probe.finalize().cv_r2_.min() > 0.99)
True
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin

from ..distributed import is_distributed
from ._inputs import as_features, as_index, as_tensor, dense_ids, prepare_targets
from .metrics import CellAccuracy, r2_columns
from .solver import METHODS, check_alphas, solve_ridge_cv
from .stats import RidgeStats
from .targets import TARGET_NAMES, check_grid, coordinate_targets, probe_targets, resolve_grid

__all__ = ["CoordinateProbe", "ONLINE_HEAD_BLOCKS"]

#: Head blocks of the online code (fold 0's images of rank 0, 1, 2-3, ..., 16-31): the first block
#: sent uniformly is one image, as Voita & Titov's first block is a small fraction of the data.
ONLINE_HEAD_BLOCKS = 6


class CoordinateProbe(RegressorMixin, BaseEstimator):
    """Ridge probe from patch tokens to normalised (row, col), alpha chosen by image-level CV.

    See :func:`~asg_probe.probes.solve_ridge_cv` for the standardisation, R² and
    alpha-selection rules. Three ways to fit, all giving the same model:

    * ``fit(X)`` on tokens in memory, ``(n_images, N, D)`` (or loose tokens with ``y`` and ``groups``);
    * ``partial_fit(tokens, image_index, grid=...)`` per batch, then ``finalize()``
      (``all_reduce()`` first under torchrun);
    * ``fit_stats(stats)`` on a :class:`~asg_probe.probes.RidgeStats` filled elsewhere.

    Parameters
    ----------
    alphas : array-like, optional
        Ridge penalties searched; :data:`~asg_probe.probes.DEFAULT_ALPHAS` when None.
    extend_alphas : bool, default=True
        With the default grid (``alphas=None``), extend it past an end while a column's
        CV R² still climbs towards it (:func:`~asg_probe.probes.solve_ridge_cv` ``extend``);
        a grid you pass is searched as given, and a choice on its edge flagged in ``alpha_at_edge_``.
    n_folds : int, default=5
        Folds of the image-level split; image ``i`` (its global index, its rank among the
        sorted distinct ``groups``, or its position in ``X``) goes to fold ``i % n_folds``.
    control : bool, default=True
        Also fit the control task when targets come from the grid (``y=None``).
    control_seed : int, default=0
        Seed of :func:`~asg_probe.probes.control_permutation`.
    batch_size : int, default=64
        Images per chunk while ``fit`` streams ``X`` (caps the float64 copy).
    device : str or torch.device, optional
        Where statistics are accumulated; by default the device of the first tokens.
    exact : bool, default=True
        Float64 products throughout (see :class:`~asg_probe.probes.RidgeStats`).
    method : {"fast", "eigh"}, default="fast"
        Solver of :func:`~asg_probe.probes.solve_ridge_cv`.
    online_code : bool, default=False
        Also stream the first blocks of the online code (:mod:`asg_probe.probes.mdl`,
        :data:`ONLINE_HEAD_BLOCKS` of them; ``partial_fit`` and 3-D ``fit`` only), for
        :func:`~asg_probe.probes.online_code` on ``stats_``.

    Attributes
    ----------
    coef_ : ndarray (T, D)
        Weights in the original feature units, refit on all images.
    intercept_ : ndarray (T,)
    alpha_ : ndarray (T,)
        Chosen alpha per target column; ``alpha_at_edge_`` (T,) flags the ends of
        ``alphas_``, the grid finally searched.
    cv_r2_ : ndarray (T,)
        Held-out (cross-validated, split by image) R² per column.
    fold_coef_ : ndarray (F, T, D), fold_intercept_ : ndarray (F, T)
        The fold models at ``alpha_``: fold ``f``'s never saw an image with ``index % F == f``
        (:meth:`predict_heldout`).
    control_cv_r2_ : ndarray (2,) or None
        The same for the control task; ``selectivity_ = cv_r2_ - control_cv_r2_``.
    cell_accuracy_ : float or None
        Held-out exact-cell decoding accuracy (:class:`~asg_probe.probes.CellAccuracy`), when ``fit`` on a grid.
    cv_results_ : RidgeCVResult
        Everything the solve returned, control columns included.
    stats_ : RidgeStats
        The streamed statistics the probe was solved from (token-level ``fit`` included);
        :meth:`without_stats` drops them.
    target_names_ : tuple of str
    n_features_in_, n_images_ : int
    grid_ : (int, int) or None

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> coords = coordinate_targets((4, 6))
    >>> X = coords @ torch.randn(2, 16, generator=g) + 0.05 * torch.randn(12, 24, 16, generator=g)
    >>> probe = CoordinateProbe(n_folds=4).fit(X, grid=(4, 6))
    >>> probe.predict(X).shape
    torch.Size([12, 24, 2])
    >>> bool(probe.cv_r2_.min() > 0.95), bool(probe.control_cv_r2_.max() < 0.2)
    (True, True)
    >>> probe.select([2, 3]).target_names_      # the control task as a probe of its own
    ('control_row', 'control_col')
    """

    def __init__(self, *, alphas=None, n_folds=5, control=True, control_seed=0, batch_size=64,
                 device=None, exact=True, method="fast", extend_alphas=True, online_code=False):
        self.alphas = alphas
        self.extend_alphas = extend_alphas
        self.n_folds = n_folds
        self.control = control
        self.control_seed = control_seed
        self.batch_size = batch_size
        self.device = device
        self.exact = exact
        self.method = method
        self.online_code = online_code

    # ------------------------------------------------------------------ streaming

    def _check_params(self):
        if int(self.n_folds) < 2:
            raise ValueError(f"n_folds must be >= 2, got {self.n_folds}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        check_alphas(self.alphas)

    def _clear_fit(self):
        # learned attributes read after new data would describe the old fit: drop them
        for name in [k for k in vars(self) if k.endswith("_") and not k.startswith("_") and k != "stats_"]:
            delattr(self, name)

    def partial_fit(self, X, image_index, *, grid=None, y=None, target_names=None):
        """Add a batch of images to the streamed statistics (no solve; :meth:`finalize` solves).

        Parameters
        ----------
        X : tensor (B, N, D)
            Patch tokens of ``B`` images (prefix tokens removed), any device.
        image_index : int tensor (B,)
            Global index of each image in the data set; its fold is ``image_index % n_folds``,
            so the order and size of batches, and the number of processes, do not matter.
        grid : (int, int), optional
            Patch grid; inferred when ``N`` is a square. With ``y=None`` the targets are its
            coordinates (plus the control task when ``control``).
        y : tensor (N, T), (N,) or (B, N, T), or FactoredTargets, optional
            Other targets, e.g. per-image ones (:class:`~asg_probe.probes.FactoredTargets`: per-image
            targets that are a lookup of per-patch labels, streamed cheaper); the same layout on every call.
        target_names : sequence of str, optional
            Names of the ``y`` columns (first call only).

        Returns
        -------
        self
        """
        X = as_features(X, ndims=(3,))
        B, N, _ = X.shape
        first = getattr(self, "stats_", None) is None
        if first:
            self._check_params()
        elif getattr(self, "_reduced", False):
            raise ValueError("these statistics were already summed over processes (all_reduce): "
                             "start a new probe for new data")
        if y is None:
            fit_grid = resolve_grid(N, grid)
            targets = self._grid_targets(fit_grid, X.device)
            names = TARGET_NAMES if self.control else TARGET_NAMES[:2]
            y_1d = False
        else:
            fit_grid = None if grid is None else check_grid(grid)
            targets = prepare_targets(y, B, N, factored=True)
            names = None if target_names is None else tuple(target_names)
            y_1d = len(np.shape(y)) == 1  # 1-D targets predict 1-D, as in scikit-learn
        if first:
            self.stats_ = RidgeStats(n_folds=int(self.n_folds), device=self.device, target_names=names,
                                     exact=bool(self.exact),
                                     online_blocks=ONLINE_HEAD_BLOCKS if self.online_code else 0)
            self._stream = (fit_grid, y_1d)
        elif self._stream != (fit_grid, y_1d):
            raise ValueError(f"partial_fit got grid/targets {fit_grid}, 1-D={y_1d} after "
                             f"{self._stream[0]}, 1-D={self._stream[1]}: every batch must match")
        self._clear_fit()
        self.stats_.update(X, targets, image_index)
        return self

    def _grid_targets(self, grid, device):
        cache = getattr(self, "_targets", None)
        if cache is None or cache[0] != (grid, device):
            t = probe_targets(grid, control=bool(self.control), control_seed=self.control_seed, device=device)
            self._targets = cache = ((grid, device), t)
        return cache[1]

    def all_reduce(self, group=None):
        """Sum the streamed statistics over ``torch.distributed`` ranks (a no-op in one process).

        Call it once, after the last :meth:`partial_fit` and before :meth:`finalize`;
        a second call does nothing.
        """
        if getattr(self, "stats_", None) is None:
            raise ValueError("nothing to combine: call partial_fit first (every rank needs a batch)")
        if is_distributed() and not getattr(self, "_reduced", False):
            self.stats_.all_reduce(group)
            self._reduced = True
        return self

    def finalize(self):
        """Solve the streamed statistics: sets ``coef_``, ``cv_r2_`` and the other learned attributes.

        Returns
        -------
        self
        """
        if getattr(self, "stats_", None) is None:
            raise ValueError("nothing to solve: call partial_fit first")
        self._check_params()
        grid, y_1d = self._stream
        return self._fit_stats(self.stats_, grid, y_1d)

    # ------------------------------------------------------------------ in-memory fit

    def fit(self, X, y=None, groups=None, *, grid=None):
        """Fit on ``X`` (n_images, N, D), or on tokens ``X`` (n_tokens, D) with ``y`` and ``groups``.

        Parameters
        ----------
        X : array or tensor, (n_images, N, D) or (n_tokens, D)
        y : array or tensor, optional
            For 3-D ``X``: None (coordinates of ``grid``, plus control) or targets
            (N, T), (N,), (n_images, N, T). For 2-D ``X``: required, (n_tokens, T) or (n_tokens,).
        groups : array-like, optional
            Image label per image (3-D) or per token (2-D, required).
        grid : (int, int), optional
            Patch grid of 3-D ``X``; inferred when ``N`` is a square.
        """
        self._check_params()
        X = as_features(X)
        F, bs = int(self.n_folds), int(self.batch_size)
        self._clear_fit()
        self.__dict__.pop("stats_", None)
        self._reduced = False
        if X.ndim == 3:
            n_images, N, _ = X.shape
            ids = torch.arange(n_images) if groups is None else dense_ids(groups, n_images, "image")
            if y is None:
                grid = resolve_grid(N, grid)
            else:
                Y = prepare_targets(y, n_images, N, factored=True)
            self._check_images(int(ids.unique().numel()), F)
            for s in range(0, n_images, bs):
                part = None if y is None else (Y[s:s + bs] if Y.ndim == 3 else y)
                self.partial_fit(X[s:s + bs], ids[s:s + bs], grid=grid if y is None else None, y=part)
            self.finalize()
            if y is None:
                acc = CellAccuracy(self, grid)
                for s in range(0, n_images, bs):
                    acc.update(X[s:s + bs], ids[s:s + bs])
                self.cell_accuracy_ = acc.accuracy
                self.cell_accuracy_map_ = acc.accuracy_map()
            return self
        if y is None or groups is None:
            raise ValueError("2-D token input (n_tokens, D) needs both y and groups (the image of each token)")
        M = X.shape[0]
        Y = as_tensor(y)
        Y = Y[:, None] if Y.ndim == 1 else Y
        if Y.ndim != 2 or Y.shape[0] != M:
            raise ValueError(f"y must be (n_tokens, T) or (n_tokens,) with n_tokens={M}, got {tuple(Y.shape)}")
        ids = dense_ids(groups, M, "token")
        self._check_images(int(ids.max()) + 1, F)
        stats = RidgeStats(n_folds=F, device=self.device if self.device is not None else X.device,
                           exact=bool(self.exact))
        step = bs * 256  # tokens per chunk, about batch_size small images
        for s in range(0, M, step):
            stats.update_tokens(X[s:s + step], Y[s:s + step], ids[s:s + step])
        self._stream = (None, len(np.shape(y)) == 1)
        return self._fit_stats(stats, *self._stream)

    @staticmethod
    def _check_images(n_distinct: int, n_folds: int) -> None:
        if n_distinct < n_folds:
            raise ValueError(f"image-level {n_folds}-fold CV needs at least {n_folds} images, got {n_distinct}")

    def fit_stats(self, stats: RidgeStats, *, grid=None, columns=None, control_columns=None):
        """Set the learned attributes from statistics streamed elsewhere (no data pass).

        Columns named :data:`~asg_probe.probes.TARGET_NAMES` are split into the probe
        (row, col) and its control; any other layout is treated as plain targets unless
        ``columns``/``control_columns`` say otherwise. ``grid`` is only remembered as the
        default of :meth:`score`; ``cell_accuracy_`` stays None (it needs a second pass:
        :class:`~asg_probe.probes.CellAccuracy`).
        """
        if int(self.n_folds) != stats.n_folds:
            raise ValueError(f"the statistics have {stats.n_folds} folds but n_folds={self.n_folds}")
        self._check_params()
        return self._fit_stats(stats, None if grid is None else check_grid(grid), False, columns, control_columns)

    def _fit_stats(self, stats, grid, y_1d, columns=None, control_columns=None):
        res = solve_ridge_cv(stats, self.alphas, method=self.method,
                             extend=bool(self.extend_alphas) and self.alphas is None)
        self.stats_ = stats
        return self._set_fit(res, grid, y_1d, columns, control_columns)

    def _set_fit(self, res, grid, y_1d, columns=None, control_columns=None):
        names = res.target_names
        if columns is None:
            main, ctrl = ([0, 1], [2, 3]) if names == TARGET_NAMES else (list(range(len(names))), [])
        else:
            main, ctrl = [int(c) for c in columns], [int(c) for c in (control_columns or [])]
        for c in main + ctrl:
            if not 0 <= c < len(names):
                raise ValueError(f"column {c} does not exist: the solve has columns 0..{len(names) - 1} {names}")
        self.cv_results_ = res
        self.target_names_ = tuple(names[i] for i in main)
        self.coef_ = res.coef_[main]
        self.intercept_ = res.intercept_[main]
        self.alpha_ = res.alpha_[main]
        self.alpha_at_edge_ = res.alpha_at_edge[main]
        self.alphas_ = res.alphas
        self.cv_r2_ = res.cv_r2_[main]
        self.fold_coef_ = res.fold_coef_[:, main]
        self.fold_intercept_ = res.fold_intercept_[:, main]
        self.control_cv_r2_ = res.cv_r2_[ctrl] if ctrl else None
        self.control_alpha_ = res.alpha_[ctrl] if ctrl else None
        self.selectivity_ = self.cv_r2_ - self.control_cv_r2_ if ctrl else None
        self.n_features_in_ = int(res.coef_.shape[1])
        self.n_images_ = int(np.sum(res.n_images)) if res.n_images is not None else 0
        self.grid_ = grid
        self._y_1d = y_1d
        self.cell_accuracy_ = None
        self.cell_accuracy_map_ = None
        return self

    @classmethod
    def from_cv_results(cls, result, *, columns=None, control_columns=None, grid=None, **params):
        """A fitted probe from a :class:`~asg_probe.probes.RidgeCVResult`, on a subset of its columns.

        One solve fits every target column at once (they share ``X^T X``); this
        carves one task out of it, e.g. the shuffle test's original-position
        columns and its slot columns. ``params`` are the constructor's.
        """
        params.setdefault("n_folds", int(np.shape(result.fold_coef_)[0]))
        params.setdefault("alphas", result.alphas)
        probe = cls(**params)
        return probe._set_fit(result, None if grid is None else check_grid(grid), False, columns, control_columns)

    def select(self, columns, control_columns=None) -> "CoordinateProbe":
        """A fitted probe on other columns of the same solve (``cv_results_``), e.g. the control task.

        Examples
        --------
        >>> probe = CoordinateProbe(n_folds=2).fit(torch.randn(4, 9, 3), grid=(3, 3))
        >>> probe.select([2, 3]).coef_.shape
        (2, 3)
        """
        self._check_fitted()
        other = type(self)(**self.get_params())
        other._set_fit(self.cv_results_, self.grid_, False, columns, control_columns)
        if hasattr(self, "stats_"):
            other.stats_ = self.stats_
        return other

    def without_stats(self) -> "CoordinateProbe":
        """A shallow copy of this fitted probe without its streamed statistics (``stats_``).

        The statistics are ``n_folds x D x D`` float64 (24 MB for a ViT-B layer); a
        probe kept in a result for ``predict`` does not need them.
        """
        self._check_fitted()
        light = copy.copy(self)
        for name in ("stats_", "_targets"):
            light.__dict__.pop(name, None)
        return light

    # ------------------------------------------------------------------ using a fitted probe

    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit, finalize or fit_stats first")

    def _features_for(self, X):
        self._check_fitted()
        Xt = as_features(X)
        if Xt.shape[-1] != self.n_features_in_:
            raise ValueError(f"X has {Xt.shape[-1]} features, the probe was fit on {self.n_features_in_}")
        return Xt

    def predict(self, X):
        """Predicted targets, ``(..., T)`` for ``X (..., D)``; tensor in → tensor out (float64).

        For a probe fit on grid coordinates (``fit(X, grid=...)``, what every analysis does) the
        targets are **normalised**: ``(row / (grid_h - 1), col / (grid_w - 1))``, so 0 is the
        top row / left column and 1 the bottom / right one (values slightly outside ``[0, 1]``
        are possible: the probe is linear). Multiply by ``(grid_h - 1, grid_w - 1)`` for cells.

        Examples
        --------
        >>> X = torch.eye(9)[None].repeat(4, 1, 1)  # one-hot slot code: position is exact
        >>> probe = CoordinateProbe(n_folds=2, alphas=(1e-6,)).fit(X, grid=(3, 3))
        >>> probe.predict(X[0])[[0, 4, 8]].round(decimals=3)
        tensor([[0.0000, 0.0000],
                [0.5000, 0.5000],
                [1.0000, 1.0000]], dtype=torch.float64)
        """
        is_tensor = isinstance(X, torch.Tensor)
        Xt = self._features_for(X)
        W = torch.as_tensor(self.coef_, device=Xt.device)
        out = Xt.to(torch.float64) @ W.T + torch.as_tensor(self.intercept_, device=Xt.device)
        if getattr(self, "_y_1d", False):
            out = out[..., 0]
        return out if is_tensor else out.cpu().numpy()

    def predict_heldout(self, X, image_index):
        """Each image predicted by the fold model that never saw it: ``(B, N, T)`` float64.

        ``X`` (B, N, D) holds the images of global indices ``image_index`` (B,) the
        probe was fit on; short errors then mean position is decodable, not memorised.

        Examples
        --------
        >>> X = torch.randn(4, 9, 3)
        >>> probe = CoordinateProbe(n_folds=2).fit(X, grid=(3, 3))
        >>> probe.predict_heldout(X, torch.arange(4)).shape
        torch.Size([4, 9, 2])
        """
        Xt = self._features_for(X)
        if Xt.ndim != 3:
            raise ValueError(f"X must be (B, N, D) images, got shape {tuple(Xt.shape)}")
        fold = torch.remainder(as_index(image_index, Xt.shape[0]).cpu().long(), self.fold_coef_.shape[0])
        W = torch.as_tensor(self.fold_coef_)[fold].to(Xt.device)               # (B, T, D)
        b = torch.as_tensor(self.fold_intercept_)[fold].to(Xt.device)          # (B, T)
        return torch.einsum("bnd,btd->bnt", Xt.to(torch.float64), W) + b[:, None]

    def score(self, X, y=None, sample_weight=None, *, grid=None):
        """R² of the predictions, averaged over target columns (pooled over all tokens given).

        With 3-D ``X`` and ``y=None`` the targets are the true coordinates of
        ``grid`` (default: the fit grid if ``N`` matches, else a square grid).
        """
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported")
        Xt = self._features_for(X)
        if y is None:
            if Xt.ndim != 3:
                raise ValueError("score on 2-D token input needs y")
            N = Xt.shape[1]
            if grid is None and self.grid_ is not None and self.grid_[0] * self.grid_[1] == N:
                grid = self.grid_
            Y = coordinate_targets(resolve_grid(N, grid), dtype=torch.float64)
            Y = Y.expand(Xt.shape[0], N, 2)
        else:
            Y = as_tensor(y).to(torch.float64)
            if Xt.ndim == 3 and Y.ndim in (1, 2) and Y.shape[0] == Xt.shape[1]:
                Y = Y.expand(Xt.shape[0], *Y.shape)
        pred = torch.as_tensor(self.predict(Xt)).cpu()
        if Y.numel() != pred.numel():
            raise ValueError(f"y has shape {tuple(Y.shape)} but the probe predicts {tuple(pred.shape)}")
        width = 1 if getattr(self, "_y_1d", False) else pred.shape[-1]
        return float(r2_columns(Y.cpu().reshape(-1, width), pred.reshape(-1, width)).mean())

    def summary(self) -> dict:
        """Flat dict of the headline numbers (SPEC §4): R² row/col/mean, control, selectivity, cell accuracy."""
        self._check_fitted()
        out = {}
        for name, r2, a in zip(self.target_names_, self.cv_r2_, self.alpha_):
            out[f"r2_{name}"] = float(r2)
            out[f"alpha_{name}"] = float(a)
        out["r2_mean"] = float(np.mean(self.cv_r2_))
        if self.control_cv_r2_ is not None:
            out["control_r2_row"], out["control_r2_col"] = map(float, self.control_cv_r2_)
            out["control_r2_mean"] = float(np.mean(self.control_cv_r2_))
            out["selectivity"] = out["r2_mean"] - out["control_r2_mean"]
        if self.cell_accuracy_ is not None:
            out["cell_accuracy"] = float(self.cell_accuracy_)
        return out
