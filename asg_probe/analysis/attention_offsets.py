"""Position in attention scores: the offset kernel of every head, and how much of the logits it explains.

Coordinate probes read position from tokens. Relative mechanisms (RoPE, ALiBi-2D, a
relative-position table, RMT's and SDT's decay) put it into the attention *scores*
and may leave the tokens position-free. This analysis reads the scores: for every
layer and head, over patch queries ``i`` and patch keys ``j`` of many images,

* the **offset kernel** ``K[Δrow, Δcol]``: the part of the attention logit
  ``ℓ_ij`` that depends on the offset ``(Δrow, Δcol) = key − query`` alone, a
  ``(2H − 1) × (2W − 1)`` map for an ``H × W`` patch grid;
* **offset_r2**: the share of the within-query variance of the logits that the
  offset alone explains, ``1 − Σ (c_ij − K̃_i[δ_ij])² / Σ c_ij²``, where
  ``c_ij = ℓ_ij − mean_j ℓ_ij`` is the logit centred per query (softmax ignores a
  query's constant) and ``K̃_i`` is the kernel centred over the offsets that query
  ``i`` sees;
* the mean attention **probability** per offset (prefix tokens left out and each
  query's patch weights renormalised, as in the attention-distance analysis).

The kernel is the least-squares fit of the model ``ℓ_ij = a_i + K[δ_ij]`` (a free
constant per query, one value per offset). It is not the plain mean of ``c_ij`` per
offset: a border query sees only some offsets, so its mean logit, and with it every
one of its centred logits, is shifted; the plain mean would count that shift as
unexplained, and even logits that are an exact function of the offset would score
below 1. The fit needs only per-offset sums of the centred logits ``S`` and their
total sum of squares: with one image's design ``G = diag(n) − Σ_i u_i u_iᵀ / N``
(``n`` pairs per offset, ``u_i`` the offsets query ``i`` sees), ``K = G⁺ S / m``
for ``m`` images and the explained sum of squares is ``Sᵀ G⁺ S / m``. A constant
added to ``K`` changes nothing; the kernel is reported with a count-weighted mean
of zero. Everything streams: per batch, per-offset sums and sums of squares; memory
is flat in the number of images, and torchrun processes combine by addition. The
fit is one pseudo-inverse of a ``K × K`` matrix, ``K = (2H − 1)(2W − 1)`` (729 for a
14 × 14 grid).

What it does not see: only the *additive*, content-independent part of the offset
dependence enters the kernel. RoPE rotates q and k by their positions, so its offset
effect multiplies content and can change sign with it; such a head can be shaped by
offset and still score low. The logits are read where each block calls attention
(:func:`asg_probe.capture.capture_attention` with ``logits=True``): exactly what the
softmax received, biases, masks and rotary embeddings included, in float32.

``offset_r2_nonself`` is the share of the variance left after the zero offset (a
token attending to itself, which a model without any position can tell apart from
the others) that the other offsets explain. Prefix tokens (class, registers) are
reported apart: ``prefix_mass``, the attention probability a patch query gives
them, and their logit relative to the query's mean patch logit.

Held-out score and intervals: ``offset_r2`` is fitted and scored on the same
pairs, so with few images it rises above 0 even where the logits do not depend on
the offset at all (about ``K / (images · N²)`` for ``K`` offsets, ``N`` patches).
Images are therefore also split into folds (``image_index % n_folds``, as the
coordinate probes do); ``offset_r2_heldout`` scores each fold with the kernel fitted
on the other folds, pooled over folds, and ``offset_r2_heldout_ci`` is the 95%
interval ``mean ± t·sd/√k`` of the per-fold held-out scores. Near 0 (or below)
means: no offset structure that generalises across images.

Control: with ``shuffle_patches=True`` the patches of every image are shuffled
(one fixed permutation per image) before the model sees them, and offsets are
those between *slots*. Whatever offset structure content brings (neighbouring
patches look alike) is gone; what remains is the offset structure the mechanism
itself puts into the scores. A model without positional injection keeps only its
zero-offset term there (``offset_r2_nonself`` near 0).
"""
from __future__ import annotations

import io

import torch

from ..extract import Accumulator
from ..results import AnalysisResult

__all__ = ["kernel_shape", "offset_index", "offset_counts", "offset_design", "offset_statistics",
           "AttentionOffsetsAccumulator", "AttentionOffsetsResult", "attention_offsets"]


def _grid(grid):
    gh, gw = (int(g) for g in grid)
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be two positive ints, got {grid!r}")
    return gh, gw


def kernel_shape(grid) -> tuple[int, int]:
    """``(2H − 1, 2W − 1)``: every offset between two patches of an ``H × W`` grid."""
    gh, gw = _grid(grid)
    return 2 * gh - 1, 2 * gw - 1


