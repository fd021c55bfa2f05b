"""Streamed sufficient statistics of the ridge probes: :class:`RidgeStats`.

The linear probe never stores tokens. :class:`RidgeStats` accumulates, per
cross-validation fold, the float64 sums a least-squares problem needs (token
count, feature and target sums, ``X^T X``, ``X^T Y``, target sums of squares).
Memory is ``O(n_folds * D^2)`` whatever the number of images, and the statistics
of several processes add up (:meth:`RidgeStats.merge`, :meth:`RidgeStats.all_reduce`).

Folds are assigned by image, ``fold = image_index % n_folds``, so a token is
never scored by a model that saw another token of the same image, and the
statistics do not depend on batch size, batch order or the number of processes.
:func:`asg_probe.probes.solve_ridge_cv` turns them into a fitted, cross-validated probe.
"""
from __future__ import annotations

import torch

from ..distributed import all_reduce_sum, is_distributed
from ._inputs import as_features, as_index, as_tensor
from .targets import FactoredTargets

__all__ = ["RidgeStats"]


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


def _label_sums(rows: torch.Tensor, labels: torch.Tensor, n_labels: int):
    """Per-label sums of ``rows`` (M, D) and label counts: ``(seg (k, D), counts (k,), used)``.

    ``seg[j]`` sums the rows labelled ``j``, or labelled ``used[j]`` where there are more labels than
    rows (``used``: the labels present, else None), so the work is ``O(M D)`` whatever ``n_labels``.
    """
    used = None
    if n_labels > rows.shape[0]:
        used, labels = torch.unique(labels, return_inverse=True)
        n_labels = used.numel()
    seg = rows.new_zeros(n_labels, rows.shape[1]).index_add_(0, labels, rows)
    counts = torch.bincount(labels, minlength=n_labels).to(rows.dtype)
    return seg, counts, used


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
    online_blocks : int, default=0
        With ``k >= 2``, also keep the statistics of the first ``k`` blocks of the online code
        (:mod:`asg_probe.probes.mdl`) in :attr:`head`: fold 0's images of rank 0, 1, 2-3, 4-7, ...
        (:meth:`head_block`). Memory grows to ``O((n_folds + k) D^2)``, still independent of the
        number of images; at most ``2 ** (k - 1)`` images are accumulated twice. Filled by
        :meth:`update` only (loose tokens carry no image order).

    Notes
    -----
    Statistics are raw (uncentred) float64 sums; centring happens in
    :func:`solve_ridge_cv`. Float64 keeps the cancellation in
    ``X^T X - n mean mean^T`` harmless for ViT activations (magnitudes up to
    ~1e3, 1e7 tokens).

    Examples
    --------
    >>> from asg_probe.probes import probe_targets
    >>> stats = RidgeStats(n_folds=2)
    >>> X = torch.randn(4, 6, 3)                      # 4 images, 6 patches, D=3
    >>> stats.update(X, probe_targets((2, 3)), torch.arange(4))
    >>> stats.n.tolist(), stats.n_images.tolist()
    ([12.0, 12.0], [2, 2])
    """

    _STATS = ("n", "sum_x", "sum_y", "xtx", "xty", "sum_y2", "n_images")

    def __init__(self, n_folds: int = 5, n_features=None, n_targets=None, device=None,
                 target_names=None, exact: bool = True, online_blocks: int = 0):
        if int(n_folds) < 2:
            raise ValueError(f"n_folds must be >= 2, got {n_folds}")
        if int(online_blocks) != 0 and int(online_blocks) < 2:
            raise ValueError(f"online_blocks must be 0 (off) or >= 2, got {online_blocks}")
        self.n_folds = int(n_folds)
        self.exact = bool(exact)
        self.online_blocks = int(online_blocks)
        self.head = None
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
        if self.online_blocks:
            # the online code's first blocks (asg_probe.probes.mdl): fold 0's images of rank 0, 1, 2-3,
            # 4-7, ... (rank = image_index // n_folds), each block a "fold" of a second, small RidgeStats;
            # those images are also in fold 0, so at most 2 ** (online_blocks - 1) images are counted twice
            self.head = RidgeStats(n_folds=self.online_blocks, n_features=d, n_targets=t, device=device,
                                   target_names=self.target_names, exact=self.exact)

    @property
    def initialised(self) -> bool:
        return self.n_features is not None

    @property
    def xtx(self) -> torch.Tensor:
        """``X^T X`` per fold, (F, D, D) float64, symmetric."""
        if self._lower_stale:
            # updates only form the upper block triangle (5/8 of the products for 4
            # blocks); the lower blocks are copied from it when someone reads them
            # on the CPU through numpy (a view of the same memory): small copies, where torch's
            # intra-op threads cost more than the work on a busy machine
            xtx = self._xtx.numpy() if self._xtx.device.type == "cpu" else self._xtx
            for i, (a, b) in enumerate(self._blocks):
                for c, e in self._blocks[i + 1:]:
                    xtx[:, c:e, a:b] = xtx[:, a:b, c:e].swapaxes(-1, -2)
                # a diagonal block is formed whole, and its two triangles round differently
                block = xtx[:, a:b, a:b]
                block[...] = 0.5 * (block + block.swapaxes(-1, -2))
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
        Y : tensor (N, T) or (B, N, T), or FactoredTargets
            Targets, shared by every image or per image; per-image targets that are a lookup of
            per-patch labels (:class:`~asg_probe.probes.FactoredTargets`) cost ``O(N D)`` per image
            instead of ``O(N D T)`` on the CPU, with the same statistics up to rounding.
        image_index : long tensor (B,)
            Global index of each image in the data set; decides its fold.
        """
        X = as_features(X, ndims=(3,))
        B, N, D = X.shape
        factored = isinstance(Y, FactoredTargets)
        if factored:
            if tuple(Y.shape[:2]) != (B, N):
                raise ValueError(f"Y must be (N, T) or (B, N, T) with B={B}, N={N}, got factored targets "
                                 f"of shape {tuple(Y.shape)}")
        else:
            Y = as_tensor(Y, device=X.device)
            if Y.ndim == 1:
                Y = Y[:, None]
            if Y.ndim not in (2, 3) or Y.shape[-2] != N or (Y.ndim == 3 and Y.shape[0] != B):
                raise ValueError(f"Y must be (N, T) or (B, N, T) with B={B}, N={N}, got shape {tuple(Y.shape)}")
        idx = as_index(image_index, B)
        T = Y.shape[-1]
        self._ensure(D, T, X.device)
        dev = self.device
        if factored and dev.type != "cpu":
            # on a GPU one product per fold beats the scatter's extra kernels (and index_add_ is not
            # deterministic there)
            Y, factored = Y.dense().to(X.device), False
        idx = idx.detach().cpu().long()
        folds = torch.remainder(idx, self.n_folds)
        # consecutive indices (the usual batch) put every n_folds-th image in one fold: a strided
        # view, where other orders need a gathered copy
        consecutive = bool((idx.diff() == 1).all())
        if factored:
            Ts = Y.n_shared
            Yd = Y.shared.to(dev, torch.float64)           # (N, Ts) shared columns
            table = Y.table.to(dev, torch.float64)         # (K, T - Ts) lookup columns
            labels = Y.labels.to(dev)                      # (B, N)
        else:
            Yd = Y.to(dev, torch.float64)
            Ts = T if Yd.ndim == 2 else 0
        if Ts:
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
            rows = Xf3.reshape(-1, D).to(torch.float64) if Ts < T else None   # (b N, D) float64
            if Ts:
                # sum_b X_b^T Y = (sum_b X_b)^T Y: one (N, D) sum instead of b products (summed in
                # float64 where the per-image columns need the rows in float64 anyway)
                sums = col_sum if rows is None or not fast else rows.reshape(b, N, D).sum(0)
                self.xty[f, :, :Ts].addmm_(sums.T, Yd)
                self.sum_y[f, :Ts] += b * y_sum
                self.sum_y2[f, :Ts] += b * y2_sum
            if Ts == T:
                continue
            sel_dev = sel.to(dev) if isinstance(sel, torch.Tensor) else sel
            if factored:
                seg, counts, used = _label_sums(rows, labels[sel_dev].reshape(-1), table.shape[0])
                values = table if used is None else table[used]      # (k, T - Ts)
                # X^T Y = sum over labels of (sum of their rows)^T (their targets): O(b N D), not O(b N D T)
                self.xty[f, :, Ts:] += (values.T @ seg).T
                self.sum_y[f, Ts:] += counts @ values
                self.sum_y2[f, Ts:] += counts @ (values * values)
            else:
                Yf = Yd[sel_dev].reshape(-1, T)
                self.xty[f].addmm_(rows.T, Yf)
                self.sum_y[f] += Yf.sum(0)
                self.sum_y2[f] += (Yf * Yf).sum(0)
        if self.head is not None:
            self._update_head(X, Y, idx)

    def head_block(self, image_index) -> torch.Tensor:
        """Online-code head block of each image (long, like ``image_index``), -1 outside the head.

        Fold 0's image of rank ``r = image_index // n_folds`` is in block 0 for ``r = 0``, else
        ``floor(log2 r) + 1``, while that is below ``online_blocks``: blocks of 1, 1, 2, 4, ... images.
        """
        idx = torch.as_tensor(image_index).long()
        rank = torch.div(idx, self.n_folds, rounding_mode="floor")
        block = torch.where(rank > 0, torch.floor(torch.log2(rank.clamp_min(1).double())).long() + 1,
                            torch.zeros_like(rank))
        inside = (torch.remainder(idx, self.n_folds) == 0) & (block < self.online_blocks)
        return torch.where(inside, block, torch.full_like(block, -1))

    def _update_head(self, X, Y, idx) -> None:
        block = self.head_block(idx)
        sel = (block >= 0).nonzero().reshape(-1)
        if sel.numel() == 0:
            return
        if isinstance(Y, FactoredTargets) or Y.ndim == 3:
            Y = Y[sel.to(Y.labels.device if isinstance(Y, FactoredTargets) else Y.device)]
        self.head.update(X.index_select(0, sel.to(X.device)), Y, block[sel])

    def update_tokens(self, X, Y, image_index) -> None:
        """Add loose tokens: ``X`` (M, D), ``Y`` (M, T) or (M,), ``image_index`` (M,) per token.

        ``n_images`` is not counted on this path, because one image's tokens may be
        spread over several calls.
        """
        X = as_features(X, ndims=(2,))
        M, D = X.shape
        Y = as_tensor(Y, device=X.device)
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim != 2 or Y.shape[0] != M:
            raise ValueError(f"Y must be (M, T) or (M,) with M={M}, got shape {tuple(Y.shape)}")
        idx = as_index(image_index, M, "token")
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
        if self.head is not None and other.head is not None:
            self.head.merge(other.head)
        return self

    def all_reduce(self, group=None) -> "RidgeStats":
        """Sum the statistics over ``torch.distributed`` ranks; a no-op when not distributed.

        Every rank must have allocated its statistics (an update, or ``n_features``
        and ``n_targets`` at construction) so the buffers line up.
        """
        if not is_distributed():
            return self
        if not self.initialised:
            raise ValueError("all_reduce needs allocated statistics: pass n_features and n_targets "
                             "or call update first")
        all_reduce_sum(self._tensors(), group)
        if self.head is not None:
            self.head.all_reduce(group)
        return self

    def state_dict(self) -> dict:
        """Plain tensors and settings, e.g. for ``torch.save`` between processes."""
        state = {"n_folds": self.n_folds, "target_names": self.target_names, "online_blocks": self.online_blocks}
        if self.initialised:
            state.update({k: getattr(self, k).cpu() for k in self._STATS})
            if self.head is not None:
                state["head"] = self.head.state_dict()
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "RidgeStats":
        stats = cls(n_folds=state["n_folds"], target_names=state["target_names"], device=device,
                    online_blocks=state.get("online_blocks", 0))
        if "xty" in state:
            _, d, t = state["xty"].shape
            stats._allocate(d, t, stats.device or torch.device("cpu"))
            for k in cls._STATS:
                getattr(stats, k).copy_(state[k])
            if "head" in state:
                stats.head = cls.from_state_dict(state["head"], device=device)
        return stats

    def __repr__(self) -> str:
        if not self.initialised:
            return f"RidgeStats(n_folds={self.n_folds}, empty)"
        return (f"RidgeStats(n_folds={self.n_folds}, D={self.n_features}, T={self.n_targets}, "
                f"tokens={int(self.n.sum())}, images={int(self.n_images.sum())}, device={self.device})")


