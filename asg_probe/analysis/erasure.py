"""Does the model *use* the position its tokens carry? Causal erasure with LEACE.

Every probe is correlational: it shows that position can be read from a layer, not that the
model uses it. Amnesic probing (Elazar et al. 2021, "Amnesic Probing") answers the second
question by removing the information and watching the output; LEACE (Belrose et al. 2023,
"LEACE: Perfect linear concept erasure in closed form"; the ``concept-erasure`` package's
``LeaceFitter``) removes it provably: after erasure no *linear* predictor of (row, col) from
the tokens does better than a constant, on the data the eraser was fitted on, while the
representation moves as little as possible.

For each erase layer ``L`` (layer numbering of :mod:`asg_probe.geometry`: 0 = tokens entering
block 0, ``i`` = output of block ``i``):

1. **fit**: a LEACE eraser for the normalised (row, col) of each patch, on the patch tokens the
   layer-``L`` coordinate probe reads, streamed over the *fit* images (about half, chosen by a hash
   of the image index: :func:`held_out`);
2. **apply**: the *held-out* images run with the eraser applied to the patch tokens
   of the residual stream at ``L`` (prefix tokens untouched), through a hook
   (:mod:`asg_probe.hooks`) that is removed afterwards;
3. **recovery**: a coordinate probe (:class:`~asg_probe.probes.CoordinateProbe`, the layerwise
   probe's k-fold CV split by image and its fold intervals) at ``L`` and every later layer:
   does position come back, and by which layer? ``r2_clean`` is the same probe without erasure;
4. **effect**: with a classification head, the top-1 agreement with the unerased model and the
   mean KL(clean ‖ erased) of the output distributions, and with labels the accuracy; for every
   model the relative change of the final tokens, ``‖F' − F‖ / ‖F‖``;
5. **control**: all of the above after erasing a random subspace of the same rank with the same
   centring and the same whitening (:func:`random_eraser`: LEACE's form ``x − W⁺ u uᵀ W (x − μ)`` with
   ``u`` drawn at random, which is what LEACE fits for a concept the tokens do not carry), for
   several seeds (means over seeds). An effect means something only beside it. Its edits are
   smaller than LEACE's (on ViT tokens a uniform whitened direction mostly lands on low-variance
   directions: ``edit_norm_control`` is often 1/6–1/10 of ``edit_norm``), so an effect beyond it
   rules out only "any rank-k edit of the control's typical size";
6. **matched control** (``n_matched_seeds``, default 1): a random subspace of the same rank whose
   edit is as large as LEACE's (:func:`matched_eraser`: expected squared edit over the fit tokens
   equal to LEACE's) and which carries no linear position (drawn in the whitened complement of
   LEACE's directions, so the fit tokens' linear predictor of (row, col) is untouched). An effect
   beyond *it* rules out "any rank-k edit of the same size": it is the position the edit removes,
   not the edit's size, that changes the output. ``edit_norm`` / ``edit_norm_control`` /
   ``edit_norm_matched`` (mean ``‖x' − x‖`` per patch token at ``L``) show the sizes; where the tokens
   have no directions besides position as large as LEACE's edit, the matched control falls short
   and ``edit_norm_matched`` says by how much.

What it rules out, and what not: a LEACE-erased layer holds no linearly decodable position, so an
output that does not change shows that the model does not need *linearly* decodable position at
``L`` (given the later layers, which may recompute it: see recovery). Non-linearly encoded
position survives LEACE (an MLP probe may still read it), so "no effect" never means "no
position used", and an effect larger than the matched control's says the linear position code
at ``L`` is used.

Cost: per held-out batch, one clean forward caches the residual stream at every erase layer
(the reference of the effect and of ``r2_clean``); then each erase layer ``L`` runs only blocks
``L..end`` (:func:`asg_probe.hooks.run_from`), on the LEACE, control and matched copies stacked as
one batch. All statistics are streamed sums (ridge Gram matrices, KL / agreement sums), so memory
does not grow with the number of images; the recovery probes of all erase layers are alive at once
(erase layers are grouped to stay within :data:`STATS_MEMORY`, each group repeating the clean
forward). With ``depth + 1`` erase layers and ``V = 1 + n_control_seeds + n_matched_seeds`` copies
that is about ``0.5 (fit) + 0.5 (clean) + V × 0.5 × (depth + 1) / 2`` bare forwards of all images,
plus the probes' float64 updates.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..extract import Accumulator, ForwardBatch, batch_grid, run_analyses
from ..probes import CoordinateProbe, coordinate_targets, fold_interval
from ..results import AnalysisResult
from .layerwise import ProbeAccumulator

__all__ = ["erase_position", "ErasureResult", "LeaceAccumulator", "random_eraser", "matched_eraser", "eraser_rank",
           "edit_energy", "erase_patch_tokens", "held_out"]

#: The two sides of the image split (:func:`held_out`).
FIT, HELD_OUT = False, True


def _concept_erasure():
    try:
        import concept_erasure
    except ImportError:  # pragma: no cover - a declared dependency
        from ..errors import UsageError

        raise UsageError("erasure needs the concept-erasure package: pip install concept-erasure") from None
    return concept_erasure


class LeaceAccumulator(Accumulator):
    """Streaming LEACE statistics per layer (``concept_erasure.LeaceFitter``), for (row, col) targets.

    Every batch's patch tokens update one float64 ``LeaceFitter`` per layer; :meth:`all_reduce`
    merges the fitters of all torch.distributed processes (means and centred sums combined
    exactly), after which :meth:`eraser` gives each layer's ``LeaceEraser``.

    Examples
    --------
    >>> import torch
    >>> from asg_probe.extract import ForwardBatch
    >>> acc = LeaceAccumulator()
    >>> x = torch.randn(4, 9, 6)
    >>> acc.update(ForwardBatch(tokens={0: x}, grid=(3, 3), image_index=torch.arange(4), images=None,
    ...                         num_prefix_tokens=0, patch_size=4))
    >>> acc.eraser(0).proj_left.shape, int(acc.fitters[0].n)
    (torch.Size([6, 2]), 36)
    """

    def __init__(self):
        self.fitters = {}
        self.grid = None
        self._reduced = False

    def update(self, batch):
        LeaceFitter = _concept_erasure().LeaceFitter
        self.grid = batch_grid(self.grid, batch)
        for layer, tokens in batch.tokens.items():
            B, N, D = tokens.shape
            dtype = torch.float32 if tokens.device.type == "mps" else torch.float64
            if layer not in self.fitters:
                self.fitters[layer] = LeaceFitter(D, 2, device=tokens.device, dtype=dtype)
            z = coordinate_targets(self.grid, device=tokens.device, dtype=dtype)
            self.fitters[layer].update(tokens.reshape(-1, D).to(dtype), z.expand(B, N, 2).reshape(-1, 2))
        self._reduced = False

    def all_reduce(self, group=None):
        """Merge every process's fitters (once; no-op in one process): raw sums are summed, then re-centred."""
        from ..distributed import all_reduce_sum, is_distributed

        if self._reduced or not is_distributed():
            return
        for layer in sorted(self.fitters):
            f = self.fitters[layer]
            n = f.n.to(f.mean_x.dtype)
            sums = [n.reshape(1), f.mean_x * n, f.mean_z * n,
                    f.sigma_xx_ + n * torch.outer(f.mean_x, f.mean_x),
                    f.sigma_xz_ + n * torch.outer(f.mean_x, f.mean_z)]
            all_reduce_sum(sums, group)
            total, sx, sz, sxx, sxz = sums
            f.n = total[0].round().long()
            f.mean_x, f.mean_z = sx / total, sz / total
            f.sigma_xx_ = sxx - total * torch.outer(f.mean_x, f.mean_x)
            f.sigma_xz_ = sxz - total * torch.outer(f.mean_x, f.mean_z)
            f.__dict__.pop("eraser", None)   # a cached eraser of the local statistics is stale
        self._reduced = True

    def eraser(self, layer):
        """The fitted ``concept_erasure.LeaceEraser`` of ``layer``."""
        return self.fitters[layer].eraser