def offset_index(grid, device=None) -> torch.Tensor:
    """``(N, N)`` flat index into the ``(2H − 1) × (2W − 1)`` kernel of the offset key − query.

    Row-major patches; the offset ``(Δrow, Δcol)`` sits at ``[Δrow + H − 1, Δcol + W − 1]``.

    Examples
    --------
    >>> offset_index((1, 3)).tolist()   # offsets -2..2 along one row: index Δcol + 2
    [[2, 3, 4], [1, 2, 3], [0, 1, 2]]
    """
    gh, gw = _grid(grid)
    rows = torch.arange(gh, device=device).repeat_interleave(gw)
    cols = torch.arange(gw, device=device).repeat(gh)
    d_row = rows[None, :] - rows[:, None] + gh - 1   # key - query
    d_col = cols[None, :] - cols[:, None] + gw - 1
    return d_row * (2 * gw - 1) + d_col


def offset_counts(grid) -> torch.Tensor:
    """Number of (query, key) patch pairs per offset in one image, ``(K,)`` float64, ``K = (2H−1)(2W−1)``.

    Examples
    --------
    >>> offset_counts((2, 2)).reshape(3, 3).tolist()
    [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]
    """
    k = kernel_shape(grid)
    return torch.bincount(offset_index(grid).reshape(-1), minlength=k[0] * k[1]).double()


def offset_design(grid) -> torch.Tensor:
    """``XᵀX`` of the offset regression on per-query-centred logits, one image, ``(K, K)`` float64.

    ``diag(n) − Σ_i u_i u_iᵀ / N``: ``n`` pairs per offset, ``u_i`` the indicator of the
    offsets query ``i`` sees (each once: a query's keys all have distinct offsets).
    Singular along the constant vector (a constant added to the kernel changes no
    centred prediction).
    """
    gh, gw = _grid(grid)
    n = gh * gw
    k = kernel_shape(grid)
    seen = torch.zeros(n, k[0] * k[1], dtype=torch.float64)
    seen.scatter_(1, offset_index(grid), 1.0)
    return torch.diag(seen.sum(0)) - seen.T @ seen / n


def offset_statistics(probs, logits, grid, num_prefix_tokens):
    """Per-image sums of one batch, the streamed state of :class:`AttentionOffsetsAccumulator`.

    Parameters
    ----------
    probs : tensor (B, H, N_all, N_all)
        Attention probabilities, rows = queries, prefix tokens first.
    logits : tensor (B, H, N_all, N_all)
        What went into the softmax (or log-probabilities: equal up to one constant per query).
    grid : (int, int)
    num_prefix_tokens : int

    Returns
    -------
    dict of float64 CPU tensors
        ``logit_sum`` (B, H, K): per offset, the sum of the per-query-centred logits;
        ``logit_sq`` (B, H): their total sum of squares; ``prob_sum`` (B, H, K): per
        offset, the sum of the renormalised patch probabilities; ``prefix_mass``
        (B, H) and ``prefix_logit`` (B, H, P): summed over patch queries.

    Examples
    --------
    >>> logits = torch.zeros(1, 1, 4, 4)          # 2x2 grid, no prefix: every pair alike
    >>> s = offset_statistics(logits.softmax(-1), logits, (2, 2), 0)
    >>> float(s["logit_sq"]), s["prob_sum"].reshape(3, 3).tolist()
    (0.0, [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]])
    """
    if logits is None:
        raise ValueError("offset statistics need the attention logits: run with capture_attention(logits=True)")
    if logits.ndim != 4 or logits.shape != probs.shape or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"probs and logits must both be (B, H, N, N), got {tuple(probs.shape)} and "
                         f"{tuple(logits.shape)}")
    gh, gw = _grid(grid)
    p = int(num_prefix_tokens)
    n = gh * gw
    if logits.shape[-1] - p != n:
        raise ValueError(f"attention over {logits.shape[-1]} tokens does not match {p} prefix tokens + a "
                         f"{gh}x{gw} grid ({p + n} tokens)")
    B, H = logits.shape[:2]
    k = (2 * gh - 1) * (2 * gw - 1)
    # float32 unless given float64: a float64 copy of every map would double the one big
    # tensor here; each per-offset sum adds at most N terms.
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    patch = logits[:, :, p:, p:].to(work)
    if not bool(torch.isfinite(patch).all()):
        raise ValueError("some patch-to-patch attention logits are not finite (masked pairs, or a probability "
                         "that underflowed to 0 where only probabilities were seen): the offset kernel is "
                         "undefined for such a model")
    query_mean = patch.mean(-1, keepdim=True)
    centred = patch - query_mean
    index = offset_index((gh, gw), device=logits.device).reshape(-1)
    logit_sum = torch.zeros(B * H, k, dtype=work, device=logits.device).index_add_(
        1, index, centred.reshape(B * H, n * n))
    logit_sq = centred.pow(2).sum((-2, -1))
    a = probs[:, :, p:, p:].to(work)
    mass = a.sum(-1, keepdim=True)
    renorm = a / mass.clamp_min(torch.finfo(work).tiny)
    prob_sum = torch.zeros(B * H, k, dtype=work, device=logits.device).index_add_(
        1, index, renorm.reshape(B * H, n * n))
    out = {"logit_sum": logit_sum.view(B, H, k), "logit_sq": logit_sq,
           "prob_sum": prob_sum.view(B, H, k), "prefix_mass": (1.0 - mass[..., 0]).sum(-1),
           "prefix_logit": (logits[:, :, p:, :p].to(work) - query_mean).sum(2)}
    return {name: value.detach().double().cpu() for name, value in out.items()}


