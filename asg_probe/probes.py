"""Coordinate probes: how linearly (and non-linearly) patch tokens encode their grid position.

The linear probe never stores tokens. A :class:`RidgeStats` accumulator streams,
per cross-validation fold, the float64 sufficient statistics of a least-squares
problem (token count, feature and target sums, ``X^T X``, ``X^T Y``, target
sums of squares). :func:`solve_ridge_cv` then fits every fold and every alpha
from those sums alone, with one tridiagonalisation per fold. Memory is
``O(n_folds * D^2)`` whatever the number of images, and the statistics of several
processes add up (:meth:`RidgeStats.merge`, :meth:`RidgeStats.all_reduce`).

Folds are assigned by image, ``fold = image_index % n_folds``, so a token is
never scored by a model that saw another token of the same image, and the
result does not depend on batch size, batch order or the number of processes.

Targets follow SPEC §4: ``(row / (grid_h - 1), col / (grid_w - 1))`` in
``[0, 1]``, plus a Hewitt & Liang control task in which every patch slot takes the
coordinates of another slot under one fixed random permutation.

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
from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin

from asg_probe.layers.grid import coordinate_targets as _grid_coordinate_targets
from asg_probe.layers.grid import grid_coords

__all__ = [
    "DEFAULT_ALPHAS", "TARGET_NAMES", "coordinate_targets", "control_permutation", "probe_targets",
    "RidgeStats", "RidgeCVResult", "solve_ridge_cv", "CellAccuracy", "CoordinateProbe",
    "TokenReservoir", "MLPProbe",
]

#: Default ridge grid. Alpha is in units of standardised features summed over
#: training tokens (sklearn ``Ridge`` convention), so the grid reaches far enough
#: up to regularise ``D`` larger than the number of tokens.
DEFAULT_ALPHAS = np.logspace(-3, 6, 19)

#: Column names of :func:`probe_targets` with the control task.
TARGET_NAMES = ("row", "col", "control_row", "control_col")


# --------------------------------------------------------------------------- targets

def coordinate_targets(grid, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised ``(row, col)`` of every patch (validated grid); see :func:`asg_probe.layers.grid.coordinate_targets`.

    Examples
    --------
    >>> coordinate_targets((2, 3)).tolist()
    [[0.0, 0.0], [0.0, 0.5], [0.0, 1.0], [1.0, 0.0], [1.0, 0.5], [1.0, 1.0]]
    """
    return _grid_coordinate_targets(_check_grid(grid), device=device, dtype=dtype)


def control_permutation(num_patches: int, seed: int = 0) -> torch.Tensor:
    """Fixed random permutation of patch slots for the control task, ``(num_patches,)`` long.

    Control targets are ``coordinate_targets(grid)[perm]``: patch slot ``i`` is asked
    for the coordinates of slot ``perm[i]``, the same in every image (Hewitt & Liang, 2019).

    Examples
    --------
    >>> perm = control_permutation(6, seed=0)
    >>> sorted(perm.tolist())
    [0, 1, 2, 3, 4, 5]
    >>> torch.equal(perm, control_permutation(6, seed=0))
    True
    """
    if int(num_patches) < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(num_patches), generator=gen)


def probe_targets(grid, control: bool = True, control_seed: int = 0, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """Targets for one image: ``(N, 4)`` columns :data:`TARGET_NAMES`, or ``(N, 2)`` without control.

    Stacking true and control targets lets one ``X^T X`` serve both probes.

    Examples
    --------
    >>> probe_targets((3, 4)).shape
    torch.Size([12, 4])
    """
    true = coordinate_targets(grid, device=device, dtype=dtype)
    if not control:
        return true
    perm = control_permutation(true.shape[0], control_seed).to(true.device)
    return torch.cat([true, true[perm]], dim=1)


# --------------------------------------------------------------------------- validation helpers

def _check_grid(grid):
    try:
        gh, gw = int(grid[0]), int(grid[1])
    except (TypeError, IndexError, ValueError):
        raise ValueError(f"grid must be a pair (grid_h, grid_w), got {grid!r}") from None
    if gh < 1 or gw < 1:
        raise ValueError(f"grid sides must be >= 1, got {gh}x{gw}")
    return gh, gw


def _resolve_grid(num_patches: int, grid):
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"cannot infer a grid from {num_patches} patches (not a square); "
                             f"pass grid=(grid_h, grid_w)")
        return side, side
    gh, gw = _check_grid(grid)
    if gh * gw != num_patches:
        raise ValueError(f"grid {gh}x{gw} has {gh * gw} cells but X has {num_patches} patches per image")
    return gh, gw


def _as_tensor(a, name: str, device=None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if device is not None:
        t = t.to(device)
    return t


def _as_features(X, ndims=(2, 3)) -> torch.Tensor:
    t = _as_tensor(X, "X")
    if t.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"X must be {want} ((n_images, N, D) or (n_tokens, D)), got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise ValueError(f"X must hold real numbers, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"X is empty, shape {tuple(t.shape)}")
    return t


def _check_alphas(alphas) -> np.ndarray:
    a = np.atleast_1d(np.asarray(DEFAULT_ALPHAS if alphas is None else alphas, dtype=np.float64))
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"alphas must be a non-empty 1-D sequence of positive finite numbers, got {alphas!r}")
    return a