def eraser_rank(eraser, rtol=1e-6) -> int:
    """Rank of the eraser's edit ``proj_left @ proj_right`` (2 for (row, col), fewer if a target is not
    linearly present at all).

    >>> import torch
    >>> from concept_erasure import LeaceEraser
    >>> eraser_rank(LeaceEraser(torch.eye(4)[:, :2], torch.eye(4)[:2], None))
    2
    """
    edit = (eraser.proj_left @ eraser.proj_right).double()
    s = torch.linalg.svdvals(edit)
    return int((s > rtol * max(float(s.max()), 1e-300)).sum()) if s.numel() else 0


def random_eraser(fitter, rank: int, seed: int):
    """The control: a LEACE-form eraser for a random subspace of ``rank`` dimensions, same whitening and centring.

    LEACE removes ``x ↦ x − W⁺ u uᵀ W (x − μ)``, with ``W`` the whitening of the fit tokens'
    covariance and ``u`` the whitened directions of the concept. The control keeps ``W``, ``μ``
    and the form, and draws ``u`` (orthonormal, ``rank`` columns) uniformly at random in the
    whitened space: what LEACE would fit for a concept the tokens do not carry. (A plain orthogonal
    projection off random raw directions would be a weaker control: ViT tokens are anisotropic and
    often low-rank, so random raw directions mostly miss the variance that LEACE's edit removes.)

    >>> import torch
    >>> from concept_erasure import LeaceFitter
    >>> f = LeaceFitter(5, 2, dtype=torch.float64).update(torch.randn(100, 5, dtype=torch.float64),
    ...                                                   torch.randn(100, 2, dtype=torch.float64))
    >>> e = random_eraser(f, 2, seed=0)
    >>> e.proj_left.shape, eraser_rank(e), bool(torch.equal(e.bias, f.mean_x))
    (torch.Size([5, 2]), 2, True)
    """
    LeaceEraser = _concept_erasure().LeaceEraser
    W, W_inv, S, sigma = _whitening(fitter)
    gen = torch.Generator().manual_seed(1_000_003 * int(seed) + 7)
    g = torch.randn(sigma.shape[0], max(int(rank), 0), generator=gen, dtype=torch.float64).to(sigma)
    g = S @ (S.mH @ g)      # within the whitened support, as LEACE's u is
    u, _ = torch.linalg.qr(g)
    return LeaceEraser(proj_left=W_inv @ u, proj_right=u.mH @ W, bias=fitter.mean_x)