_SUMS = ("logit_sum", "logit_sq", "prob_sum", "prefix_mass", "prefix_logit")


class AttentionOffsetsAccumulator(Accumulator):
    """Streams per-layer offset statistics over batches (and torchrun processes).

    An :class:`~asg_probe.extract.Accumulator` that asks for the logits
    (``attention_logits = True``): its :meth:`attention` reducer turns each block's
    maps into per-image sums (:func:`offset_statistics`) as soon as the block has
    run, :meth:`update` adds them (in total and per fold of images), :meth:`all_reduce`
    sums over processes, :meth:`result` fits the kernels.

    Parameters
    ----------
    num_prefix_tokens : int
    n_folds : int, default=5
        Folds of images (``image_index % n_folds``) for the held-out score and its
        interval; 1 switches them off.

    Examples
    --------
    >>> acc = AttentionOffsetsAccumulator(num_prefix_tokens=0)
    >>> bias = -offset_index((3, 3)).float()          # any function of the offset
    >>> logits = bias.expand(5, 1, 9, 9)
    >>> acc.add({1: (logits.softmax(-1), logits)}, (3, 3), torch.arange(5))
    >>> res = acc.result()
    >>> round(res.r2[1][0], 6), round(res.r2_heldout[1][0], 6)
    (1.0, 1.0)
    """

    attention_logits = True

    def __init__(self, num_prefix_tokens, n_folds=5):
        n_folds = int(n_folds)
        if n_folds < 1:
            raise ValueError(f"n_folds must be 1 or more, got {n_folds}")
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.n_folds = n_folds
        self.sums = {}      # layer -> {name: tensor} summed over images
        self.folds = {}     # layer -> {"logit_sum" (F, H, K), "logit_sq" (F, H)} summed per fold
        self.fold_images = torch.zeros(n_folds, dtype=torch.float64)
        self.grid = None

    @property
    def num_images(self) -> int:
        return int(self.fold_images.sum().item())

    def attention(self, attn, grid, logits=None):
        """Reduce one block's maps to per-image sums at once (``run_analyses`` calls this)."""
        return offset_statistics(attn, logits, grid, self.num_prefix_tokens)

    def update(self, batch):
        """Add one :class:`~asg_probe.extract.ForwardBatch` (its ``attn`` holds reduced maps)."""
        self.add(batch.attn, batch.grid, batch.image_index)

    def add(self, stats_by_layer, grid, image_index):
        """Add one batch: ``{layer: (probs, logits)}`` as ``capture_attention(logits=True)``
        records them, or the dicts of :meth:`attention`; ``image_index`` (B,) global indices."""
        grid = _grid(grid)
        if self.grid is not None and grid != self.grid:
            raise ValueError(f"grid changed from {self.grid} to {grid}: use one accumulator per input size")
        self.grid = grid
        image_index = torch.as_tensor(image_index).reshape(-1).cpu()
        fold = torch.nn.functional.one_hot(image_index % self.n_folds, self.n_folds).double()  # (B, F)
        for layer, value in stats_by_layer.items():
            if isinstance(value, (tuple, list)):
                value = self.attention(value[0], grid, value[1])
            if value["logit_sum"].shape[0] != len(image_index):
                raise ValueError(f"layer {layer}: {value['logit_sum'].shape[0]} images of statistics for "
                                 f"{len(image_index)} image indices")
            mine = self.sums.setdefault(int(layer), {})
            for name in _SUMS:
                mine[name] = mine.get(name, 0) + value[name].sum(0)
            folds = self.folds.setdefault(int(layer), {})
            folds["logit_sum"] = folds.get("logit_sum", 0) + torch.einsum("bf,bhk->fhk", fold, value["logit_sum"])
            folds["logit_sq"] = folds.get("logit_sq", 0) + fold.T @ value["logit_sq"]
        if stats_by_layer:
            self.fold_images += fold.sum(0)

    def all_reduce(self, group=None):
        """Sum every statistic over torchrun processes (a process may have seen no batch)."""
        from ..distributed import all_gather_object, all_reduce_sum, rank_world

        if rank_world(group)[1] == 1:
            return
        # Shapes first (a process that saw no image has none), then one all-reduce of the sums.
        mine = {"grid": self.grid, "shapes": {layer: {name: tuple(t.shape) for name, t in sums.items()}
                                              for layer, sums in self.sums.items()}}
        grid, shapes = None, {}
        for part in all_gather_object(mine, group):
            if part["grid"] is not None:
                if grid is not None and tuple(part["grid"]) != grid:
                    raise ValueError(f"processes saw different grids: {grid} and {tuple(part['grid'])}")
                grid = tuple(part["grid"])
            shapes.update(part["shapes"])
        tensors = []
        for layer in sorted(shapes):
            sums = self.sums.setdefault(layer, {})
            for name in _SUMS:
                if not isinstance(sums.get(name), torch.Tensor):
                    sums[name] = torch.zeros(shapes[layer][name], dtype=torch.float64)
                tensors.append(sums[name])
            folds = self.folds.setdefault(layer, {})
            heads, k = shapes[layer]["logit_sum"]
            folds.setdefault("logit_sum", torch.zeros(self.n_folds, heads, k, dtype=torch.float64))
            folds.setdefault("logit_sq", torch.zeros(self.n_folds, heads, dtype=torch.float64))
            tensors += [folds["logit_sum"], folds["logit_sq"]]
        all_reduce_sum(tensors + [self.fold_images], group)
        self.grid = grid

    def result(self, label: str = "", **extra) -> "AttentionOffsetsResult":
        """Fit the kernels and R² from everything added (after :meth:`all_reduce`: all processes)."""
        from ..probes.metrics import fold_interval

        m = float(self.num_images)
        if not self.sums or m == 0:
            raise ValueError("no attention was recorded: nothing to summarise (no batch, or a model whose "
                             "blocks do not compute attention the timm way)")
        design = offset_design(self.grid)
        pinv = torch.linalg.pinv(design, hermitian=True)
        counts = offset_counts(self.grid)
        self_index = (self.grid[0] - 1) * (2 * self.grid[1] - 1) + self.grid[1] - 1
        shape = kernel_shape(self.grid)
        n_queries = m * self.grid[0] * self.grid[1]
        out = {key: {} for key in ("kernels", "prob_kernels", "r2", "r2_nonself", "layer_r2", "r2_heldout",
                                   "r2_heldout_ci", "layer_r2_heldout", "layer_r2_heldout_ci", "prefix_mass",
                                   "prefix_logit")}
        for layer in sorted(self.sums):
            s = self.sums[layer]
            S, Q = s["logit_sum"], s["logit_sq"]                       # (H, K), (H,)
            K = (S @ pinv) / m
            explained = (K * S).sum(-1)                                # Sᵀ G⁺ S / m, per head
            by_self = S[:, self_index] ** 2 / (design[self_index, self_index] * m)
            K = K - (K @ counts / counts.sum())[:, None]               # count-weighted mean 0
            out["kernels"][layer] = K.reshape(-1, *shape).numpy()
            out["prob_kernels"][layer] = (s["prob_sum"] / (counts * m)).reshape(-1, *shape).numpy()
            out["r2"][layer] = _ratio(explained, Q)
            out["r2_nonself"][layer] = _ratio(explained - by_self, Q - by_self)
            out["layer_r2"][layer] = _ratio(explained.sum(), Q.sum())
            out["prefix_mass"][layer] = (s["prefix_mass"] / n_queries).tolist()
            out["prefix_logit"][layer] = (s["prefix_logit"] / n_queries).numpy()
            resid, total = self._heldout(layer, pinv, design)          # (F, H) each, NaN for unusable folds
            if resid is not None:
                out["r2_heldout"][layer] = _ratio(total.nansum(0) - resid.nansum(0), total.nansum(0))
                out["layer_r2_heldout"][layer] = _ratio(total.nansum() - resid.nansum(), total.nansum())
                per_fold = 1 - resid / total
                out["r2_heldout_ci"][layer] = [fold_interval(per_fold[:, h].numpy()) for h in range(S.shape[0])]
                out["layer_r2_heldout_ci"][layer] = fold_interval((1 - resid.sum(1) / total.sum(1)).numpy())
        return AttentionOffsetsResult(grid=self.grid, num_prefix_tokens=self.num_prefix_tokens,
                                      num_images=self.num_images, n_folds=self.n_folds, checkpoint=label,
                                      **out, **extra)

    def _heldout(self, layer, pinv, design):
        """Per fold: residual and total sum of squares of its images under the other folds' kernel.

        ``Σ (c − X K)² = Q_f − 2 Kᵀ S_f + m_f Kᵀ G K``: sums only. Folds without images, or
        whose complement has none, are NaN.
        """
        folds = self.folds.get(layer)
        if self.n_folds < 2 or not folds:
            return None, None
        S_f, Q_f, m_f = folds["logit_sum"], folds["logit_sq"], self.fold_images
        S_rest, m_rest = S_f.sum(0) - S_f, (m_f.sum() - m_f)
        usable = (m_f > 0) & (m_rest > 0)
        if int(usable.sum()) < 2:
            return None, None
        K_rest = (S_rest @ pinv) / m_rest.clamp_min(1)[:, None, None]  # (F, H, K)
        resid = Q_f - 2 * (K_rest * S_f).sum(-1) + m_f[:, None] * torch.einsum("fhk,kl,fhl->fh", K_rest, design,
                                                                               K_rest)
        nan = torch.full_like(resid, float("nan"))
        return torch.where(usable[:, None], resid, nan), torch.where(usable[:, None], Q_f, nan)