def _dense_ids(groups, expected_len: int, what: str) -> torch.Tensor:
    """Rank of each group label among the sorted distinct labels (0..G-1), as a long tensor.

    Ranking (rather than using integer labels as they are) keeps folds balanced
    whatever the labels look like, e.g. only even ids.
    """
    g = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != expected_len:
        raise ValueError(f"groups must be 1-D with one label per {what} ({expected_len}), got shape {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(tensors, group=None) -> None:
    # One flat buffer: a single collective instead of one per statistic.
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


# --------------------------------------------------------------------------- streamed statistics

def _tf32_matmul_enabled() -> bool:
    """Whether CUDA float32 matmuls may run in TF32, under the old and the new (torch >= 2.9) settings."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = getattr(matmul, "fp32_precision", None)
        if precision is None:
            return bool(matmul.allow_tf32)
        if precision == "none":  # inherits the global setting
            precision = getattr(torch.backends, "fp32_precision", "none")
        return precision == "tf32"
    except RuntimeError:  # torch refuses to answer when old and new settings were mixed: assume the worst
        return True


def _gram_blocks(d: int, block: int = 96) -> list:
    """Column ranges for a block-triangular Gram product: 4 blocks for ViT-S widths."""
    n = max(1, min(4, d // block))
    edges = [round(i * d / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


class RidgeStats:
    """Per-fold float64 sufficient statistics of a multi-target least-squares problem.

    For each fold ``f`` it holds ``n`` (tokens), ``sum_x`` (D), ``sum_y`` (T),
    ``xtx = X^T X`` (D, D), ``xty = X^T Y`` (D, T) and ``sum_y2`` (T), summed over
    the tokens of the images of that fold. An image's fold is
    ``image_index % n_folds`` with ``image_index`` its global index in the data
    set, so statistics do not depend on batching, order or process count.

    Parameters
    ----------
    n_folds : int, default=5
        Number of cross-validation folds (>= 2).
    n_features, n_targets : int, optional
        ``D`` and ``T``. Inferred from the first update when left out.
    device : torch.device or str, optional
        Where the statistics live; by default the device of the first update's ``X``.
    target_names : sequence of str, optional
        Names of the ``T`` target columns, e.g. :data:`TARGET_NAMES`.
    exact : bool, default=True
        Form every product in float64: the statistics are independent of batching,
        order and process count to rounding. ``exact=False`` takes a faster path for
        float32/16 tokens: each batch is centred on its own mean and its Gram matrix
        formed in float32 (the statistics cost about a third less on CPU), then added
        to the float64 sums. Its ~1e-6 relative error is amplified by the large
        weights of near-perfect, ill-conditioned fits: a layer-0 APE probe at R²
        0.9997 read 1.00001, and R² of the bundled models moved by up to 1.4e-3,
        so it is not the default. On a GPU the float64 path is also the faster one
        (fewer kernels), and the fast path falls back to it where CUDA matmuls may
        use TF32.

    Notes
    -----
    Statistics are raw (uncentred) float64 sums; centring happens in
    :func:`solve_ridge_cv`. Float64 keeps the cancellation in
    ``X^T X - n mean mean^T`` harmless for ViT activations (magnitudes up to
    ~1e3, 1e7 tokens).

    Examples
    --------
    >>> stats = RidgeStats(n_folds=2)
    >>> X = torch.randn(4, 6, 3)                      # 4 images, 6 patches, D=3
    >>> stats.update(X, probe_targets((2, 3)), torch.arange(4))
    >>> stats.n.tolist(), stats.n_images.tolist()
    ([12.0, 12.0], [2, 2])
    """

    _STATS = ("n", "sum_x", "sum_y", "xtx", "xty", "sum_y2", "n_images")

    def __init__(self, n_folds: int = 5, n_features=None, n_targets=None, device=None,
                 target_names=None, exact: bool = True):
        if int(n_folds) < 2:
            raise ValueError(f"n_folds must be >= 2, got {n_folds}")
        self.n_folds = int(n_folds)
        self.exact = bool(exact)
        self.device = None if device is None else torch.device(device)
        self.target_names = None if target_names is None else tuple(target_names)
        self.n_features = None
        self.n_targets = None
        if (n_features is None) != (n_targets is None):
            raise ValueError("pass both n_features and n_targets, or neither (inferred at the first update)")
        if n_features is not None:
            self._allocate(int(n_features), int(n_targets), self.device or torch.device("cpu"))

    def _allocate(self, d: int, t: int, device) -> None:
        if self.target_names is not None and len(self.target_names) != t:
            raise ValueError(f"{len(self.target_names)} target_names given for {t} target columns")
        f64 = dict(dtype=torch.float64, device=device)
        F = self.n_folds
        self.n_features, self.n_targets, self.device = d, t, torch.device(device)
        self.n = torch.zeros(F, **f64)
        self.sum_x = torch.zeros(F, d, **f64)
        self.sum_y = torch.zeros(F, t, **f64)
        self._xtx = torch.zeros(F, d, d, **f64)
        # on a GPU the products are cheap and kernel launches are not: one block
        self._blocks = _gram_blocks(d) if torch.device(device).type == "cpu" else [(0, d)]
        self._lower_stale = False
        self.xty = torch.zeros(F, d, t, **f64)
        self.sum_y2 = torch.zeros(F, t, **f64)
        # Counted by update() only: token-level updates cannot tell how many images they span.
        self.n_images = torch.zeros(F, dtype=torch.long, device=device)

    @property
    def initialised(self) -> bool:
        return self.n_features is not None

    @property
    def xtx(self) -> torch.Tensor:
        """``X^T X`` per fold, (F, D, D) float64, symmetric."""
        if self._lower_stale:
            # updates only form the upper block triangle (5/8 of the products for 4
            # blocks); the lower blocks are copied from it when someone reads them
            for i, (a, b) in enumerate(self._blocks):
                for c, e in self._blocks[i + 1:]:
                    self._xtx[:, c:e, a:b] = self._xtx[:, a:b, c:e].transpose(-1, -2)
                # a diagonal block is formed whole, and its two triangles round differently
                block = self._xtx[:, a:b, a:b]
                block.copy_(0.5 * (block + block.transpose(-1, -2)))
            self._lower_stale = False
        return self._xtx

    def _ensure(self, d: int, t: int, device) -> None:
        if not self.initialised:
            self._allocate(d, t, self.device or device)
        elif (d, t) != (self.n_features, self.n_targets):
            raise ValueError(f"update has D={d}, T={t} but the statistics hold "
                             f"D={self.n_features}, T={self.n_targets}")

    def update(self, X, Y, image_index) -> None:
        """Add a batch of images.

        Parameters
        ----------
        X : tensor (B, N, D)
            Patch tokens of ``B`` images (prefix tokens removed).
        Y : tensor (N, T) or (B, N, T)
            Targets, shared by every image or per image.
        image_index : long tensor (B,)
            Global index of each image in the data set; decides its fold.
        """
        X = _as_features(X, ndims=(3,))
        B, N, D = X.shape
        Y = _as_tensor(Y, "Y", device=X.device)
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim not in (2, 3) or Y.shape[-2] != N or (Y.ndim == 3 and Y.shape[0] != B):
            raise ValueError(f"Y must be (N, T) or (B, N, T) with B={B}, N={N}, got shape {tuple(Y.shape)}")
        idx = _as_tensor(image_index, "image_index").reshape(-1)
        if idx.numel() != B or idx.is_floating_point():
            raise ValueError(f"image_index must hold {B} integers (one per image), got {tuple(idx.shape)} "
                             f"of dtype {idx.dtype}")
        T = Y.shape[-1]
        self._ensure(D, T, X.device)
        dev = self.device
        idx = idx.detach().cpu().long()
        folds = torch.remainder(idx, self.n_folds)
        # consecutive indices (the usual batch) put every n_folds-th image in one fold: a strided
        # view, where other orders need a gathered copy
        consecutive = bool((idx.diff() == 1).all())
        Yd = Y.to(dev, torch.float64)
        shared = Yd.ndim == 2
        if shared:
            y_sum, y2_sum = Yd.sum(0), (Yd * Yd).sum(0)
        fast = self._fast(X)
        dtype = torch.float32 if fast else torch.float64
        for f in folds.unique().tolist():
            if consecutive:
                sel = slice(int((f - idx[0]) % self.n_folds), None, self.n_folds)
                Xf3 = X[sel]
            else:
                sel = (folds == f).nonzero().reshape(-1)
                Xf3 = X.index_select(0, sel.to(X.device))
            Xf3 = Xf3.to(dev, dtype)                                   # (b, N, D)
            b = Xf3.shape[0]
            # (N, D). On the fast path a float32 sum of the fold's few images: its rounding enters the
            # covariance only through the (small) gap between batch and overall means
            col_sum = Xf3.sum(0).to(torch.float64) if fast else Xf3.sum(0)
            self.n[f] += b * N
            self.n_images[f] += b
            self._add_gram(f, Xf3, fast, col_sum.sum(0))
            if shared:
                # sum_b X_b^T Y = (sum_b X_b)^T Y: one (N, D) sum instead of b products
                self.xty[f].addmm_(col_sum.T, Yd)
                self.sum_y[f] += b * y_sum
                self.sum_y2[f] += b * y2_sum
            else:
                Yf = Yd[sel.to(dev) if isinstance(sel, torch.Tensor) else sel].reshape(-1, T)
                self.xty[f].addmm_(Xf3.reshape(-1, D).T.to(torch.float64), Yf)
                self.sum_y[f] += Yf.sum(0)
                self.sum_y2[f] += (Yf * Yf).sum(0)

    def update_tokens(self, X, Y, image_index) -> None:
        """Add loose tokens: ``X`` (M, D), ``Y`` (M, T) or (M,), ``image_index`` (M,) per token.

        ``n_images`` is not counted on this path, because one image's tokens may be
        spread over several calls.
        """
        X = _as_features(X, ndims=(2,))
        M, D = X.shape
        Y = _as_tensor(Y, "Y", device=X.device)
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim != 2 or Y.shape[0] != M:
            raise ValueError(f"Y must be (M, T) or (M,) with M={M}, got shape {tuple(Y.shape)}")
        idx = _as_tensor(image_index, "image_index").reshape(-1)
        if idx.numel() != M or idx.is_floating_point():
            raise ValueError(f"image_index must hold {M} integers (one per token), got {tuple(idx.shape)}")
        T = Y.shape[1]
        self._ensure(D, T, X.device)
        dev = self.device
        folds = torch.remainder(idx.detach().cpu().long(), self.n_folds)
        fast = self._fast(X)
        for f in folds.unique().tolist():
            sel = (folds == f).nonzero().reshape(-1)
            Xf = X.index_select(0, sel.to(X.device)).to(dev, torch.float32 if fast else torch.float64)
            Yf = Y.index_select(0, sel.to(Y.device)).to(dev, torch.float64)
            self.n[f] += sel.numel()
            self._add_gram(f, Xf, fast)
            self.sum_y[f] += Yf.sum(0)
            self.xty[f].addmm_(Xf.T.to(torch.float64), Yf)
            self.sum_y2[f] += (Yf * Yf).sum(0)

    def _fast(self, X) -> bool:
        # Where the user let CUDA round float32 products to TF32 (~1e-3), the float32 Gram would
        # inherit it: take the float64 path there instead of touching their global setting.
        return (not self.exact and X.dtype in (torch.float32, torch.float16, torch.bfloat16)
                and not (X.is_cuda and _tf32_matmul_enabled()))

    def _add_gram(self, f: int, Xf: torch.Tensor, fast: bool, s=None) -> None:
        """Add ``Xf^T Xf`` and ``sum(Xf)`` of one fold's rows ``Xf (..., D)`` to the float64 sums.

        The fast path centres the rows on their float32 mean ``m`` and forms the
        Gram matrix of the centred rows in float32 (no cancellation: the large mean
        of ViT activations is removed first), then restores the raw sum exactly in
        float64: ``X^T X = Xc^T Xc + m (s - n m)^T + s m^T`` with ``s = sum(X)``
        (passed in when the caller has it). Only the upper block triangle of the
        product is formed (see :attr:`xtx`).
        """
        D = Xf.shape[-1]
        rows = Xf.numel() // D
        if s is None:
            s = Xf.reshape(-1, D).sum(0, dtype=torch.float64)
        self.sum_x[f] += s
        xtx = self._xtx[f]
        self._lower_stale = True
        if not fast:
            Xf = Xf.reshape(-1, D)
            for a, b in self._blocks:
                xtx[a:b, a:].addmm_(Xf[:, a:b].T, Xf[:, a:])
            return
        m = (s / rows).to(torch.float32)
        Xc = (Xf - m).reshape(-1, D)  # also gathers a strided view into one block
        m = m.to(torch.float64)
        for a, b in self._blocks:
            xtx[a:b, a:] += Xc[:, a:b].T @ Xc[:, a:]  # float32 product, added in float64
        xtx.addr_(m, s - rows * m)
        xtx.addr_(s, m)

    def _tensors(self):
        return [getattr(self, k) for k in self._STATS]

    def merge(self, other: "RidgeStats") -> "RidgeStats":
        """Add ``other``'s statistics into these (in place) and return ``self``."""
        if other.n_folds != self.n_folds:
            raise ValueError(f"cannot merge statistics with {other.n_folds} folds into {self.n_folds} folds")
        if not other.initialised:
            return self
        self._ensure(other.n_features, other.n_targets, other.device)
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine += theirs.to(mine.device)
        return self

    def all_reduce(self, group=None) -> "RidgeStats":
        """Sum the statistics over ``torch.distributed`` ranks; a no-op when not distributed.

        Every rank must have allocated its statistics (an update, or ``n_features``
        and ``n_targets`` at construction) so the buffers line up.
        """
        if not _dist_ready():
            return self
        if not self.initialised:
            raise ValueError("all_reduce needs allocated statistics: pass n_features and n_targets "
                             "or call update first")
        n_images = self.n_images.to(torch.float64)
        tensors = self._tensors()[:-1] + [n_images]
        _all_reduce_sum(tensors, group)
        self.n_images.copy_(n_images.round().long())
        return self

    def state_dict(self) -> dict:
        """Plain tensors and settings, e.g. for ``torch.save`` between processes."""
        state = {"n_folds": self.n_folds, "target_names": self.target_names}
        if self.initialised:
            state.update({k: getattr(self, k).cpu() for k in self._STATS})
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "RidgeStats":
        stats = cls(n_folds=state["n_folds"], target_names=state["target_names"], device=device)
        if "xty" in state:
            _, d, t = state["xty"].shape
            stats._allocate(d, t, stats.device or torch.device("cpu"))
            for k in cls._STATS:
                getattr(stats, k).copy_(state[k])
        return stats

    def __repr__(self) -> str:
        if not self.initialised:
            return f"RidgeStats(n_folds={self.n_folds}, empty)"
        return (f"RidgeStats(n_folds={self.n_folds}, D={self.n_features}, T={self.n_targets}, "
                f"tokens={int(self.n.sum())}, images={int(self.n_images.sum())}, device={self.device})")


# --------------------------------------------------------------------------- ridge solve

@dataclass
class RidgeCVResult:
    """Output of :func:`solve_ridge_cv`. Arrays are float64 numpy; ``T`` target columns.

    Attributes
    ----------
    alphas : (A,) the grid searched.
    fold_r2 : (F, A, T) held-out R² of each fold, alpha and column (NaN where a fold's target is constant).
    cv_r2_path : (A, T) mean of ``fold_r2`` over folds.
    alpha_ : (T,) alpha chosen per column; ``best_index`` its position in ``alphas``.
    cv_r2_ : (T,) cross-validated R² at ``alpha_`` (the held-out estimate to report).
    alpha_at_edge : (T,) True where ``alpha_`` is the smallest or largest alpha searched.
    coef_ : (T, D), intercept_ : (T,) refit on all folds at ``alpha_``, in the original feature units.
    fold_coef_ : (F, T, D), fold_intercept_ : (F, T) the models that scored each fold, at ``alpha_``.
    x_mean_, x_scale_ : (D,) mean and std of the features over all tokens (used by the refit).
    n_tokens, n_images : (F,) per fold.
    """

    alphas: np.ndarray
    target_names: tuple
    fold_r2: np.ndarray
    cv_r2_path: np.ndarray
    best_index: np.ndarray
    alpha_: np.ndarray
    cv_r2_: np.ndarray
    alpha_at_edge: np.ndarray
    coef_: np.ndarray
    intercept_: np.ndarray
    fold_coef_: np.ndarray
    fold_intercept_: np.ndarray
    x_mean_: np.ndarray
    x_scale_: np.ndarray
    n_tokens: np.ndarray
    n_images: np.ndarray = field(default=None)

    def predict(self, X) -> torch.Tensor:
        """``X (..., D) @ coef_.T + intercept_`` in float64 on ``X``'s device."""
        X = _as_tensor(X, "X")
        W = torch.as_tensor(self.coef_, device=X.device)
        b = torch.as_tensor(self.intercept_, device=X.device)
        return X.to(torch.float64) @ W.T + b


def _moments(n, sx, sy, G, H):
    """Means and centred (co)variances from raw sums."""
    mx, my = sx / n, sy / n
    C = G - n * torch.outer(mx, mx)
    C = 0.5 * (C + C.T)  # the subtraction can break exact symmetry, which the solvers assume
    Cxy = H - n * torch.outer(mx, my)
    return mx, my, C, Cxy


def _ridge_path(C: torch.Tensor, B: torch.Tensor, alphas, tridiagonal=None) -> torch.Tensor:
    """Solve ``(C + alpha I) W = B`` for every alpha: ``(D, A, T)`` float64 on the CPU.

    ``C`` (D, D) symmetric positive semi-definite, ``B`` (D, T). One Householder
    tridiagonalisation ``C = Q Tri Q^T`` (LAPACK ``dsytrd``) serves every alpha,
    each then costing a tridiagonal solve (``dgtsv``, partial pivoting) instead of a
    factorisation. That is about half the work of the eigendecomposition it
    replaces (no eigenvectors), and as stable: ``Q`` is orthogonal, and the solve
    pivots. ``C`` is overwritten; ``tridiagonal`` is :func:`_tridiagonalise`'s
    output for ``C`` when the caller already has it.
    """
    from scipy.linalg import lapack

    D, T = B.shape
    a = np.asarray(alphas, dtype=np.float64)
    A = a.size
    if D == 1:
        return (B / (C + torch.as_tensor(a)[:, None])).reshape(1, A, T)
    packed, diag, off, tau = tridiagonal if tridiagonal is not None else _tridiagonalise(C.numpy())
    reflectors = torch.from_numpy(packed)[1:, :-1]  # Q = H(1)...H(D-1), acting on rows 1..D-1
    tau = torch.from_numpy(tau)
    QtB = B.clone()
    QtB[1:] = torch.ormqr(reflectors, tau, B[1:], left=True, transpose=True)
    # all alphas as one block-diagonal tridiagonal system: couplings between blocks are 0
    sub = np.zeros((A, D))
    sub[:, :-1] = off
    sub = sub.reshape(-1)[:-1]
    rhs = np.tile(QtB.numpy(), (A, 1))
    *_, Y, info = lapack.dgtsv(sub, (diag[None, :] + a[:, None]).reshape(-1), sub.copy(), rhs,
                                overwrite_b=1)
    if info != 0:  # a shifted system singular in rounding (C + alpha I ~ 0 somewhere): clip and solve
        Y = _tridiagonal_path_eigen(diag, off, QtB.numpy(), a)
    W = torch.from_numpy(Y).reshape(A, D, T).permute(1, 0, 2).reshape(D, A * T).contiguous()
    W[1:] = torch.ormqr(reflectors, tau, W[1:], left=True, transpose=False)
    return W.reshape(D, A, T)


@functools.lru_cache(maxsize=None)
def _lapack_dsytrd():
    """scipy's ``dsytrd`` as a ctypes function, which releases the GIL while it runs (None if unavailable).

    The f2py wrapper in ``scipy.linalg.lapack`` holds the GIL, so threads cannot
    tridiagonalise several folds at once; the same LAPACK routine reached through
    ``scipy.linalg.cython_lapack``'s exported pointer (as numba does) can.
    """
    import ctypes

    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__["dsytrd"]
        get_name, get_pointer = ctypes.pythonapi.PyCapsule_GetName, ctypes.pythonapi.PyCapsule_GetPointer
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        address = get_pointer(capsule, get_name(capsule))
    except Exception:  # another scipy layout: the f2py wrapper still works, one fold at a time
        return None
    i, d = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_double)
    return ctypes.CFUNCTYPE(None, ctypes.c_char_p, i, d, i, d, d, d, d, i, i)(address)