def edit_energy(eraser, fitter) -> float:
    """Mean squared edit ``E‖x' − x‖²`` of ``eraser`` over the tokens ``fitter`` saw (exact, from their
    mean and covariance): ``tr(P C Pᵀ) + ‖P (m − b)‖²`` with ``P`` the edit, ``C``, ``m`` the tokens'
    covariance and mean and ``b`` the eraser's centre.

    >>> import torch
    >>> from concept_erasure import LeaceEraser, LeaceFitter
    >>> x = torch.randn(4000, 3, dtype=torch.float64) * torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64)
    >>> f = LeaceFitter(3, 1, dtype=torch.float64).update(x, torch.zeros(4000, 1, dtype=torch.float64))
    >>> e = LeaceEraser(torch.eye(3, dtype=torch.float64)[:, :1], torch.eye(3, dtype=torch.float64)[:1], f.mean_x)
    >>> round(edit_energy(e, f))                                          # channel 0's variance
    9
    """
    left, right = (t.to(fitter.sigma_xx_) for t in (eraser.proj_left, eraser.proj_right))
    C = fitter.sigma_xx_ / max(int(fitter.n), 1)
    shift = fitter.mean_x - (eraser.bias if eraser.bias is not None else 0)
    # P = left @ right has rank k: tr(P C Pᵀ) = tr((leftᵀ left)(right C rightᵀ)), O(d² k) not O(d³)
    energy = torch.trace((left.mH @ left) @ (right @ C @ right.mH))
    return float(energy + (left @ (right @ shift)).square().sum())


def _whitening(fitter):
    """``(W, W⁺, support basis, Σ)`` of the (shrunk) covariance LEACE whitens with (concept_erasure's threshold)."""
    sigma = fitter.sigma_xx          # the (shrunk) covariance the LEACE eraser whitens with
    L, V = torch.linalg.eigh(sigma)
    support = L > (L[-1] * sigma.shape[-1] * torch.finfo(L.dtype).eps)   # concept_erasure's threshold
    L = L.clamp_min(0.0)
    W = (V * torch.where(support, L.rsqrt(), 0.0)) @ V.mH
    W_inv = (V * torch.where(support, L.sqrt(), 0.0)) @ V.mH
    return W, W_inv, V[:, support], sigma


def matched_eraser(fitter, eraser, seed: int, rank=None, iters: int = 60):
    """The matched control: a random LEACE-form eraser of LEACE's rank whose edit is as large as LEACE's,
    in directions that carry no linear position.

    The plain control (:func:`random_eraser`) draws its whitened directions uniformly; on ViT tokens
    they mostly land on low-variance directions, so its edits are several times smaller than
    LEACE's, which follow position into the high-variance ones. The rule here: ``u`` is drawn in
    the whitened complement of LEACE's directions (so the linear predictor of (row, col) from the
    fit tokens is untouched: the edit removes no linear position), as
    ``u = orth(B Y diag(μ^(p/2)) (B Y)ᵀ g)`` with ``g`` standard normal in the whitened coordinates, ``(μ, Y)`` the eigenpairs of the
    covariance restricted to that complement (basis ``B``), and the exponent ``p`` found by
    bisection so that the expected squared edit over the fit tokens (:func:`edit_energy`) equals
    LEACE's: ``p = 0`` is the uniform draw, ``p > 0`` leans to high-variance directions, ``p < 0``
    to low. Where even the complement's top directions are smaller than LEACE's edit (tokens
    whose variance is mostly position), ``p`` stops at its bound and the shortfall shows in
    ``edit_norm_matched``.

    >>> import torch
    >>> from concept_erasure import LeaceFitter
    >>> g = torch.Generator().manual_seed(0)
    >>> z = torch.rand(3000, 2, generator=g, dtype=torch.float64)
    >>> x = torch.randn(3000, 12, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, 12, dtype=torch.float64)
    >>> x[:, :2] += 6 * z                                                  # position: the largest variance
    >>> f = LeaceFitter(12, 2, dtype=torch.float64).update(x, z)
    >>> m = matched_eraser(f, f.eraser, seed=0)
    >>> round(edit_energy(m, f) / edit_energy(f.eraser, f), 2), eraser_rank(m)
    (1.0, 2)
    """
    LeaceEraser = _concept_erasure().LeaceEraser
    rank = eraser_rank(eraser) if rank is None else int(rank)
    W, W_inv, S, sigma = _whitening(fitter)
    # LEACE's whitened directions: the column space of W Σ_xz (what concept_erasure's eraser removes)
    u_leace, s, _ = torch.linalg.svd(W @ fitter.sigma_xz, full_matrices=False)
    u_leace = u_leace[:, s > s.max().clamp_min(1e-300) * 1e-6] if s.numel() else u_leace[:, :0]
    comp = S - u_leace @ (u_leace.mH @ S)            # the support, less LEACE's directions
    B, sv, _ = torch.linalg.svd(comp, full_matrices=False)
    B = B[:, sv > 0.5]
    if B.shape[1] < rank:
        raise ValueError(f"the tokens have {B.shape[1]} directions besides position's; a rank-{rank} matched "
                         "control needs more (use more fit images)")
    mu, Y = torch.linalg.eigh(B.mH @ sigma @ B)
    basis = B @ Y
    log_mu = mu.clamp_min(mu.max() * 1e-12).log()
    gen = torch.Generator().manual_seed(2_000_029 * int(seed) + 11)
    # g is drawn in the fixed whitened coordinates and projected, not drawn in the eigenbasis: the
    # eigenvectors' signs and (near-)degenerate rotations change with float rounding (one process vs
    # several merging their sums), and the draw must not; basisᵀ g is still standard normal there.
    g = basis.mH @ torch.randn(basis.shape[0], rank, generator=gen, dtype=torch.float64).to(sigma)
    target = edit_energy(eraser, fitter)

    def draw(p):
        w = (0.5 * p * (log_mu - log_mu.max())).exp() if p >= 0 else (0.5 * p * (log_mu - log_mu.min())).exp()
        u, _ = torch.linalg.qr(basis @ (w[:, None] * g))
        e = LeaceEraser(proj_left=W_inv @ u, proj_right=u.mH @ W, bias=fitter.mean_x)
        return e, edit_energy(e, fitter)

    lo, hi = -40.0, 40.0
    best = draw(0.0)
    if best[1] < target:
        lo = 0.0
    else:
        hi = 0.0
    for _ in range(int(iters)):
        mid = 0.5 * (lo + hi)
        e, energy = draw(mid)
        if abs(energy - target) < abs(best[1] - target):
            best = (e, energy)
        if energy < target:
            lo = mid
        else:
            hi = mid
    return best[0]