def _float(x) -> float:
    """A JSON number back to float: ``None`` (how NaN is written) is NaN."""
    return float("nan") if x is None else float(x)


def _ratio(num, den):
    """``num / den`` as floats (a list for tensors), NaN where ``den`` is 0 (nothing to explain)."""
    num, den = torch.as_tensor(num, dtype=torch.float64), torch.as_tensor(den, dtype=torch.float64)
    out = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))
    return out.tolist()


class AttentionOffsetsResult(AnalysisResult):
    """Offset kernels and offset R² per layer and head.

    Attributes
    ----------
    kernels : dict
        ``{layer: ndarray (heads, 2H − 1, 2W − 1)}``: the logit kernel, offset key −
        query ``(Δrow, Δcol)`` at ``[Δrow + H − 1, Δcol + W − 1]``, count-weighted mean 0.
    prob_kernels : dict
        ``{layer: ndarray (heads, 2H − 1, 2W − 1)}``: mean renormalised attention
        probability per offset.
    r2, r2_nonself : dict
        ``{layer: [per head]}`` offset R² (fitted and scored on all images) and its
        part beyond the zero offset.
    layer_r2 : dict
        ``{layer: float}``: the heads pooled (explained over total sum of squares).
    r2_heldout, r2_heldout_ci, layer_r2_heldout, layer_r2_heldout_ci : dict
        The same scored on images the kernel was not fitted on (folds of images), and
        95% intervals over the folds (empty with one fold).
    prefix_mass : dict
        ``{layer: [per head]}`` mean attention a patch query gives all prefix tokens.
    prefix_logit : dict
        ``{layer: ndarray (heads, prefix tokens)}`` their logit minus the query's mean patch logit.
    grid : (int, int)
    num_prefix_tokens, num_images, n_folds : int
    checkpoint : str
    patches_shuffled : bool
        The control run: offsets between slots of patch-shuffled images.

    Examples
    --------
    >>> import numpy as np
    >>> r = AttentionOffsetsResult(kernels={1: np.zeros((2, 3, 3))}, r2={1: [0.5, 0.1]}, grid=(2, 2))
    >>> r.to_dict()["layers"][0]["heads"][1]
    {'head': 1, 'offset_r2': 0.1}
    """

    name = "attention_offsets"
    #: per-head values beside ``r2`` (JSON key: ``offset_`` + name, except ``prefix_mass``)
    _PER_HEAD = ("r2_nonself", "r2_heldout", "r2_heldout_ci", "prefix_mass")

    def __init__(self, kernels, r2, grid, *, prob_kernels=None, r2_nonself=None, layer_r2=None, r2_heldout=None,
                 r2_heldout_ci=None, layer_r2_heldout=None, layer_r2_heldout_ci=None, prefix_mass=None,
                 prefix_logit=None, num_prefix_tokens=0, num_images=None, n_folds=1, checkpoint="",
                 patches_shuffled=False):
        import numpy as np

        def arrays(d):
            return {int(k): np.asarray(v, dtype=np.float64) for k, v in sorted((d or {}).items())}

        def floats(d):
            return {int(k): [_float(x) for x in v] for k, v in sorted((d or {}).items())}

        def scalars(d):
            return {int(k): _float(v) for k, v in sorted((d or {}).items())}

        def intervals(d):
            return {int(k): [[_float(x) for x in ci] for ci in v] for k, v in sorted((d or {}).items())}

        self.kernels = arrays(kernels)
        self.r2 = floats(r2)
        self.grid = _grid(grid)
        self.prob_kernels = arrays(prob_kernels)
        self.r2_nonself = floats(r2_nonself)
        self.layer_r2 = scalars(layer_r2)
        self.r2_heldout = floats(r2_heldout)
        self.r2_heldout_ci = intervals(r2_heldout_ci)
        self.layer_r2_heldout = scalars(layer_r2_heldout)
        self.layer_r2_heldout_ci = {int(k): [_float(x) for x in v] for k, v in (layer_r2_heldout_ci or {}).items()}
        self.prefix_mass = floats(prefix_mass)
        self.prefix_logit = arrays(prefix_logit)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.num_images = num_images
        self.n_folds = int(n_folds)
        self.checkpoint = checkpoint
        self.patches_shuffled = bool(patches_shuffled)
        #: name of the ``.npz`` beside the JSON (``save`` writes it; the report prefixes the model)
        self.kernels_file = f"{self.name}.npz"

    @property
    def layers(self) -> list:
        return list(self.r2)

    def to_dict(self):
        layers = []
        for layer, per_head in self.r2.items():
            heads = []
            for h, value in enumerate(per_head):
                row = {"head": h, "offset_r2": value}
                for key in self._PER_HEAD:
                    values = getattr(self, key).get(layer)
                    if values is not None:
                        row[key if key == "prefix_mass" else f"offset_{key}"] = values[h]
                heads.append(row)
            row = {"layer": layer, "offset_r2": self.layer_r2.get(layer, float(sum(per_head) / len(per_head)))}
            if layer in self.layer_r2_heldout:
                row["offset_r2_heldout"] = self.layer_r2_heldout[layer]
                row["offset_r2_heldout_ci"] = self.layer_r2_heldout_ci.get(layer)
            layers.append({**row, "heads": heads})
        return {"checkpoint": self.checkpoint, "grid": list(self.grid), "num_prefix_tokens": self.num_prefix_tokens,
                "num_images": self.num_images, "n_folds": self.n_folds, "patches_shuffled": self.patches_shuffled,
                "kernels_file": self.kernels_file, "layers": layers}

    def layer_frame(self):
        """One row per layer: pooled ``offset_r2`` and the held-out score with its interval."""
        import pandas as pd

        nan2 = [float("nan")] * 2
        rows = [{"layer": layer, "offset_r2": self.layer_r2.get(layer, float("nan")),
                 "offset_r2_heldout": self.layer_r2_heldout.get(layer, float("nan")),
                 "heldout_low": self.layer_r2_heldout_ci.get(layer, nan2)[0],
                 "heldout_high": self.layer_r2_heldout_ci.get(layer, nan2)[1]} for layer in self.layers]
        return pd.DataFrame(rows, columns=["layer", "offset_r2", "offset_r2_heldout", "heldout_low", "heldout_high"])

    def to_frame(self):
        """One row per (layer, head): ``offset_r2``, ``offset_r2_nonself``, the held-out score with
        its interval over folds, ``prefix_mass``."""
        import pandas as pd

        nan = float("nan")
        rows = []
        for layer, per_head in self.r2.items():
            n = len(per_head)
            for h, value in enumerate(per_head):
                ci = self.r2_heldout_ci.get(layer, [[nan, nan]] * n)[h]
                rows.append({"layer": layer, "head": h, "offset_r2": value,
                             "offset_r2_nonself": self.r2_nonself.get(layer, [nan] * n)[h],
                             "offset_r2_heldout": self.r2_heldout.get(layer, [nan] * n)[h],
                             "heldout_low": ci[0], "heldout_high": ci[1],
                             "prefix_mass": self.prefix_mass.get(layer, [nan] * n)[h]})
        return pd.DataFrame(rows, columns=["layer", "head", "offset_r2", "offset_r2_nonself", "offset_r2_heldout",
                                           "heldout_low", "heldout_high", "prefix_mass"])

    def summary_line(self) -> str:
        """The last layer's pooled offset R², and its held-out score with interval when there is one."""
        layer = max(self.r2)
        text = f"layer {layer}: offset R² {self.layer_r2.get(layer, float('nan')):.3f}"
        if layer in self.layer_r2_heldout:
            lo, hi = self.layer_r2_heldout_ci.get(layer, [float("nan")] * 2)
            text += f", held out {self.layer_r2_heldout[layer]:.3f} [{lo:.3f}, {hi:.3f}]"
        return text + (" (patches shuffled: offsets between slots)" if self.patches_shuffled else "")

    def kernel_arrays(self) -> dict:
        """What the ``.npz`` holds: ``kernel_L``, ``prob_kernel_L``, ``prefix_logit_L`` per layer ``L``,
        ``offsets_row``/``offsets_col`` (the offset of each kernel row/column) and ``layers``."""
        import numpy as np

        gh, gw = self.grid
        out = {"layers": np.array(self.layers), "offsets_row": np.arange(-(gh - 1), gh),
               "offsets_col": np.arange(-(gw - 1), gw), "offset_r2": np.array([self.r2[k] for k in self.layers])}
        for layer in self.layers:
            out[f"kernel_{layer}"] = self.kernels[layer]
            if layer in self.prob_kernels:
                out[f"prob_kernel_{layer}"] = self.prob_kernels[layer]
            if layer in self.prefix_logit:
                out[f"prefix_logit_{layer}"] = self.prefix_logit[layer]
        return out

    def output_names(self) -> list:
        return super().output_names() + [f"{self.name}.npz"]

    def save(self, out_dir, dpi=130) -> list:
        """Write the JSON, CSV, PNG and the kernels' ``.npz`` into ``out_dir``, as one set."""
        from ..results import write_output_set

        json_name, csv_name, png_name, npz_name = self.output_names()
        self.kernels_file = npz_name
        contents = {json_name: self.to_json(), csv_name: self.to_frame().to_csv(index=False),
                    png_name: self.figure_png(dpi=dpi), npz_name: self.npz_bytes()}
        return write_output_set(out_dir, contents)

    def npz_bytes(self) -> bytes:
        """:meth:`kernel_arrays` as the bytes of an ``.npz`` file."""
        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, **self.kernel_arrays())
        return buf.getvalue()

    @classmethod
    def load(cls, json_path) -> "AttentionOffsetsResult":
        """Read a saved result back: the JSON and the ``.npz`` beside it."""
        import json
        from pathlib import Path

        import numpy as np

        path = Path(json_path)
        doc = json.loads(path.read_text(encoding="utf-8"))
        arrays = np.load(path.with_name(doc.get("kernels_file") or f"{cls.name}.npz"))
        rows = doc["layers"]
        nan2 = [float("nan")] * 2

        def per_head(key, missing=float("nan")):
            found = {r["layer"]: [h.get(key) for h in r["heads"]] for r in rows}
            return {k: [missing if x is None else x for x in v] for k, v in found.items()
                    if any(x is not None for x in v)}

        def layered(prefix):
            return {r["layer"]: arrays[f"{prefix}_{r['layer']}"] for r in rows if f"{prefix}_{r['layer']}" in arrays}

        heldout = [r for r in rows if r.get("offset_r2_heldout") is not None]
        result = cls(
            kernels=layered("kernel"), r2=per_head("offset_r2"), grid=doc["grid"],
            prob_kernels=layered("prob_kernel"), r2_nonself=per_head("offset_r2_nonself"),
            layer_r2={r["layer"]: r["offset_r2"] for r in rows}, r2_heldout=per_head("offset_r2_heldout"),
            r2_heldout_ci={k: [c or nan2 for c in v] for k, v in per_head("offset_r2_heldout_ci", nan2).items()},
            layer_r2_heldout={r["layer"]: r["offset_r2_heldout"] for r in heldout},
            layer_r2_heldout_ci={r["layer"]: r.get("offset_r2_heldout_ci") or nan2 for r in heldout},
            prefix_mass=per_head("prefix_mass"), prefix_logit=layered("prefix_logit"),
            num_prefix_tokens=doc.get("num_prefix_tokens", 0), num_images=doc.get("num_images"),
            n_folds=doc.get("n_folds", 1), checkpoint=doc.get("checkpoint", ""),
            patches_shuffled=doc.get("patches_shuffled", False))
        result.provenance = doc.get("provenance")
        return result

    def plot(self, ax=None, kind="logit", layers=None):
        """Kernels per layer (rows) × head (columns), one colour scale for the whole figure.

        ``kind``: ``"logit"`` (diverging, centred on 0) or ``"prob"`` (mean attention per
        offset, from 0). The query sits at the centre of each panel (a cross); each
        panel's title gives the head's offset R². ``ax`` is accepted for the common
        interface but a grid of panels needs its own figure (it is ignored).
        """
        import matplotlib.pyplot as plt
        import numpy as np

        if kind not in ("logit", "prob"):
            raise ValueError(f"kind must be 'logit' or 'prob', got {kind!r}")
        maps = self.kernels if kind == "logit" else self.prob_kernels
        if not maps:
            raise ValueError(f"no {kind} kernels in this result")
        layers = [int(v) for v in (layers or list(maps))]
        heads = max(maps[layer].shape[0] for layer in layers)
        gh, gw = self.grid
        size = 1.15
        fig, axes = plt.subplots(len(layers), heads, figsize=(size * heads + 1.2, size * len(layers) + 0.7),
                                 squeeze=False)
        values = np.concatenate([maps[layer].ravel() for layer in layers])
        if kind == "logit":
            top = float(np.abs(values).max()) or 1.0
            norm, cmap, label = dict(vmin=-top, vmax=top), "RdBu_r", "logit kernel (centred)"
        else:
            norm, cmap, label = dict(vmin=0.0, vmax=float(values.max()) or 1.0), "magma", "mean attention"
        extent = (-(gw - 1) - 0.5, gw - 1 + 0.5, gh - 1 + 0.5, -(gh - 1) - 0.5)
        image = None
        for i, layer in enumerate(layers):
            for h in range(heads):
                ax_ = axes[i][h]
                ax_.set_xticks([])
                ax_.set_yticks([])
                if h >= maps[layer].shape[0]:
                    ax_.set_axis_off()
                    continue
                image = ax_.imshow(maps[layer][h], cmap=cmap, extent=extent, interpolation="nearest", **norm)
                ax_.plot([0], [0], marker="+", color="0.2", ms=4, mew=0.8)
                ax_.set_title(f"R² {self.r2[layer][h]:.2f}", fontsize=7, pad=2)
                if h == 0:
                    ax_.set_ylabel(f"layer {layer}", fontsize=8)
                if i == len(layers) - 1:
                    ax_.set_xlabel(f"head {h}", fontsize=8)
        title = "Attention offset kernels" + (f" — {self.checkpoint}" if self.checkpoint else "")
        if self.patches_shuffled:
            title += " (patches shuffled)"
        fig.suptitle(f"{title}\nΔcol → across, Δrow ↓ down; + = the query", fontsize=9)
        fig.subplots_adjust(left=0.06, right=0.86, bottom=0.06, top=1 - 0.75 / (size * len(layers) + 0.7),
                            wspace=0.12, hspace=0.35)
        cax = fig.add_axes([0.89, 0.15, 0.025, 0.7])
        fig.colorbar(image, cax=cax).set_label(label, fontsize=8)
        cax.tick_params(labelsize=7)
        return fig