def _tridiagonalise(C: np.ndarray):
    """``dsytrd`` (lower) of a symmetric float64 matrix, overwritten: ``(packed, diag, off, tau)``."""
    import ctypes

    from scipy.linalg import lapack

    dsytrd = _lapack_dsytrd()
    A = C.T  # symmetric: the C-ordered buffer read in Fortran order is the same matrix, no copy
    n = A.shape[0]
    if dsytrd is None or not (A.flags.f_contiguous and A.flags.writeable and A.dtype == np.float64):
        packed, diag, off, tau, info = lapack.dsytrd(A, lower=1, overwrite_a=1)
    else:
        diag, off, tau = np.empty(n), np.empty(n - 1), np.empty(n - 1)
        work = np.empty(32 * n)  # LAPACK's blocked sytrd wants n * block size
        dim, lwork, info = ctypes.c_int(n), ctypes.c_int(work.size), ctypes.c_int(0)
        ptr = ctypes.POINTER(ctypes.c_double)
        dsytrd(b"L", ctypes.byref(dim), A.ctypes.data_as(ptr), ctypes.byref(dim), diag.ctypes.data_as(ptr),
               off.ctypes.data_as(ptr), tau.ctypes.data_as(ptr), work.ctypes.data_as(ptr),
               ctypes.byref(lwork), ctypes.byref(info))
        packed, info = A, info.value
    if info != 0:
        raise RuntimeError(f"LAPACK dsytrd failed (info={info}) on a {n}x{n} covariance")
    return packed, diag, off, tau


