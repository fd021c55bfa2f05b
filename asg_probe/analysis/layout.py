"""2-D layouts of token embeddings (PCA, UMAP) and the position score of a layout.

The one PCA/UMAP implementation of the package: :mod:`asg_probe.analysis.embeddings`
(``token_embeddings``, the report) and the widgets' ``ModelView`` call
:func:`embed_2d`. :func:`position_score` says how spatially organised a layout
(or any feature space) is.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import UsageError

__all__ = ["DEFAULT_K", "PCA_DIMS", "EMBEDDING_METHODS", "position_score", "embed_2d"]

#: Neighbours used by :func:`position_score`.
DEFAULT_K = 10
#: Dimensions kept by the PCA that precedes UMAP.
PCA_DIMS = 50


# --------------------------------------------------------------------------- the score

def _nearest(points, k, image=None, chunk=1024):
    """Exact Euclidean ``k`` nearest neighbours, ``(indices (n, k), distances (n, k))``, nearest first.

    With ``image`` given, neighbours from the point's own image are excluded;
    otherwise the point itself comes first (distance 0), as UMAP expects. Rows
    are computed in chunks, so memory is ``chunk × n``.
    """
    pts = torch.as_tensor(np.ascontiguousarray(points), dtype=torch.float64)
    img = None if image is None else torch.as_tensor(np.asarray(image)).long()
    n = pts.shape[0]
    idx_out = torch.empty(n, k, dtype=torch.long)
    dist_out = torch.empty(n, k, dtype=torch.float64)
    for start in range(0, n, chunk):
        q = slice(start, start + chunk)
        d = torch.cdist(pts[q], pts)
        if img is not None:
            d.masked_fill_(img[q, None] == img[None, :], float("inf"))
        else:
            d[torch.arange(d.shape[0]), torch.arange(start, start + d.shape[0])] = -1.0  # self first
        dist, idx = torch.topk(d, k, dim=1, largest=False)
        idx_out[q], dist_out[q] = idx, dist.clamp_min(0)
    return idx_out.numpy(), dist_out.numpy()


def position_score(points, rows, cols, image, grid, k=DEFAULT_K):
    """Cross-image kNN position score of an embedding: 0 = no spatial organisation, 1 = perfect.

    Every token's normalised coordinates ``(row / (gh-1), col / (gw-1))`` are
    predicted by the mean coordinates of its ``k`` nearest neighbours (Euclidean,
    in ``points``) among tokens of **other images**. Leaving out the token's own
    image matters: neighbouring patches of one photograph look alike, so
    same-image neighbours would reveal position through content even in a model
    that has none. The score is the **Pearson correlation** between the true and
    the predicted coordinate, averaged over row and column.

    Why a correlation and not the kNN R²: when neighbours ignore position, the
    prediction is independent of the truth, so the correlation is about 0 whatever
    the neighbours look like. The R² of that prediction is not: the ``k``
    neighbours often come from one contiguous region of one other image (content
    is smooth), so their mean does not average out and R² goes well below 0 (to
    about ``-1`` in the worst case) for a map with no positional organisation at
    all. The kNN R² is still reported (``r2_knn_row``, ``r2_knn_col``): it also
    penalises a map that is organised but shrunk towards the centre.

    Parameters
    ----------
    points : array (n, d)
        Embedding coordinates (2-D map or features).
    rows, cols : array (n,)
        Integer grid position of each token.
    image : array (n,)
        Image of each token; needs at least two distinct images.
    grid : (int, int)
    k : int
        Neighbours (capped by the number of tokens from other images).

    Returns
    -------
    dict
        ``score``, ``score_row``, ``score_col``, ``r2_knn_row``, ``r2_knn_col``, ``k``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> rows, cols = np.divmod(np.tile(np.arange(16), 20), 4)
    >>> image = np.repeat(np.arange(20), 16)
    >>> planted = np.stack([rows, cols], 1) + 0.05 * rng.normal(size=(320, 2))
    >>> round(position_score(planted, rows, cols, image, (4, 4))["score"], 2)
    1.0
    >>> abs(position_score(rng.normal(size=(320, 2)), rows, cols, image, (4, 4))["score"]) < 0.15
    True
    """
    points = np.asarray(points, dtype=np.float64)
    rows, cols, image = np.asarray(rows), np.asarray(cols), np.asarray(image)
    n = points.shape[0]
    if not (rows.shape == cols.shape == image.shape == (n,)):
        raise ValueError(f"rows, cols and image need one entry per point ({n}), got shapes "
                         f"{rows.shape}, {cols.shape}, {image.shape}")
    _, counts = np.unique(image, return_counts=True)
    if counts.size < 2:
        raise UsageError("position_score needs tokens from at least two images (neighbours come from other images)")
    k = int(min(k, n - counts.max()))
    gh, gw = int(grid[0]), int(grid[1])
    targets = np.stack([rows / max(gh - 1, 1), cols / max(gw - 1, 1)], axis=1)
    neighbours, _ = _nearest(points, k, image=image)
    pred = targets[neighbours].mean(1)
    out = {"k": k}
    for j, name in enumerate(("row", "col")):
        t, p = targets[:, j] - targets[:, j].mean(), pred[:, j] - pred[:, j].mean()
        sst, spp = float(t @ t), float(p @ p)
        out[f"score_{name}"] = float(t @ p / np.sqrt(sst * spp)) if sst > 0 and spp > 0 else float("nan")
        out[f"r2_knn_{name}"] = 1 - float(((targets[:, j] - pred[:, j]) ** 2).sum()) / sst if sst > 0 else float("nan")
    both = [out["score_row"], out["score_col"]]
    out["score"] = float(np.nanmean(both)) if np.isfinite(both).any() else float("nan")
    return out


# --------------------------------------------------------------------------- 2-D layout

def _pca(features, dims):
    """Projection of centred ``features`` (n, D) on their top ``dims`` principal axes.

    Eigendecomposition of the smaller of the covariance and Gram matrices, in
    float64; signs fixed so each axis's largest loading is positive (deterministic).
    """
    X = np.asarray(features, dtype=np.float64)
    X = X - X.mean(0)
    n, D = X.shape
    dims = int(min(dims, n - 1, D))
    if D <= n:
        _, vecs = np.linalg.eigh(X.T @ X)
        axes = vecs[:, ::-1][:, :dims]                             # (D, dims)
    else:
        vals, vecs = np.linalg.eigh(X @ X.T)
        u = vecs[:, ::-1][:, :dims]
        axes = X.T @ u / np.sqrt(np.clip(vals[::-1][:dims], 1e-300, None))
    flip = np.sign(axes[np.abs(axes).argmax(0), np.arange(dims)])
    return X @ (axes * np.where(flip == 0, 1, flip))


EMBEDDING_METHODS = ("umap", "pca")


def embed_2d(features, seed=0, n_neighbors=15, min_dist=0.1, pca_dims=PCA_DIMS, *, method="umap", n_epochs=None):
    """2-D layout of ``features`` (n, D): PCA to ``pca_dims``, then UMAP (or the first two PCs).

    The one PCA/UMAP implementation of the package: the analyses and the widgets use it.

    Parameters
    ----------
    features : array (n, D)
    seed : int
        UMAP's random state.
    n_neighbors, min_dist : UMAP parameters.
    pca_dims : int
        Dimensions kept by the PCA that precedes UMAP.
    method : {"umap", "pca"}
        ``"pca"``: the first two principal components (instant, deterministic).
    n_epochs : int, optional
        UMAP epochs (default: UMAP's, 500 below 10k points; the widgets pass 200,
        by which the layout of a few thousand tokens is settled).

    Returns
    -------
    xy : ndarray (n, 2) float32
    reduced : ndarray (n, min(D, pca_dims))
        The centred PCA scores UMAP was run on.
    method : str
        ``"umap"``, or ``"pca"`` when asked or (with a warning) when umap-learn cannot be imported.

    Examples
    --------
    >>> xy, reduced, how = embed_2d(np.random.default_rng(0).normal(size=(20, 8)), method="pca")
    >>> xy.shape, reduced.shape, how
    ((20, 2), (20, 8), 'pca')
    """
    if method not in EMBEDDING_METHODS:
        raise ValueError(f"method must be one of {EMBEDDING_METHODS}, got {method!r}")
    features = np.asarray(features, dtype=np.float32)
    n = features.shape[0]
    if n < 4:
        raise UsageError(f"{n} tokens are too few for a 2-D embedding; sample more images (num_images)")
    reduced = _pca(features, pca_dims) if features.shape[1] > pca_dims else features - features.mean(0)
    if method == "pca":
        return np.asarray(_pca(reduced, 2), dtype=np.float32), reduced, "pca"
    try:
        import umap
    except ImportError as exc:
        warnings.warn(f"umap-learn is not available ({exc}); showing the first two principal components instead",
                      stacklevel=3)
        xy = _pca(reduced, 2)
        return np.asarray(xy, dtype=np.float32), reduced, "pca"
    k = int(min(n_neighbors, n - 1))
    # UMAP's exact path for small data evaluates its numba metric pair by pair from Python
    # (seconds for a few thousand points); an exact kNN from torch is much faster.
    knn = _nearest(reduced, k)
    reducer = umap.UMAP(n_neighbors=k, n_components=2, min_dist=min_dist, random_state=int(seed), n_jobs=1,
                        n_epochs=n_epochs, precomputed_knn=(knn[0], knn[1].astype(np.float32)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")  # we never call transform
        xy = reducer.fit_transform(np.asarray(reduced, dtype=np.float32))
    return np.asarray(xy, dtype=np.float32), reduced, "umap"