class _ShuffledBatches:
    """The batches of ``data`` with every image's patches shuffled (one fixed permutation per image)."""

    def __init__(self, data, patch_size, seed):
        self.data, self.patch_size, self.seed = data, int(patch_size), int(seed)

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        from ..extract import image_permutations
        from ..layers.grid import permute_patches

        for images, index in self.data:
            n = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
            perm = image_permutations(index, n, self.seed)
            yield permute_patches(images, self.patch_size, perm), index


def attention_offsets(model, images=None, *, num_images=64, img_size=None, batch_size=32, device="cpu", seed=0,
                      progress=True, label="", n_folds=5, shuffle_patches=False,
                      mode="auto") -> AttentionOffsetsResult:
    """Offset kernels and offset R² of every layer and head of any timm-style ViT.

    Parameters
    ----------
    model : nn.Module
        timm ``VisionTransformer``/``Eva``, asg_probe ``SpatialViT`` (every ``pos``), a
        Hugging Face model through :class:`asg_probe.hf.HFViT`. Fused attention is fine:
        the logits are read where the block calls SDPA (with RoPE applied and any bias
        the mechanism passes). Put in eval mode for the run and moved to ``device``.
    images : None, str, Path, ImageSet or tensor
        See :meth:`asg_probe.inputs.ImageBatches.prepare`.
    num_images, img_size, batch_size, device, seed, progress, label
        As in :func:`asg_probe.attention_distance`; ``seed`` also seeds the patch shuffles.
    n_folds : int, default=5
        Folds of images for the held-out score and its 95% interval (1: none).
    shuffle_patches : bool
        The control: shuffle each image's patches first and measure offsets between
        slots (content adjacency removed; the mechanism's own offset structure stays).
        The pixels of each patch move together, so this shuffles the tokens exactly only
        for models whose tokens are non-overlapping image patches (not convolutional stems).
    mode : {"auto", "sdpa", "attn_drop"}
        How attention is read; see :func:`asg_probe.capture.capture_attention`.

    Returns
    -------
    AttentionOffsetsResult

    Notes
    -----
    A block that attends twice in a row (the decomposed decay) has no single logit
    matrix; its kernel is fitted to the log of the composed attention, which is what
    a single softmax would need to produce the same map. Logits are float32.

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="alibi2d", depth=1)
    >>> res = attention_offsets(m, torch.randn(4, 3, 32, 32), progress=False)
    >>> res.kernels[1].shape, 0 <= res.r2[1][0] <= 1
    ((4, 15, 15), True)
    """
    from ..errors import UsageError
    from ..extract import run_analyses
    from ..geometry import model_geometry
    from ..inputs import ImageBatches

    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 1:
        raise UsageError(f"n_folds must be an integer >= 1, got {n_folds!r}")
    geo = model_geometry(model)
    if not geo.token_attention:
        raise UsageError(f"{type(model).__name__}'s attention is over channels (cross-covariance), not tokens: "
                         "offsets between patches are undefined for it (its coordinate probes work)")
    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                batch_size=batch_size, seed=seed)
    acc = AttentionOffsetsAccumulator(geo.num_prefix_tokens, n_folds=n_folds)
    batches = _ShuffledBatches(data, geo.patch_size, seed) if shuffle_patches else data
    run_analyses(model, batches, [acc], layers=[0], device=device, progress=progress, desc="attention offsets",
                 attention_mode=mode)
    result = acc.result(label, patches_shuffled=shuffle_patches)
    return result.record_inputs(data, device=device)