def _tridiagonal_path_eigen(diag, off, B, alphas) -> np.ndarray:
    """``(Tri + alpha I)^{-1} B`` for every alpha through the eigenvectors of ``Tri``, eigenvalues clipped at 0.

    The fallback of :func:`_ridge_path`; returns (A * D, T) in the same layout as its solve.
    """
    from scipy.linalg import eigh_tridiagonal

    lam, U = eigh_tridiagonal(diag, off)
    lam = np.clip(lam, 0, None)  # a covariance is PSD: negative eigenvalues are rounding
    P = U.T @ B
    return (U @ (P[None] / (lam[None, :, None] + alphas[:, None, None]))).reshape(-1, B.shape[1])


def _standardised_paths(problems, alphas):
    """Ridge weights for every alpha on standardised features, for several problems.

    ``problems`` is a list of raw-sum tuples ``(n, sx, sy, G, H)`` (float64, CPU).
    Returns one ``(mx, my, scale, Ws)`` per problem, ``Ws`` (D, A, T) the weights on
    ``(x - mx) / scale``. Features whose variance is lost in rounding count as
    constant (scale 1, zero weight), so they cannot inject noise.
    """
    prepared = []
    for n, sx, sy, G, H in problems:
        mx, my, C, Cxy = _moments(n, sx, sy, G, H)
        var = torch.diagonal(C).clamp_min(0) / n
        second = torch.diagonal(G) / n
        constant = var <= 1e-12 * second.clamp_min(torch.finfo(torch.float64).tiny)
        scale = torch.where(constant, torch.ones_like(var), var.sqrt())
        keep = (~constant).to(torch.float64)
        Cs = (C / torch.outer(scale, scale) * torch.outer(keep, keep)).contiguous()
        prepared.append((mx, my, scale, Cs, Cxy / scale[:, None] * keep[:, None]))
    with _single_threaded_blas():
        if len(alphas) <= 4:  # a few alphas (the final refit): Cholesky per alpha is cheaper
            return [(mx, my, scale, _ridge_solve(Cs, B, alphas)) for mx, my, scale, Cs, B in prepared]
        # the folds' tridiagonalisations are independent and release the GIL: one thread each
        workers = min(len(prepared), os.cpu_count() or 1)
        if workers > 1 and prepared[0][3].shape[0] > 1:
            with ThreadPoolExecutor(workers) as pool:
                tridiagonals = list(pool.map(lambda p: _tridiagonalise(p[3].numpy()), prepared))
        else:
            tridiagonals = [None] * len(prepared)
        return [(mx, my, scale, _ridge_path(Cs, B, alphas, tri))
                for (mx, my, scale, Cs, B), tri in zip(prepared, tridiagonals)]