def erase_patch_tokens(tokens, eraser, num_prefix_tokens):
    """``eraser`` applied to the patch tokens of a ``(B, prefix + N, D)`` residual stream; prefix tokens
    (class, registers) pass unchanged. Computed in the eraser's precision, returned in the tokens' dtype.

    >>> import torch
    >>> from concept_erasure import LeaceEraser
    >>> e = LeaceEraser(torch.eye(3)[:, :1], torch.eye(3)[:1], None)          # removes channel 0
    >>> erase_patch_tokens(torch.ones(1, 2, 3), e, num_prefix_tokens=1).tolist()
    [[[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]]
    """
    p = int(num_prefix_tokens)
    patches = eraser(tokens[:, p:].to(eraser.proj_left.dtype)).to(tokens.dtype)
    return torch.cat([tokens[:, :p], patches], dim=1)


class _Recovery(ProbeAccumulator):
    """Coordinate probes (no control columns) on one condition's tokens, per read layer."""

    def _new_probe(self) -> CoordinateProbe:
        return super()._new_probe().set_params(control=False)


def _r2(probe):
    res = probe.cv_results_
    main = [res.target_names.index(n) for n in probe.target_names_]
    r2_row, r2_col = (float(res.cv_r2_[i]) for i in main)
    folds = 0.5 * (res.fold_cv_r2_[:, main[0]] + res.fold_cv_r2_[:, main[1]])
    return r2_row, r2_col, 0.5 * (r2_row + r2_col), fold_interval(folds)


class _Moments:
    """Sums of per-image values (count, sum, sum of squares) for means with a normal 95% interval."""

    def __init__(self):
        self.values = torch.zeros(3, dtype=torch.float64)

    def add(self, v):
        v = v.detach().double().cpu().reshape(-1)
        self.values += torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64), v.sum(), (v * v).sum()])

    def mean(self):
        n, s, _ = self.values.tolist()
        return s / n if n else float("nan")

    def interval(self):
        n, s, ss = self.values.tolist()
        if n < 2:
            return [float("nan"), float("nan")]
        mean = s / n
        sd = math.sqrt(max(ss / n - mean * mean, 0.0) * n / (n - 1))
        half = 1.96 * sd / math.sqrt(n)
        return [mean - half, mean + half]


def _kl(clean_logits, other_logits):
    """KL(p_clean ‖ p_other) per image, in nats."""
    p = clean_logits.double().log_softmax(-1)
    q = other_logits.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def _relative(clean, other):
    """``‖other − clean‖ / ‖clean‖`` per image (over every token and channel)."""
    c, o = clean.double().flatten(1), other.double().flatten(1)
    return (o - c).norm(dim=1) / c.norm(dim=1).clamp_min(1e-300)


def has_head(model) -> bool:
    """Whether ``model`` ends in a classification head (timm's ``num_classes > 0`` and ``forward_head``)."""
    return int(getattr(model, "num_classes", 0) or 0) > 0 and hasattr(model, "forward_head")


def _outputs(model, x):
    """``(final tokens, logits or None)`` of one forward pass (``forward_features`` then the head)."""
    features = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
    logits = model.forward_head(features) if has_head(model) else None
    return features, logits


def held_out(index) -> torch.Tensor:
    """Whether each image (by global index) is held out (True) or fits the eraser (False).

    A hash of the index, not its parity: the split must not depend on how torchrun strides the
    images over processes (rank ``r`` of ``W`` gets indices ``r, r + W, ...``), so every process
    holds both kinds and the result is the same for any process count. About half are held out.

    >>> held_out(torch.arange(8)).tolist()
    [True, False, False, True, True, False, True, False]
    """
    import hashlib

    index = torch.as_tensor(index)
    bits = [hashlib.blake2b(b"asg-probe-erasure:%d" % int(i), digest_size=1).digest()[0] & 1 for i in index.tolist()]
    return torch.tensor(bits, dtype=torch.bool, device=index.device).reshape(index.shape)


class _Split:
    """Batches of one side (fit: ``False``, held out: ``True``) of the split, as ``(images, index)``."""

    def __init__(self, data, side):
        self.data, self.side = data, bool(side)

    def __iter__(self):
        for x, index in self.data:
            keep = held_out(index) == self.side
            if bool(keep.any()):
                yield x[keep], index[keep]


