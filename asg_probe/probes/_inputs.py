"""Input checks shared by the probe modules: one-line ``ValueError`` for anything malformed."""
from __future__ import annotations

import numpy as np
import torch


def as_tensor(a, device=None) -> torch.Tensor:
    """``a`` (tensor, array or nested list) as a tensor, optionally moved to ``device``."""
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if device is not None:
        t = t.to(device)
    return t


def as_features(X, ndims=(2, 3)) -> torch.Tensor:
    """``X`` as a non-empty real tensor of one of ``ndims`` dimensions."""
    t = as_tensor(X)
    if t.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"X must be {want} ((n_images, N, D) or (n_tokens, D)), got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise ValueError(f"X must hold real numbers, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"X is empty, shape {tuple(t.shape)}")
    return t


def as_index(image_index, count: int, what: str = "image") -> torch.Tensor:
    """``image_index`` as a flat integer tensor of ``count`` entries (one per ``what``)."""
    idx = as_tensor(image_index).reshape(-1)
    if idx.numel() != count or idx.is_floating_point():
        raise ValueError(f"image_index must hold {count} integers (one per {what}), got {tuple(idx.shape)} "
                         f"of dtype {idx.dtype}")
    return idx


def dense_ids(groups, expected_len: int, what: str) -> torch.Tensor:
    """Rank of each group label among the sorted distinct labels (0..G-1), as a long tensor.

    Ranking (rather than using integer labels as they are) keeps folds balanced
    whatever the labels look like, e.g. only even ids.
    """
    g = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != expected_len:
        raise ValueError(f"groups must be 1-D with one label per {what} ({expected_len}), got shape {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


def prepare_targets(y, n_images: int, N: int, factored: bool = False) -> torch.Tensor:
    """Targets for ``n_images`` images of ``N`` patches: ``(N, T)`` shared or ``(n_images, N, T)``.

    :class:`~asg_probe.probes.targets.FactoredTargets` stay factored with ``factored`` (for
    :class:`~asg_probe.probes.RidgeStats`), else they are made dense.
    """
    from .targets import FactoredTargets

    if isinstance(y, FactoredTargets):
        if tuple(y.shape[:2]) != (n_images, N):
            raise ValueError(f"y must be (n_images, N, T) with n_images={n_images}, N={N}; "
                             f"got factored targets of shape {tuple(y.shape)}")
        return y if factored else y.dense()
    Y = as_tensor(y)
    if Y.ndim == 1 or (Y.ndim == 2 and Y.shape == (n_images, N) and N != n_images):
        Y = Y[..., None]
    ok = (Y.ndim == 2 and Y.shape[0] == N) or (Y.ndim == 3 and Y.shape[:2] == (n_images, N))
    if not ok:
        raise ValueError(f"y must be (N, T), (N,), (n_images, N, T) or (n_images, N) with "
                         f"n_images={n_images}, N={N}; got shape {tuple(Y.shape)}")
    return Y