@functools.lru_cache(maxsize=None)
def _blas_controller():
    import scipy.linalg.lapack  # noqa: F401  (load scipy's OpenBLAS before looking for it)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _single_threaded_blas():
    """Keep numpy/scipy's OpenBLAS on one thread while we call it.

    ``dsytrd`` gains nothing from a second thread at these sizes, and OpenBLAS
    threads left spinning after a call take the cores from torch's own thread
    pool: on 2 cores that tripled the time of the torch operations around it.
    """
    return _blas_controller().limit(limits=1, user_api="blas")


def _ridge_solve(C: torch.Tensor, B: torch.Tensor, alphas) -> torch.Tensor:
    """:func:`_ridge_path` for a few alphas: one Cholesky factorisation each (cheaper than tridiagonalising)."""
    a = torch.as_tensor(np.asarray(alphas, dtype=np.float64))
    shifted = C[None] + a[:, None, None] * torch.eye(C.shape[0], dtype=C.dtype)
    L, info = torch.linalg.cholesky_ex(shifted)
    if bool(info.any()):  # not positive definite in rounding: the pivoting path copes
        return _ridge_path(C, B, alphas)
    return torch.cholesky_solve(B.expand(len(a), *B.shape), L).permute(1, 0, 2)


def solve_ridge_cv(stats: RidgeStats, alphas=None) -> RidgeCVResult:
    """Cross-validated ridge regression from streamed statistics, every fold and alpha at once.

    For each fold ``k``, the model is fit on the summed statistics of the other
    folds and scored on fold ``k``'s statistics alone, without predictions:

    * **Intercept** unpenalised: features and targets are centred on the training mean.
    * **Standardisation**: features are divided by their training-fold standard
      deviation (population, ``ddof=0``), so alpha does not depend on feature
      units. The loss is ``||y - b - Z w||² + alpha ||w||²`` on standardised ``Z``,
      summed over tokens, i.e. scikit-learn's ``StandardScaler`` + ``Ridge(alpha)``.
    * **All alphas at once**: one Householder tridiagonalisation of the standardised
      training covariance per fold (the folds in parallel threads), then one cheap
      tridiagonal solve per alpha; the final refit at the chosen alphas is a Cholesky
      solve. Works when D exceeds the number of tokens. Runs on the CPU in float64
      whatever the statistics' device.
    * **Held-out R²** per fold and column: ``1 - SSE / SST`` with SST around the
      held-out fold's *own* mean (as ``sklearn.metrics.r2_score`` on that fold),
      ``SSE = SST - 2 w·Cxy + w^T C w + m d²`` from the fold's centred statistics,
      ``d`` the offset between its mean target and the mean prediction. NaN where a
      fold's target is constant.
    * **CV R²** = mean over folds of the per-fold R² (NaN folds left out).
    * **Alpha** chosen *per target column* as the maximiser of CV R² (the largest
      alpha on ties); each column is an independent ridge problem, so this is
      exact. The final ``coef_`` / ``intercept_`` are refit on all folds.

    Parameters
    ----------
    stats : RidgeStats
    alphas : array-like, optional
        Positive penalties; :data:`DEFAULT_ALPHAS` by default.

    Returns
    -------
    RidgeCVResult

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> stats = RidgeStats(n_folds=3)
    >>> Y = coordinate_targets((3, 3))
    >>> X = Y @ torch.randn(2, 5, generator=g) + 0.01 * torch.randn(6, 9, 5, generator=g)
    >>> stats.update(X, Y, torch.arange(6))
    >>> res = solve_ridge_cv(stats)
    >>> bool(res.cv_r2_.min() > 0.99)
    True
    """
    alphas = _check_alphas(alphas)
    if not stats.initialised:
        raise ValueError("the statistics are empty: call update() before solving")
    F = stats.n_folds
    empty = (stats.n <= 0).nonzero().reshape(-1).tolist()
    if empty:
        raise ValueError(f"fold(s) {empty} received no tokens: need at least n_folds={F} images "
                         f"(fold = image_index % {F})")
    if not all(bool(torch.isfinite(t).all()) for t in stats._tensors()[:-1]):
        raise ValueError("the statistics contain NaN or inf: the features fed to update() were not finite")
    # the solve runs on the CPU in float64 (LAPACK); the statistics are O(F D^2), a cheap copy off a GPU
    n, sx, sy, G, H, sy2 = (t.cpu() for t in (stats.n, stats.sum_x, stats.sum_y, stats.xtx, stats.xty,
                                                stats.sum_y2))
    tot = [t.sum(0) for t in (n, sx, sy, G, H, sy2)]
    A, T = alphas.size, stats.n_targets
    fold_r2 = torch.empty(F, A, T, dtype=torch.float64)
    # every fold's training set is all the folds but k
    problems = [[t - t_k for t, t_k in zip(tot[:5], (n[k], sx[k], sy[k], G[k], H[k]))] for k in range(F)]
    fold_paths = _standardised_paths(problems, alphas)
    for k in range(F):
        mx, my, scale, Ws = fold_paths[k]
        W = Ws.reshape(Ws.shape[0], A * T)                              # (D, A*T): one product per fold
        m = n[k]
        hx, hy, Ch, Chy = _moments(m, sx[k], sy[k], G[k], H[k])
        sst = sy2[k] - m * hy * hy
        Ch_s = Ch / torch.outer(scale, scale)
        Chy_s = Chy / scale[:, None]
        # residual = (y - hy) - (z - hz)·w + d, with d the gap in means; cross terms vanish
        d = (hy - my)[None] - (((hx - mx) / scale) @ W).reshape(A, T)
        sse = (sst[None] - 2 * (Ws * Chy_s[:, None]).sum(0)
               + (W * (Ch_s @ W)).sum(0).reshape(A, T) + m * d * d)
        degenerate = sst <= 1e-12 * sy2[k].clamp_min(torch.finfo(torch.float64).tiny)
        r2 = 1 - sse / torch.where(degenerate, torch.ones_like(sst), sst)[None]
        fold_r2[k] = torch.where(degenerate[None], torch.full_like(r2, float("nan")), r2)
    fold_r2_np = fold_r2.numpy()
    valid = ~np.isnan(fold_r2_np)
    counts = valid.sum(0)
    path = np.where(counts > 0, np.where(valid, fold_r2_np, 0).sum(0) / np.maximum(counts, 1), np.nan)
    best = np.empty(T, dtype=np.int64)
    for t in range(T):
        col = path[:, t]
        if np.all(np.isnan(col)):
            best[t] = A - 1  # nothing to predict: the strongest penalty gives weights ~0
        else:
            best[t] = A - 1 - int(np.nanargmax(col[::-1]))
    cols = np.arange(T)

    def at_best(mx, my, scale, Ws, index):
        coef = Ws[:, torch.as_tensor(index), torch.as_tensor(cols)].T / scale[None]  # (T, D)
        return coef, my - coef @ mx

    fold_coef, fold_icpt = zip(*(at_best(*p, best) for p in fold_paths))
    # the final refit on all folds needs only the chosen alphas
    chosen, where = np.unique(best, return_inverse=True)
    final = _standardised_paths([tot[:5]], alphas[chosen])[0]
    coef, icpt = at_best(*final, where.reshape(-1))
    names = stats.target_names or tuple(f"y{i}" for i in range(T))
    return RidgeCVResult(
        alphas=alphas, target_names=names, fold_r2=fold_r2_np, cv_r2_path=path, best_index=best,
        alpha_=alphas[best], cv_r2_=path[best, cols], alpha_at_edge=(best == 0) | (best == A - 1),
        coef_=coef.numpy(), intercept_=icpt.numpy(),
        fold_coef_=torch.stack(fold_coef).numpy(), fold_intercept_=torch.stack(fold_icpt).numpy(),
        x_mean_=final[0].numpy(), x_scale_=final[2].numpy(),
        n_tokens=n.numpy(), n_images=stats.n_images.cpu().numpy())