class ErasureResult(AnalysisResult):
    """Recovery (erase layer × read layer R²) and output effect of erasing position, beside the control.

    Attributes
    ----------
    recovery : list of dict
        ``{erase_layer, read_layer, r2, r2_row, r2_col, r2_ci, r2_control, r2_control_std, r2_clean}``:
        held-out coordinate-probe R² after LEACE erasure at ``erase_layer``, read at
        ``read_layer >= erase_layer``, with the 95% fold interval; ``r2_control`` the mean over the
        random-subspace seeds, ``r2_matched`` over the matched control's; ``r2_clean`` the same probe
        without erasure.
    effect : list of dict
        ``{erase_layer, rank, agreement, agreement_control, agreement_ci, agreement_control_ci, kl, kl_control,
        kl_ci, kl_control_ci, kl_diff_ci, accuracy_clean, accuracy, accuracy_control, relative_change,
        relative_change_control, edit, edit_control, edit_norm, edit_norm_control}`` and the matched
        control's ``{agreement, kl, kl_diff, accuracy, relative_change, edit, edit_norm}_matched``
        (``None`` with ``n_matched_seeds=0``); head-dependent fields are ``None`` for a
        headless model, accuracies ``None`` without labels. ``kl_diff_ci`` is the 95% interval of the
        per-image paired difference (erased − control), ``kl_diff_matched_ci`` the same against the
        matched control; ``edit`` the relative size of the erasure itself at ``erase_layer``
        (``‖x' − x‖ / ‖x‖`` of the patch tokens), ``edit_norm`` its mean per patch token ``‖x' − x‖``.

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1, num_classes=3)
    >>> res = asg_probe.erase_position(m, torch.randn(20, 3, 32, 32), layers=[0], n_folds=2, progress=False)
    >>> {"recovery", "effect", "provenance"} <= set(res.to_dict()), [r["read_layer"] for r in res.recovery]
    (True, [0, 1])
    """

    name = "erasure"

    def __init__(self, recovery, effect, *, grid, num_images, checkpoint="", extra=None):
        self.recovery = list(recovery)
        self.effect = list(effect)
        self.grid = tuple(grid) if grid else None
        self.num_images = num_images
        self.checkpoint = checkpoint
        self.extra = dict(extra or {})

    def to_dict(self):
        return {"checkpoint": self.checkpoint, "num_images": self.num_images,
                "grid": list(self.grid) if self.grid else None, **self.extra,
                "recovery": self.recovery, "effect": self.effect}

    def to_frame(self, table="recovery"):
        """``"recovery"`` (one row per erase × read layer, the erase layer's effect columns joined) or ``"effect"``."""
        import pandas as pd

        if table == "effect":
            return pd.DataFrame(self.effect)
        if table != "recovery":
            raise ValueError(f"table must be 'recovery' or 'effect', got {table!r}")
        rec = pd.DataFrame(self.recovery)
        columns = ["erase_layer", "agreement", "agreement_control", "kl", "kl_control", "relative_change",
                   "relative_change_control", "edit_norm", "edit_norm_control", "agreement_matched", "kl_matched",
                   "relative_change_matched", "edit_norm_matched"]
        eff = pd.DataFrame(self.effect)
        eff = eff[[c for c in columns if c in eff.columns]]     # results saved before the matched control lack some
        return rec.merge(eff, on="erase_layer", how="left")

    def r2_matrix(self, column="r2"):
        """``(erase layers, read layers, matrix)`` of one recovery column (NaN where read < erase)."""
        erase = sorted({r["erase_layer"] for r in self.recovery})
        read = sorted({r["read_layer"] for r in self.recovery})
        mat = np.full((len(erase), len(read)), np.nan)
        for r in self.recovery:
            v = r[column]
            mat[erase.index(r["erase_layer"]), read.index(r["read_layer"])] = np.nan if v is None else v
        return erase, read, mat

    def plot(self, ax=None):
        """Heatmap of held-out R² (erase layer × read layer) and the effect per erase layer beside its control."""
        from ..plotting import display_name, integer_ticks, model_color, new_figure

        fig, axes = new_figure(5.2, 3.6, ncols=2) if ax is None else (ax.figure, None)
        ax_heat, ax_eff = (axes[0][0], axes[0][1]) if axes is not None else (ax, None)
        erase, read, mat = self.r2_matrix()
        # one row per erase layer asked for (they need not be contiguous): rows by position, labelled
        im = ax_heat.imshow(mat, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis",
                            extent=(read[0] - 0.5, read[-1] + 0.5, -0.5, len(erase) - 0.5))
        fig.colorbar(im, ax=ax_heat, label="held-out R² after erasure")
        ax_heat.set_xlabel("read layer")
        ax_heat.set_ylabel("erase layer")
        integer_ticks(ax_heat, read)
        ax_heat.set_yticks(range(len(erase)))
        ax_heat.set_yticklabels([str(v) for v in erase])
        name = display_name(self.checkpoint) if self.checkpoint else ""
        ax_heat.set_title(f"Position recovery after LEACE{' — ' + name if name else ''}", fontsize=9)
        if ax_eff is not None:
            color = model_color(self.checkpoint or "model")
            layers = [r["erase_layer"] for r in self.effect]
            head = self.effect and self.effect[0]["agreement"] is not None
            key, what = ("agreement", "top-1 agreement with unerased") if head else \
                ("relative_change", "relative change of final tokens")
            for suffix, ls, lab in (("", "-", "LEACE (row, col)"), ("_control", "--", "random subspace, same rank"),
                                    ("_matched", ":", "random subspace, LEACE's edit size")):
                values = [r.get(key + suffix) for r in self.effect]
                if any(v is None for v in values):     # no matched control (n_matched_seeds=0, older results)
                    continue
                ax_eff.plot(layers, values, ls=ls, marker="o", ms=4, color=color, label=lab)
                cis = [r.get(f"{key}{suffix}_ci") for r in self.effect]
                if all(ci is not None for ci in cis):
                    ax_eff.fill_between(layers, [c[0] for c in cis], [c[1] for c in cis], color=color,
                                        alpha=0.15 if not suffix else 0.07, lw=0)
            ax_eff.set_xlabel("erase layer (0 = patch embedding)")
            ax_eff.set_ylabel(what)
            integer_ticks(ax_eff, layers)
            ax_eff.grid(alpha=0.3)
            ax_eff.set_title("Effect on the output (band: 95% interval over images)", fontsize=9)
            ax_eff.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        return fig

    def summary_line(self):
        parts = []
        for eff in self.effect:
            L = eff["erase_layer"]
            at = next((r for r in self.recovery if r["erase_layer"] == L and r["read_layer"] == L), None)
            last = max((r for r in self.recovery if r["erase_layer"] == L), key=lambda r: r["read_layer"])
            s = f"erase {L}: R² at {L} {at['r2']:.2f} (control {at['r2_control']:.2f}), at {last['read_layer']} " \
                f"{last['r2']:.2f}"
            if eff["agreement"] is not None:
                s += f", agreement {eff['agreement']:.2f} (control {eff['agreement_control']:.2f})"
            else:
                s += f", final-token change {eff['relative_change']:.3f} (control {eff['relative_change_control']:.3f})"
            parts.append(s)
        return "; ".join(parts)


