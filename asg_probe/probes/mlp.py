"""A small non-linear probe, :class:`MLPProbe`: is position decodable, if not linearly?

Trained on a :class:`~asg_probe.probes.reservoir.TokenReservoir` sample of the
tokens (bounded memory), with one held-out split by image.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin

from ._inputs import as_features, as_tensor, dense_ids, prepare_targets
from .metrics import r2_columns
from .reservoir import TokenReservoir
from .targets import coordinate_targets, resolve_grid

__all__ = ["MLPProbe", "image_bootstrap_r2", "image_sums", "bootstrap_r2", "mlp_controls"]

#: Bootstrap resamples of the held-out images.
N_BOOTSTRAP = 2000


def image_bootstrap_r2(y, pred, image, level=0.95, n_boot=N_BOOTSTRAP, seed=0):
    """Percentile interval of held-out R² per column, resampling whole images: ``(ci (T, 2), n_images)``.

    Tokens of one image are not independent, so images are the units resampled (a cluster
    bootstrap); per image only the token count and the sums of ``y``, ``y²`` and squared errors
    are needed, so the ``n_boot`` resamples cost ``O(n_boot · n_images · T)``. ``[nan, nan]``
    with fewer than 2 images.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.rand(200, 1, generator=g); image = torch.arange(200) // 10
    >>> ci, n = image_bootstrap_r2(y, y + 0.1 * torch.randn(200, 1, generator=g), image)   # R² 1 - 0.01 / (1/12)
    >>> n, bool(ci[0, 0] < 0.88 < ci[0, 1])
    (20, True)
    """
    sums = image_sums(y, pred, image)
    T, m = sums[2].shape[1], sums[1].size
    if m < 2:
        return np.full((T, 2), np.nan), m
    return _percentiles(bootstrap_r2(sums, n_boot, seed), level), m


def image_sums(y, pred, image):
    """Per held-out image: ``(ids (m,), n (m,), Σy (m, T), Σy² (m, T), Σ(y - pred)² (m, T))``, float64 numpy.

    All a cluster bootstrap of R² needs (:func:`bootstrap_r2`); images in increasing id order, so two
    probes scored on the same images line up.
    """
    y, pred = y.detach().double().cpu(), pred.detach().double().cpu()
    ids, inverse = torch.unique(torch.as_tensor(image).cpu(), return_inverse=True)
    m = int(inverse.max()) + 1 if inverse.numel() else 0

    def per_image(v):
        return torch.zeros(m, v.shape[1], dtype=torch.float64).index_add_(0, inverse, v).numpy()

    n = np.bincount(inverse.numpy(), minlength=m).astype(np.float64)
    return ids.numpy(), n, per_image(y), per_image(y * y), per_image((y - pred) ** 2)


def bootstrap_r2(sums, n_boot=N_BOOTSTRAP, seed=0) -> np.ndarray:
    """``(n_boot, T)`` R² of resampled images (:func:`image_sums`' output), SST around each resample's mean.

    The resamples depend only on the number of images and ``seed``: probes scored on the same images get
    the same resamples, so differences of their replicates are paired.
    """
    _, n, sy, sy2, sse = sums
    m = n.size
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot).astype(np.float64)   # (B, m) image counts
    N, Sy, Sy2, SSE = weights @ n, weights @ sy, weights @ sy2, weights @ sse
    sst = Sy2 - Sy * Sy / N[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - SSE / sst


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
    heldout_r2_ci_ : ndarray (T, 2)
        95% cluster-bootstrap interval over the held-out images (:func:`image_bootstrap_r2`): the
        R² *this fitted MLP* would reach on new images. The training images are not resampled (one
        split, no refits), so it does not cover the spread from retraining; the linear probe's
        jackknife intervals do. ``n_heldout_images_`` images behind it.
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
        X = as_features(X)
        res = TokenReservoir(self.max_tokens, self.seed)
        if X.ndim == 3:
            n_images, N, _ = X.shape
            ids = torch.arange(n_images) if groups is None else dense_ids(groups, n_images, "image")
            Y = coordinate_targets(resolve_grid(N, grid)) if y is None else prepare_targets(y, n_images, N)
            for s in range(0, n_images, 64):
                res.update(X[s:s + 64], Y[s:s + 64] if Y.ndim == 3 else Y, ids[s:s + 64])
        else:
            if y is None or groups is None:
                raise ValueError("2-D token input (n_tokens, D) needs both y and groups (the image of each token)")
            Y = as_tensor(y)
            Y = Y[:, None] if Y.ndim == 1 else Y
            if Y.ndim != 2 or Y.shape[0] != X.shape[0]:
                raise ValueError(f"y must be (n_tokens, T) or (n_tokens,), got {tuple(Y.shape)}")
            ids = dense_ids(groups, X.shape[0], "token")
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
            pred = model((X[test] - self.x_mean_) / self.x_scale_)
            self.heldout_r2_ = r2_columns(Y[test], pred)
        # per held-out image sums: the interval, and paired comparisons with probes on the same images
        self.heldout_sums_ = image_sums(Y[test], pred, reservoir.image_index.to(dev)[test])
        self.n_heldout_images_ = int(self.heldout_sums_[1].size)
        self.heldout_r2_ci_ = (_percentiles(bootstrap_r2(self.heldout_sums_, seed=int(self.seed)))
                               if self.n_heldout_images_ >= 2 else np.full((Y.shape[1], 2), np.nan))
        return self

    def predict(self, X):
        """Predictions ``(..., T)`` for ``X (..., D)``; tensor in → tensor out."""
        if not hasattr(self, "model_"):
            raise ValueError("this MLPProbe is not fitted yet: call fit first")
        is_tensor = isinstance(X, torch.Tensor)
        Xt = as_features(X)
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
        Xt = as_features(X)
        pred = torch.as_tensor(self.predict(Xt)).cpu().double()
        if y is None:
            if Xt.ndim != 3:
                raise ValueError("score on 2-D token input needs y")
            Y = coordinate_targets(resolve_grid(Xt.shape[1], grid), dtype=torch.float64).expand_as(pred)
        else:
            Y = as_tensor(y).double().cpu().reshape(pred.shape)
        return float(r2_columns(Y.reshape(-1, pred.shape[-1]), pred.reshape(-1, pred.shape[-1])).mean())


def _percentiles(replicates, level=0.95) -> np.ndarray:
    """Percentile interval ``(T, 2)`` of bootstrap ``replicates`` ``(B, T)`` (NaN where all are NaN)."""
    tail = 50 * (1 - level)
    replicates = np.asarray(replicates, dtype=np.float64)
    if np.isnan(replicates).all():
        return np.full((replicates.shape[1], 2), np.nan)
    return np.nanpercentile(replicates, [tail, 100 - tail], axis=0).T


def _columns(reservoir: TokenReservoir, columns) -> TokenReservoir:
    """The same token sample with only target ``columns`` (shares the features)."""
    sub = copy.copy(reservoir)
    sub.targets = reservoir.targets[:, list(columns)]
    return sub


def _spread(values):
    # sample std over seeds; 0 with a single seed (no spread measured)
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def mlp_controls(reservoir: TokenReservoir, n_control_seeds: int = 0, init_reservoirs=(), **params) -> dict:
    """An :class:`MLPProbe` of (row, col) with the linear probe's controls, as one flat dict of ``mlp_*`` fields.

    The fields mean what the linear probe's do (:mod:`asg_probe.analysis.layerwise`), each MLP of the
    same size and training (``params``, e.g. ``steps``, ``hidden``, ``seed``):

    * ``mlp_r2_row``, ``mlp_r2_col``, ``mlp_r2`` (their mean): held-out R²;
    * ``mlp_r2_control`` (``_row``, ``_col``; spread over seeds ``mlp_r2_control_std``) and
      ``mlp_selectivity`` = ``mlp_r2 - mlp_r2_control``: the *slot* control, one MLP per control seed
      trained to give slot ``i`` the coordinates of slot ``perm[i]``. Any code that tells slots apart
      solves it; the difference separates a code of geometry from mere slot identity;
    * ``mlp_r2_init`` (``_row``, ``_col``; ``mlp_r2_init_std``) and the learned gains ``mlp_r2_gain``
      (``_row``, ``_col``): the random-initialisation baseline, the mean over the MLPs trained on the
      tokens of freshly initialised copies of the model (``init_reservoirs``).

    Every R² has a 95% interval (``*_ci``): a cluster bootstrap over the held-out images
    (:func:`bootstrap_r2`); the MLPs are scored on the same images with the same resamples, so the
    intervals of ``mlp_selectivity`` and of the gains are paired. Like ``heldout_r2_ci_`` they cover
    the held-out images' spread, not the spread from retraining (one split, no refits).

    Parameters
    ----------
    reservoir : TokenReservoir
        Tokens of the model with targets ``(row, col)`` followed by the slot controls' two columns per
        seed (:func:`~asg_probe.probes.slot_control_targets`), as :class:`MLPProbe` samples them.
    n_control_seeds : int
        Control seeds in ``reservoir``'s targets (0: no control fields).
    init_reservoirs : sequence of TokenReservoir
        One per init seed: the same images' tokens of a freshly initialised copy (same reservoir seed, so
        the same token sample), targets starting with ``(row, col)``; empty: no init fields.

    Examples
    --------
    >>> from asg_probe.probes import slot_control_targets
    >>> g = torch.Generator().manual_seed(0)
    >>> c = coordinate_targets((4, 4))
    >>> X = torch.cat([torch.sin(3 * c), torch.cos(3 * c)], 1) @ torch.randn(4, 8, generator=g)
    >>> res = TokenReservoir()
    >>> res.update(X + 0.01 * torch.randn(20, 16, 8, generator=g), torch.cat([c, slot_control_targets((4, 4), [0])], 1),
    ...            torch.arange(20))
    >>> out = mlp_controls(res, n_control_seeds=1, steps=200)
    >>> bool(out["mlp_r2"] > 0.9), out["mlp_n_heldout_images"]
    (True, 4)
    """
    n_control_seeds = int(n_control_seeds)
    if reservoir.targets is None or reservoir.targets.shape[1] < 2 + 2 * n_control_seeds:
        raise ValueError(f"the reservoir needs targets (row, col) and 2 columns per control seed "
                         f"({2 + 2 * n_control_seeds} columns); fill it with coordinate_targets and "
                         f"slot_control_targets")

    def fit(res, columns):
        probe = MLPProbe(**params).fit_reservoir(_columns(res, columns))
        if probe.n_heldout_images_ < 2:   # nothing to resample: intervals NaN, as heldout_r2_ci_
            return probe, np.full((N_BOOTSTRAP, len(columns)), np.nan)
        return probe, bootstrap_r2(probe.heldout_sums_, seed=int(probe.seed))        # (B, 2)

    def mean(r2):   # (..., 2) row, col -> (row, col, mean)
        return np.concatenate([r2, r2.mean(-1, keepdims=True)], -1)

    main, reps = fit(reservoir, [0, 1])
    r2, rep = mean(np.asarray(main.heldout_r2_, dtype=np.float64)), mean(reps)
    names = ("mlp_r2_row", "mlp_r2_col", "mlp_r2")
    out = {"mlp_n_heldout_images": main.n_heldout_images_}
    for i, name in enumerate(names):
        out[name] = float(r2[i])
        out[f"{name}_ci"] = _percentiles(rep[:, i:i + 1])[0].tolist()

    def baseline(probes_reps, std_name, count_name):
        values = np.array([mean(np.asarray(p.heldout_r2_, dtype=np.float64)) for p, _ in probes_reps])   # (S, 3)
        reps_b = np.mean([mean(r) for _, r in probes_reps], axis=0)                                       # (B, 3)
        out[std_name] = _spread(values[:, 2])
        out[count_name] = len(probes_reps)
        return values.mean(0), reps_b

    if n_control_seeds:
        controls = [fit(reservoir, [2 + 2 * k, 3 + 2 * k]) for k in range(n_control_seeds)]
        value, reps_c = baseline(controls, "mlp_r2_control_std", "mlp_n_control_seeds")
        for i, name in enumerate(("mlp_r2_control_row", "mlp_r2_control_col", "mlp_r2_control")):
            out[name] = float(value[i])
            out[f"{name}_ci"] = _percentiles(reps_c[:, i:i + 1])[0].tolist()
        out["mlp_selectivity"] = out["mlp_r2"] - out["mlp_r2_control"]
        out["mlp_selectivity_ci"] = _percentiles(rep[:, 2:] - reps_c[:, 2:])[0].tolist()   # paired resamples
    if init_reservoirs:
        inits = [fit(res, [0, 1]) for res in init_reservoirs]
        value, reps_i = baseline(inits, "mlp_r2_init_std", "mlp_n_init_seeds")
        for i, name in enumerate(names):
            out[f"{name}_init"] = float(value[i])
            out[f"{name}_init_ci"] = _percentiles(reps_i[:, i:i + 1])[0].tolist()
            out[f"{name}_gain"] = out[name] - out[f"{name}_init"]
            out[f"{name}_gain_ci"] = _percentiles(rep[:, i:i + 1] - reps_i[:, i:i + 1])[0].tolist()
    return out