# --------------------------------------------------------------------------- cell accuracy

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
    result : RidgeCVResult
        From :func:`solve_ridge_cv` on statistics accumulated with the same folds.
    grid : (int, int)
    columns : (int, int), default=(0, 1)
        Which target columns of ``result`` are the normalised row and column.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> Y = coordinate_targets((3, 4))
    >>> X = Y @ torch.randn(2, 6, generator=g) + 0.01 * torch.randn(8, 12, 6, generator=g)
    >>> stats = RidgeStats(n_folds=4); stats.update(X, Y, torch.arange(8))
    >>> acc = CellAccuracy(solve_ridge_cv(stats), (3, 4)); acc.update(X, torch.arange(8))
    >>> acc.accuracy
    1.0
    """

    def __init__(self, result: RidgeCVResult, grid, columns=(0, 1)):
        self.grid = _check_grid(grid)
        self.columns = tuple(int(c) for c in columns)
        self.n_folds = result.fold_coef_.shape[0]
        self._coef = torch.as_tensor(result.fold_coef_[:, self.columns, :])       # (F, 2, D)
        self._icpt = torch.as_tensor(result.fold_intercept_[:, self.columns])     # (F, 2)
        N = self.grid[0] * self.grid[1]
        self.correct = torch.zeros(self.n_folds, dtype=torch.float64)
        self.within_one = torch.zeros(self.n_folds, dtype=torch.float64)
        self.total = torch.zeros(self.n_folds, dtype=torch.float64)
        self.cell_correct = torch.zeros(N, dtype=torch.float64)
        self.cell_total = torch.zeros(N, dtype=torch.float64)

    def update(self, X, image_index) -> None:
        """Score a batch ``X`` (B, N, D) of images with global indices ``image_index`` (B,)."""
        X = _as_features(X, ndims=(3,))
        B, N, D = X.shape
        gh, gw = self.grid
        if N != gh * gw or D != self._coef.shape[-1]:
            raise ValueError(f"X must be (B, {gh * gw}, {self._coef.shape[-1]}) for grid {gh}x{gw}, "
                             f"got {tuple(X.shape)}")
        idx = _as_tensor(image_index, "image_index").reshape(-1)
        if idx.numel() != B or idx.is_floating_point():
            raise ValueError(f"image_index must hold {B} integers, got {tuple(idx.shape)}")
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
        for k in ("correct", "within_one", "total", "cell_correct", "cell_total"):
            getattr(self, k).add_(getattr(other, k))
        return self

    def all_reduce(self, group=None) -> "CellAccuracy":
        """Sum counts over ``torch.distributed`` ranks (no-op when not distributed)."""
        if _dist_ready():
            # counts live on the CPU; NCCL only reduces CUDA tensors
            nccl = torch.distributed.get_backend(group) == "nccl"
            dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            tensors = [getattr(self, k) for k in ("correct", "within_one", "total", "cell_correct", "cell_total")]
            moved = [t.to(dev) for t in tensors]
            _all_reduce_sum(moved, group)
            for t, m in zip(tensors, moved):
                t.copy_(m.cpu())
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


# --------------------------------------------------------------------------- estimator

def _prepare_targets(y, n_images: int, N: int) -> torch.Tensor:
    Y = _as_tensor(y, "y")
    if Y.ndim == 1 or (Y.ndim == 2 and Y.shape == (n_images, N) and N != n_images):
        Y = Y[..., None]
    ok = (Y.ndim == 2 and Y.shape[0] == N) or (Y.ndim == 3 and Y.shape[:2] == (n_images, N))
    if not ok:
        raise ValueError(f"y must be (N, T), (N,), (n_images, N, T) or (n_images, N) with "
                         f"n_images={n_images}, N={N}; got shape {tuple(Y.shape)}")
    return Y


class CoordinateProbe(RegressorMixin, BaseEstimator):
    """Ridge probe from patch tokens to normalised (row, col), alpha chosen by image-level CV.

    Built on :class:`RidgeStats` and :func:`solve_ridge_cv`: ``fit`` streams the
    data in chunks of ``batch_size`` images, so an in-memory fit and a streamed
    :meth:`fit_stats` give the same model. See :func:`solve_ridge_cv` for the
    standardisation, R² and alpha-selection rules.

    Parameters
    ----------
    alphas : array-like, optional
        Ridge penalties searched; :data:`DEFAULT_ALPHAS` when None.
    n_folds : int, default=5
        Folds of the image-level split; image ``i`` (its rank among the sorted
        distinct ``groups``, or its position in ``X``) goes to fold ``i % n_folds``.
    control : bool, default=True
        Also fit the control task when targets come from the grid (``y=None``).
    control_seed : int, default=0
        Seed of :func:`control_permutation`.
    batch_size : int, default=64
        Images per chunk while streaming ``X`` (caps the float64 copy).
    device : str or torch.device, optional
        Where statistics are accumulated; by default ``X``'s device.

    Attributes
    ----------
    coef_ : ndarray (T, D)
        Weights in the original feature units, refit on all images.
    intercept_ : ndarray (T,)
    alpha_ : ndarray (T,)
        Chosen alpha per target column.
    cv_r2_ : ndarray (T,)
        Held-out (cross-validated, split by image) R² per column.
    control_cv_r2_ : ndarray (2,) or None
        The same for the control task; ``selectivity_ = cv_r2_ - control_cv_r2_``.
    cell_accuracy_ : float or None
        Held-out exact-cell decoding accuracy (:class:`CellAccuracy`), when fit on a grid.
    cv_results_ : RidgeCVResult
        Everything :func:`solve_ridge_cv` returned, control columns included.
    target_names_ : tuple of str
    n_features_in_ : int
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
    """

    def __init__(self, *, alphas=None, n_folds=5, control=True, control_seed=0, batch_size=64,
                 device=None):
        self.alphas = alphas
        self.n_folds = n_folds
        self.control = control
        self.control_seed = control_seed
        self.batch_size = batch_size
        self.device = device

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
        if int(self.n_folds) < 2:
            raise ValueError(f"n_folds must be >= 2, got {self.n_folds}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        _check_alphas(self.alphas)
        X = _as_features(X)
        F, bs = int(self.n_folds), int(self.batch_size)
        device = self.device if self.device is not None else X.device
        # 1-D targets predict 1-D, as in scikit-learn
        y_1d = y is not None and len(np.shape(y)) == 1
        fit_grid = None
        if X.ndim == 3:
            n_images, N, _ = X.shape
            ids = torch.arange(n_images) if groups is None else _dense_ids(groups, n_images, "image")
            n_distinct = int(ids.unique().numel())
            if y is None:
                fit_grid = _resolve_grid(N, grid)
                Y = probe_targets(fit_grid, control=bool(self.control), control_seed=self.control_seed)
                names = TARGET_NAMES if self.control else TARGET_NAMES[:2]
            else:
                Y = _prepare_targets(y, n_images, N)
                names = None
            self._check_images(n_distinct, F)
            stats = RidgeStats(n_folds=F, device=device, target_names=names)
            for s in range(0, n_images, bs):
                Yb = Y[s:s + bs] if Y.ndim == 3 else Y
                stats.update(X[s:s + bs], Yb, ids[s:s + bs])
        else:
            if y is None or groups is None:
                raise ValueError("2-D token input (n_tokens, D) needs both y and groups (the image of each token)")
            M = X.shape[0]
            Y = _as_tensor(y, "y")
            Y = Y[:, None] if Y.ndim == 1 else Y
            if Y.ndim != 2 or Y.shape[0] != M:
                raise ValueError(f"y must be (n_tokens, T) or (n_tokens,) with n_tokens={M}, got {tuple(Y.shape)}")
            ids = _dense_ids(groups, M, "token")
            self._check_images(int(ids.max()) + 1, F)
            stats = RidgeStats(n_folds=F, device=device)
            step = bs * 256  # tokens per chunk, about batch_size small images
            for s in range(0, M, step):
                stats.update_tokens(X[s:s + step], Y[s:s + step], ids[s:s + step])
        self._fit_stats(stats, fit_grid, y_1d)
        if fit_grid is not None:
            acc = CellAccuracy(self.cv_results_, fit_grid)
            for s in range(0, X.shape[0], bs):
                acc.update(X[s:s + bs], ids[s:s + bs])
            self.cell_accuracy_ = acc.accuracy
            self.cell_accuracy_map_ = acc.accuracy_map()
        return self

    @staticmethod
    def _check_images(n_distinct: int, n_folds: int) -> None:
        if n_distinct < n_folds:
            raise ValueError(f"image-level {n_folds}-fold CV needs at least {n_folds} images, got {n_distinct}")

    def fit_stats(self, stats: RidgeStats, *, grid=None):
        """Set the learned attributes from streamed statistics (no data pass).

        Columns named :data:`TARGET_NAMES` are split into the probe (row, col) and
        its control; any other layout is treated as plain targets. ``grid`` is
        only remembered as the default of :meth:`score`; ``cell_accuracy_`` stays
        None (it needs a second pass: :class:`CellAccuracy`).
        """
        return self._fit_stats(stats, None if grid is None else _check_grid(grid), False)

    def _fit_stats(self, stats, grid, y_1d):
        if int(self.n_folds) != stats.n_folds:
            raise ValueError(f"the statistics have {stats.n_folds} folds but n_folds={self.n_folds}")
        res = solve_ridge_cv(stats, self.alphas)
        names = res.target_names
        if names == TARGET_NAMES:
            main, ctrl = [0, 1], [2, 3]
        else:
            main, ctrl = list(range(len(names))), []
        self.cv_results_ = res
        self.target_names_ = tuple(names[i] for i in main)
        self.coef_ = res.coef_[main]
        self.intercept_ = res.intercept_[main]
        self.alpha_ = res.alpha_[main]
        self.cv_r2_ = res.cv_r2_[main]
        self.control_cv_r2_ = res.cv_r2_[ctrl] if ctrl else None
        self.control_alpha_ = res.alpha_[ctrl] if ctrl else None
        self.selectivity_ = self.cv_r2_ - self.control_cv_r2_ if ctrl else None
        self.n_features_in_ = int(stats.n_features)
        self.n_images_ = int(stats.n_images.sum())
        self.grid_ = grid
        self._y_1d = y_1d
        self.cell_accuracy_ = None
        self.cell_accuracy_map_ = None
        return self

    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit or fit_stats first")

    def predict(self, X):
        """Predicted targets, ``(..., T)`` for ``X (..., D)``; tensor in → tensor out (float64)."""
        self._check_fitted()
        is_tensor = isinstance(X, torch.Tensor)
        Xt = _as_features(X)
        if Xt.shape[-1] != self.n_features_in_:
            raise ValueError(f"X has {Xt.shape[-1]} features, the probe was fit on {self.n_features_in_}")
        W = torch.as_tensor(self.coef_, device=Xt.device)
        out = Xt.to(torch.float64) @ W.T + torch.as_tensor(self.intercept_, device=Xt.device)
        if getattr(self, "_y_1d", False):
            out = out[..., 0]
        return out if is_tensor else out.cpu().numpy()

    def score(self, X, y=None, sample_weight=None, *, grid=None):
        """R² of the predictions, averaged over target columns (pooled over all tokens given).

        With 3-D ``X`` and ``y=None`` the targets are the true coordinates of
        ``grid`` (default: the fit grid if ``N`` matches, else a square grid).
        """
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported")
        self._check_fitted()
        Xt = _as_features(X)
        if y is None:
            if Xt.ndim != 3:
                raise ValueError("score on 2-D token input needs y")
            N = Xt.shape[1]
            if grid is None and self.grid_ is not None and self.grid_[0] * self.grid_[1] == N:
                grid = self.grid_
            Y = coordinate_targets(_resolve_grid(N, grid), dtype=torch.float64)
            Y = Y.expand(Xt.shape[0], N, 2)
        else:
            Y = _as_tensor(y, "y").to(torch.float64)
            if Xt.ndim == 3 and Y.ndim in (1, 2) and Y.shape[0] == Xt.shape[1]:
                Y = Y.expand(Xt.shape[0], *Y.shape)
        pred = torch.as_tensor(self.predict(Xt)).cpu()
        if Y.numel() != pred.numel():
            raise ValueError(f"y has shape {tuple(Y.shape)} but the probe predicts {tuple(pred.shape)}")
        width = 1 if getattr(self, "_y_1d", False) else pred.shape[-1]
        return float(_r2_columns(Y.cpu().reshape(-1, width), pred.reshape(-1, width)).mean())

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


# --------------------------------------------------------------------------- non-linear probe

class TokenReservoir:
    """Bounded, order-independent sample of tokens for probes that need the tokens themselves.

    Every token gets a pseudo-random key from ``(seed, image_index, patch)``; the
    reservoir keeps the ``max_tokens`` smallest keys (bottom-k sampling). The
    sample is uniform over tokens, is the same whatever the batch order or size,
    and two reservoirs merge exactly. Memory: ``max_tokens * (D + T)`` floats.

    Examples
    --------
    >>> res = TokenReservoir(max_tokens=10)
    >>> res.update(torch.randn(4, 6, 3), coordinate_targets((2, 3)), torch.arange(4))
    >>> res.features.shape, res.targets.shape
    (torch.Size([10, 3]), torch.Size([10, 2]))
    """

    def __init__(self, max_tokens: int = 20000, seed: int = 0):
        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        self.features = self.targets = self.image_index = self.keys = None

    def _image_keys(self, image_index, N):
        rows = []
        for i in image_index.tolist():
            # a per-image stream keeps keys independent of which batch the image came in
            gen = torch.Generator().manual_seed((self.seed * 0x9E3779B97F4A7C15 + int(i)) % (2 ** 63))
            rows.append(torch.rand(N, generator=gen, dtype=torch.float64))
        return torch.stack(rows)

    def update(self, X, Y, image_index) -> None:
        """Offer a batch ``X`` (B, N, D) with targets ``Y`` (N, T) or (B, N, T)."""
        X = _as_features(X, ndims=(3,))
        B, N, D = X.shape
        Y = _as_tensor(Y, "Y", device=X.device)
        Y = Y[..., None] if Y.ndim == 1 else Y
        if Y.ndim == 2:
            Y = Y.expand(B, *Y.shape)
        if Y.shape[:2] != (B, N):
            raise ValueError(f"Y must be (N, T) or (B, N, T) with B={B}, N={N}, got {tuple(Y.shape)}")
        idx = _as_tensor(image_index, "image_index").reshape(-1).cpu().long()
        if idx.numel() != B:
            raise ValueError(f"image_index must hold {B} integers, got {idx.numel()}")
        keys = self._image_keys(idx, N).to(X.device)
        self._offer(X.reshape(-1, D), Y.reshape(B * N, -1), idx.to(X.device).repeat_interleave(N),
                    keys.reshape(-1))

    def _offer(self, X, Y, img, keys) -> None:
        X, Y = X.float(), Y.float()
        if self.keys is not None:
            X = torch.cat([self.features, X.to(self.features.device)])
            Y = torch.cat([self.targets, Y.to(self.features.device)])
            img = torch.cat([self.image_index, img.to(self.features.device)])
            keys = torch.cat([self.keys, keys.to(self.features.device)])
        if keys.numel() > self.max_tokens:
            keep = torch.topk(keys, self.max_tokens, largest=False).indices
            keep = keep.sort().values
            X, Y, img, keys = X[keep], Y[keep], img[keep], keys[keep]
        self.features, self.targets, self.image_index, self.keys = X, Y, img, keys

    def merge(self, other: "TokenReservoir") -> "TokenReservoir":
        if other.keys is not None:
            self._offer(other.features, other.targets, other.image_index, other.keys)
        return self


def _r2_columns(y: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
    sst = ((y - y.mean(0)) ** 2).sum(0)
    sse = ((y - pred) ** 2).sum(0)
    return (1 - sse / sst).double().cpu().numpy()


class MLPProbe(RegressorMixin, BaseEstimator):
    """Small non-linear probe (D → hidden → ReLU → T) on a bounded token sample, split by image.

    Tokens are sampled into a :class:`TokenReservoir`; images with
    ``image_index % n_folds == 0`` are held out for ``heldout_r2_`` and the rest
    train the MLP (one split, not full CV, to stay cheap; no refit on all
    images). Features are standardised with the training tokens' mean and std.
    MSE loss, AdamW, mini-batches.

    Parameters
    ----------
    hidden : int, default=64
    max_tokens : int, default=20000
        Reservoir size; the memory cap.
    n_folds : int, default=5
        ``1 / n_folds`` of the images are held out.
    steps : int, default=300
    lr : float, default=3e-3
    weight_decay : float, default=1e-4
    batch_size : int, default=1024
        Tokens per optimisation step.
    seed : int, default=0
    device : str or torch.device, optional

    Attributes
    ----------
    heldout_r2_ : ndarray (T,)
        R² per column on held-out images' tokens (SST around their own mean).
    model_ : torch.nn.Sequential
    n_features_in_ : int

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> c = coordinate_targets((4, 4))
    >>> X = torch.cat([torch.sin(3 * c), torch.cos(3 * c)], 1) @ torch.randn(4, 8, generator=g)
    >>> X = X + 0.01 * torch.randn(10, 16, 8, generator=g)
    >>> mlp = MLPProbe(steps=200).fit(X, grid=(4, 4))
    >>> bool(mlp.heldout_r2_.min() > 0.9)
    True
    """

    def __init__(self, *, hidden=64, max_tokens=20000, n_folds=5, steps=300, lr=3e-3, weight_decay=1e-4,
                 batch_size=1024, seed=0, device=None):
        self.hidden = hidden
        self.max_tokens = max_tokens
        self.n_folds = n_folds
        self.steps = steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def fit(self, X, y=None, groups=None, *, grid=None):
        """Same inputs as :meth:`CoordinateProbe.fit` (no control task)."""
        X = _as_features(X)
        res = TokenReservoir(self.max_tokens, self.seed)
        if X.ndim == 3:
            n_images, N, _ = X.shape
            ids = torch.arange(n_images) if groups is None else _dense_ids(groups, n_images, "image")
            Y = coordinate_targets(_resolve_grid(N, grid)) if y is None else _prepare_targets(y, n_images, N)
            for s in range(0, n_images, 64):
                res.update(X[s:s + 64], Y[s:s + 64] if Y.ndim == 3 else Y, ids[s:s + 64])
        else:
            if y is None or groups is None:
                raise ValueError("2-D token input (n_tokens, D) needs both y and groups (the image of each token)")
            Y = _as_tensor(y, "y")
            Y = Y[:, None] if Y.ndim == 1 else Y
            if Y.ndim != 2 or Y.shape[0] != X.shape[0]:
                raise ValueError(f"y must be (n_tokens, T) or (n_tokens,), got {tuple(Y.shape)}")
            ids = _dense_ids(groups, X.shape[0], "token")
            gen = torch.Generator().manual_seed(int(self.seed))
            res._offer(X, Y, ids, torch.rand(X.shape[0], generator=gen, dtype=torch.float64))
        return self.fit_reservoir(res)

    def fit_reservoir(self, reservoir: TokenReservoir):
        """Train on a filled :class:`TokenReservoir`."""
        if reservoir.keys is None:
            raise ValueError("the reservoir is empty: call update() first")
        F = int(self.n_folds)
        if F < 2:
            raise ValueError(f"n_folds must be >= 2, got {self.n_folds}")
        dev = torch.device(self.device) if self.device is not None else reservoir.features.device
        X = reservoir.features.to(dev)
        Y = reservoir.targets.to(dev)
        test = torch.remainder(reservoir.image_index.to(dev), F) == 0
        if test.all() or not test.any():
            raise ValueError(f"the held-out split needs images in fold 0 and in the other folds "
                             f"(image_index % {F}); sample more images")
        Xtr, Ytr = X[~test], Y[~test]
        self.x_mean_ = Xtr.mean(0)
        self.x_scale_ = Xtr.std(0, unbiased=False).clamp_min(1e-8)
        Ztr = (Xtr - self.x_mean_) / self.x_scale_
        D, T = X.shape[1], Y.shape[1]
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(int(self.seed))
            model = torch.nn.Sequential(torch.nn.Linear(D, int(self.hidden)), torch.nn.ReLU(),
                                        torch.nn.Linear(int(self.hidden), T)).to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
            bs = min(int(self.batch_size), Ztr.shape[0])
            for _ in range(int(self.steps)):
                pick = torch.randint(0, Ztr.shape[0], (bs,), device=dev)
                loss = torch.nn.functional.mse_loss(model(Ztr[pick]), Ytr[pick])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        self.model_ = model
        self.n_features_in_ = D
        with torch.no_grad():
            self.heldout_r2_ = _r2_columns(Y[test], model((X[test] - self.x_mean_) / self.x_scale_))
        return self

    def predict(self, X):
        """Predictions ``(..., T)`` for ``X (..., D)``; tensor in → tensor out."""
        if not hasattr(self, "model_"):
            raise ValueError("this MLPProbe is not fitted yet: call fit first")
        is_tensor = isinstance(X, torch.Tensor)
        Xt = _as_features(X)
        if Xt.shape[-1] != self.n_features_in_:
            raise ValueError(f"X has {Xt.shape[-1]} features, the probe was fit on {self.n_features_in_}")
        dev = self.x_mean_.device
        with torch.no_grad():
            out = self.model_((Xt.to(dev, torch.float32) - self.x_mean_) / self.x_scale_)
        return out if is_tensor else out.cpu().numpy()

    def score(self, X, y=None, sample_weight=None, *, grid=None):
        """Mean R² over columns; ``y=None`` with 3-D ``X`` scores the grid coordinates."""
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported")
        Xt = _as_features(X)
        pred = torch.as_tensor(self.predict(Xt)).cpu().double()
        if y is None:
            if Xt.ndim != 3:
                raise ValueError("score on 2-D token input needs y")
            Y = coordinate_targets(_resolve_grid(Xt.shape[1], grid), dtype=torch.float64).expand_as(pred)
        else:
            Y = _as_tensor(y, "y").double().cpu().reshape(pred.shape)
        return float(_r2_columns(Y.reshape(-1, pred.shape[-1]), pred.reshape(-1, pred.shape[-1])).mean())