def _scene_labels(model, images, num_images, img_size, seed):
    """Labels of the held-out scenes for a model trained on scenes (its task and class count), else None."""
    if not (isinstance(images, str) and images == "scenes"):
        return None
    from ..checkpoint import trained_on_scenes
    from ..scenes import TASKS, SceneDataset

    if not trained_on_scenes(model):
        return None
    data = ((getattr(model, "asg_meta", None) or {}).get("config") or {}).get("data") or {}
    task = data.get("task")
    if task not in TASKS or TASKS[task] != int(getattr(model, "num_classes", 0) or 0):
        return None
    from ..geometry import model_geometry

    size = img_size or model_geometry(model).img_size
    size = size if isinstance(size, int) else size[0]
    return SceneDataset(int(num_images), img_size=int(size), task=task, split="val", seed=int(seed)).arrays()[1]


def erase_position(model, images=None, *, layers=None, num_images=128, img_size=None, batch_size=32, n_folds=5,
                   n_control_seeds=3, labels=None, alphas=None, seed=0, device="cpu", progress=True, label="",
                   checkpoint=None, n_matched_seeds=1):
    """Erase linearly decodable position (LEACE) at each layer and measure recovery and output effect.

    Parameters
    ----------
    model : nn.Module
        Any model the analyses accept (asg_probe, timm, Hugging Face through :func:`asg_probe.load_checkpoint`).
    images : None, str, Path, ImageSet or tensor
        As for :func:`asg_probe.layerwise_probes`. About half the images fit the eraser, the others
        are held out (:func:`held_out`; recovery and effect are measured on them only).
    layers : int or list of int, optional
        Erase layers (default: all, ``0..depth``; negative counts from the end). Each is read at
        itself and every later layer.
    num_images, img_size, batch_size, seed, device, progress
        As for :func:`asg_probe.layerwise_probes`; ``num_images`` covers both halves. LEACE is exact
        on its fit tokens; on held-out images the R² it leaves shrinks with the fit tokens per channel
        (``r2`` at ``read_layer == erase_layer`` shows it: about 0.1 with 30 fit images of 64 patches
        for 128 channels, 0.00-0.03 with 130).
    n_folds : int
        CV folds of the recovery probes (split by held-out image); at least ``n_folds`` held-out images.
    n_control_seeds : int
        Random subspaces of the control, averaged.
    labels : tensor (num_images,), optional
        Class of each image (by index): adds the accuracies. Held-out scenes of a model trained on
        scenes get their labels without asking.
    alphas : array-like, optional
        Ridge penalties of the recovery probes (default as the layerwise probe).
    label : str
        Display name (the JSON ``checkpoint`` field); ``checkpoint`` is its deprecated alias.
    n_matched_seeds : int
        Seeds of the matched control (:func:`matched_eraser`: LEACE's edit size, no linear
        position), averaged; 0 leaves it out (its fields are then ``None``). Each seed costs one more
        copy of the held-out images through the blocks after each erase layer.

    Returns
    -------
    ErasureResult

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    >>> res = asg_probe.erase_position(m, torch.randn(20, 3, 32, 32), layers=0, n_folds=2, progress=False)
    >>> res.effect[0]["rank"], res.recovery[0]["r2"] < 0.2 < res.recovery[0]["r2_control"]
    (2, True)
    """
    from ..errors import UsageError
    from ..geometry import model_geometry, resolve_layers
    from ..hooks import resid_name, run_from, run_with_cache
    from ..inputs import ImageBatches, display_label
    from ..progress import progress_bar
    from .resolution import any_input_size

    label = display_label(label, checkpoint)
    _concept_erasure()
    if int(n_control_seeds) < 1:
        raise UsageError(f"n_control_seeds must be at least 1, got {n_control_seeds}")
    if int(n_folds) < 2:
        raise UsageError(f"n_folds must be at least 2, got {n_folds}")
    if int(n_matched_seeds) < 0:
        raise UsageError(f"n_matched_seeds must be 0 (no matched control) or more, got {n_matched_seeds}")
    geo = model_geometry(model)
    depth, prefix = geo.depth, geo.num_prefix_tokens
    erase_layers = resolve_layers(layers, depth)
    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size, batch_size=batch_size,
                                seed=seed)
    side = held_out(data.selected)
    n_held = int(side.sum())
    if n_held < n_folds or data.num_images - n_held < 2:
        raise UsageError(f"{data.num_images} images leave {n_held} held out and {data.num_images - n_held} to fit, "
                         f"too few for {n_folds}-fold cross-validation; use at least {3 * n_folds} (--num-images)")
    from ..distributed import shard_indices

    for rank in range(data.world):   # every process must hold both kinds: the statistics are merged collectively
        mine = side[shard_indices(len(side), rank, data.world)]
        if bool(mine.all()) or not bool(mine.any()):
            raise UsageError(f"{data.num_images} images are too few for {data.world} processes (process {rank} "
                             "would have no fit or no held-out image); use more images or fewer processes")
    if labels is None:
        labels = _scene_labels(model, images, data.num_images, img_size, seed)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(labels) < data.num_images:
            raise UsageError(f"labels has {len(labels)} entries for {data.num_images} images")
    head = has_head(model)
    S, M = int(n_control_seeds), int(n_matched_seeds)

    was_training = model.training
    with any_input_size(model):
        # 1. fit: LEACE statistics of every erase layer, one pass over the fit images
        (fit,) = run_analyses(model, _Split(data, FIT), [LeaceAccumulator()],
                              layers=erase_layers, device=device, progress=progress, desc="erasure: fit",
                              total=len(data))
        erasers = {L: fit.eraser(L) for L in erase_layers}
        ranks = {L: eraser_rank(e) for L, e in erasers.items()}
        controls = {L: [random_eraser(fit.fitters[L], ranks[L], seed * 1000 + s) for s in range(S)]
                    for L in erase_layers}
        matched = {L: [matched_eraser(fit.fitters[L], erasers[L], seed * 1000 + s, rank=ranks[L]) for s in range(M)]
                   for L in erase_layers}
        # the views of one erase layer, stacked along the batch: LEACE, then the controls, then the matched ones
        views = {L: [erasers[L], *controls[L], *matched[L]] for L in erase_layers}
        V = 1 + S + M
        model.eval().to(device)
        clean_rec = _Recovery(n_folds=n_folds, alphas=alphas)
        recovery, effect = [], []
        width = fit.fitters[erase_layers[0]].mean_x.shape[-1]
        groups = _layer_groups(erase_layers, depth, V, int(n_folds), width)
        bar = progress_bar(total=len(data) * len(groups), desc="erasure: apply", unit="batch",
                           disable=not progress, leave=False)
        try:
            for g, group in enumerate(groups):
                accs = {L: [_Recovery(n_folds=n_folds, alphas=alphas) for _ in range(V)] for L in group}
                moments = {L: {k: _Moments() for k in _MOMENTS} for L in group}
                first = min(group)
                for x, index in _Split(data, HELD_OUT):
                    x = x.to(device)
                    B = x.shape[0]
                    # 2. the clean forward, once per batch: the reference of the effect and, cached at every
                    # layer from the group's first, where each erase layer's run starts
                    names = {j: resid_name(j, depth) for j in range(first, depth + 1)}
                    (features0, logits0), cache = run_with_cache(model, x, list(names.values()), include_prefix=True,
                                                                 forward=_outputs)
                    if g == 0:
                        clean_rec.update(_batch({j: cache[n][:, prefix:] for j, n in names.items()}, index, x,
                                                prefix, geo))
                    for L in group:
                        read = {j: names[j] for j in range(L, depth + 1)}
                        at_L = cache[names[L]]
                        stacked = torch.cat([erase_patch_tokens(at_L, e, prefix) for e in views[L]])
                        store = {}

                        def keep(act, name, store=store):
                            store[name] = act[:, prefix:].detach()

                        # blocks L..end only, on every view at once
                        features, logits = run_from(model, L, stacked, x.repeat(V, *([1] * (x.dim() - 1))),
                                                    [(n, keep) for n in read.values()], forward=_outputs)
                        chunks = lambda t: t.reshape(V, B, *t.shape[1:])  # noqa: E731
                        for v, acc in enumerate(accs[L]):
                            acc.update(_batch({j: chunks(store[n])[v] for j, n in read.items()}, index, x, prefix,
                                              geo))
                        _effect_update(moments[L], chunks, at_L[:, prefix:], store[read[L]], features0, features,
                                       logits0, logits, S, M, labels[index.cpu()] if labels is not None else None)
                        del store
                    del cache
                    bar.update(1)
                for L in group:
                    _all_reduce_moments(moments[L])
                    for acc in accs[L]:
                        acc.all_reduce()
                if g == 0:
                    clean_rec.all_reduce()
                clean = clean_rec.fitted()
                for L in group:
                    fitted = [acc.fitted() for acc in accs[L]]
                    for j in range(L, depth + 1):
                        r2_row, r2_col, r2, ci = _r2(fitted[0][j])
                        ctrl = [_r2(fc[j])[2] for fc in fitted[1:1 + S]]
                        match = [_r2(fc[j])[2] for fc in fitted[1 + S:]]
                        recovery.append({"erase_layer": L, "read_layer": j, "r2": r2, "r2_row": r2_row,
                                         "r2_col": r2_col, "r2_ci": ci, "r2_control": float(np.mean(ctrl)),
                                         "r2_control_std": float(np.std(ctrl, ddof=1)) if S > 1 else 0.0,
                                         "r2_matched": float(np.mean(match)) if M else None,
                                         "r2_clean": _r2(clean[j])[2]})
                    effect.append(_effect_row(L, ranks[L], moments[L], head, labels is not None, M > 0))
                    del accs[L]
        finally:
            bar.close()
            model.train(was_training)
    effect.sort(key=lambda r: r["erase_layer"])
    extra = {"n_control_seeds": S, "n_matched_seeds": M, "num_fit_images": data.num_images - n_held,
             "num_heldout_images": n_held,
             "n_folds": int(n_folds), "has_head": head, "has_labels": labels is not None,
             "split": "a hash of each image's index decides: fit the eraser, or held out "
                      "(asg_probe.analysis.erasure.held_out)",
             "erased_tokens": "patch tokens of the residual stream (prefix tokens untouched)",
             "control": "random whitened subspace of LEACE's rank (asg_probe.analysis.erasure.random_eraser)",
             "matched_control": "random subspace of LEACE's rank and edit size, carrying no linear position "
                                "(asg_probe.analysis.erasure.matched_eraser)"}
    result = ErasureResult(recovery, effect, grid=fit.grid, num_images=data.num_images, checkpoint=label, extra=extra)
    return result.record_inputs(data, device=device)


#: Bytes of streamed ridge statistics (recovery probes) alive at once. Erase layers are processed
#: in groups within it; each group repeats the clean forward of the held-out images once.
STATS_MEMORY = 2 * 2**30


def _layer_groups(erase_layers, depth, n_views, n_folds, width):
    """Erase layers in groups whose recovery statistics (``n_views`` probes per read layer, each
    ``n_folds`` float64 ``width²`` Gram matrices) fit :data:`STATS_MEMORY`; at least one layer per group."""
    per_probe = 8 * n_folds * (width * width + 4 * width)
    groups, size = [], 0
    for L in erase_layers:
        need = n_views * (depth + 1 - L) * per_probe
        if not groups or size + need > STATS_MEMORY:
            groups.append([])
            size = 0
        groups[-1].append(L)
        size += need
    return groups


_MOMENTS = ("agree", "agree_c", "agree_m", "kl", "kl_c", "kl_m", "kl_diff", "kl_diff_m", "rel", "rel_c", "rel_m",
            "edit", "edit_c", "edit_m", "norm", "norm_c", "norm_m", "acc0", "acc", "acc_c", "acc_m")


def _effect_update(m, chunks, clean_at_L, erased_at_L, features0, features, logits0, logits, S, M, labels):
    """Add one held-out batch's per-image effects (view 0: LEACE, then ``S`` controls, ``M`` matched)."""
    groups = {"": slice(0, 1), "_c": slice(1, 1 + S), "_m": slice(1 + S, 1 + S + M)}
    at_L = chunks(erased_at_L)
    f = chunks(features)

    def add(key, values):           # values (views, B): LEACE's row, or the mean over a control's seeds
        for suffix, sl in groups.items():
            if sl.stop > sl.start:
                m[key + suffix].add(values[sl].mean(0))

    add("rel", torch.stack([_relative(features0, f[v]) for v in range(len(f))]))
    add("edit", torch.stack([_relative(clean_at_L, at_L[v]) for v in range(len(f))]))
    # mean over patch tokens of each token's edit ‖x' − x‖
    add("norm", torch.stack([(at_L[v].double() - clean_at_L.double()).norm(dim=-1).mean(-1) for v in range(len(f))]))
    if logits is not None:
        lg = chunks(logits)
        top0 = logits0.argmax(-1)
        top = lg.argmax(-1)                                          # (views, B)
        add("agree", (top == top0).double())
        kls = torch.stack([_kl(logits0, lg[v]) for v in range(len(lg))])
        add("kl", kls)
        m["kl_diff"].add(kls[0] - kls[1:1 + S].mean(0))
        if M:
            m["kl_diff_m"].add(kls[0] - kls[1 + S:].mean(0))
        if labels is not None:
            y = labels.to(top.device)
            m["acc0"].add((top0 == y).double())
            add("acc", (top == y).double())


def _batch(tokens, held, x, prefix, geo):
    grid = geo.grid(x.shape)
    return ForwardBatch(tokens=tokens, grid=grid, image_index=held, images=x, num_prefix_tokens=prefix,
                        patch_size=geo.patch_size)


def _all_reduce_moments(moments):
    from ..distributed import all_reduce_sum

    keys = sorted(moments)
    all_reduce_sum([moments[k].values for k in keys])


def _effect_row(L, rank, m, head, with_labels, matched):
    def mean(k, need=head):
        return m[k].mean() if need else None

    def ci(k, need=head):
        return m[k].interval() if need else None

    acc = (lambda k, need=True: m[k].mean() if need else None) if (head and with_labels) else \
        (lambda k, need=True: None)
    row = {"erase_layer": L, "rank": rank,
           "agreement": mean("agree"), "agreement_control": mean("agree_c"),
           "agreement_ci": ci("agree"), "agreement_control_ci": ci("agree_c"),
           "kl": mean("kl"), "kl_control": mean("kl_c"), "kl_ci": ci("kl"), "kl_control_ci": ci("kl_c"),
           "kl_diff_ci": ci("kl_diff"),
           "accuracy_clean": acc("acc0"), "accuracy": acc("acc"), "accuracy_control": acc("acc_c"),
           "relative_change": m["rel"].mean(), "relative_change_control": m["rel_c"].mean(),
           "relative_change_ci": m["rel"].interval(), "relative_change_control_ci": m["rel_c"].interval(),
           "edit": m["edit"].mean(), "edit_control": m["edit_c"].mean(),
           "edit_norm": m["norm"].mean(), "edit_norm_control": m["norm_c"].mean(),
           # the matched control (matched_eraser): None where n_matched_seeds=0
           "edit_norm_matched": mean("norm_m", matched), "edit_matched": mean("edit_m", matched),
           "agreement_matched": mean("agree_m", head and matched), "kl_matched": mean("kl_m", head and matched),
           "kl_matched_ci": ci("kl_m", head and matched), "kl_diff_matched_ci": ci("kl_diff_m", head and matched),
           "accuracy_matched": acc("acc_m", matched),
           "relative_change_matched": mean("rel_m", matched),
           "relative_change_matched_ci": ci("rel_m", matched)}
    return row
