"""Per-model cache behind the widgets: tokens, probes, attention and 2-D embeddings.

A :class:`ModelView` binds one model to one small image set and computes, on first
request only, everything the widgets draw:

* **tokens** of every layer (one forward pass over all images, kept for all layers:
  a slider is likely to visit them all, and one pass is cheaper than one per layer);
* a **ridge coordinate probe** per layer (:class:`asg_probe.probes.CoordinateProbe`,
  the analyses' probe) with folds split by image, and each image's **held-out**
  prediction from the fold model that did not see it;
* **attention** maps of one image (one forward pass of that image, all blocks at
  once, through :func:`asg_probe.capture.capture_attention`), restricted to patch
  tokens and renormalised;
* a **2-D embedding** (UMAP, or PCA) of a layer's tokens.

Changing a head or a query patch then only indexes cached arrays, which is what
keeps the widgets interactive on a CPU.
"""
from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..extract import forward_tokens
from ..analysis.layout import EMBEDDING_METHODS, embed_2d
from ..geometry import model_geometry, resolve_layers
from ..inputs import ImageBatches
from ..probes import (CoordinateProbe, RidgeCVResult, coordinate_targets, jackknife_cv_r2, jackknife_interval,
                      online_code)

__all__ = ["ModelView", "ProbeFit", "Embedding2D", "as_views"]

#: Images held in a view's attention cache (one forward pass each).
ATTENTION_CACHE_IMAGES = 8


@dataclass
class ProbeFit:
    """A layer's coordinate probe, as the widgets need it.

    Attributes
    ----------
    layer : int
    predictions : ndarray (n_images, N, 2)
        Held-out predicted ``(row, col)`` of every patch **in cell units** (0 ..
        grid side - 1): image ``i`` is predicted by the fold model that did not see it.
    true : ndarray (N, 2)
        The patches' ``(row, col)`` cells.
    r2 : float
        Cross-validated R², mean of row and column.
    cv_r2 : ndarray (2,)
        Per column (row, col).
    probe : CoordinateProbe
        The fitted probe (``coef_``, ``predict``, ...); ``result`` is its full solve.
    r2_ci : (float, float)
        95% interval of ``r2`` (delete-one-fold jackknife, :mod:`asg_probe.probes.intervals`): it
        covers the expected R² at ``num_images`` images (R² rises with the image count).
    compression : ndarray (2,)
        Online-code compression of row and column (:mod:`asg_probe.probes.mdl`; 1 = nothing learnable).
    num_images : int
    """

    layer: int
    predictions: np.ndarray
    true: np.ndarray
    r2: float
    cv_r2: np.ndarray
    probe: CoordinateProbe
    r2_ci: tuple = (float("nan"), float("nan"))
    compression: np.ndarray = None
    num_images: int = 0

    def label(self) -> str:
        """``R² 0.57 [0.46, 0.68], 16 images``: the score as the widgets print it."""
        lo, hi = self.r2_ci
        ci = f" [{lo:.2f}, {hi:.2f}]" if lo == lo else ""
        return f"R² {self.r2:.2f}{ci}, {self.num_images} images"

    @property
    def result(self) -> RidgeCVResult:
        """The full cross-validated solve (:class:`asg_probe.probes.RidgeCVResult`)."""
        return self.probe.cv_results_

    def mean_predictions(self) -> np.ndarray:
        """Held-out predictions averaged over images, ``(N, 2)`` in cell units."""
        return self.predictions.mean(0)


@dataclass
class Embedding2D:
    """2-D layout of a layer's tokens.

    Attributes
    ----------
    xy : ndarray (M, 2)
    image : ndarray (M,)
        Image index of each point.
    patch : ndarray (M,)
        Row-major patch index of each point.
    method : str
        ``"umap"`` or ``"pca"``.
    """

    layer: int
    xy: np.ndarray
    image: np.ndarray
    patch: np.ndarray
    method: str

    def index_of(self, image: int, patch: int):
        """Row of ``xy`` holding ``(image, patch)``, or ``None`` if that token was not sampled."""
        hit = np.flatnonzero((self.image == image) & (self.patch == patch))
        return int(hit[0]) if hit.size else None


def _model_label(model, index: int) -> str:
    config = getattr(model, "asg_config", None) or {}
    return str(config.get("pos") or getattr(model, "pos", None) or f"model {index}")


@contextlib.contextmanager
def torch_threads(n):
    """Run the block with ``n`` torch intra-op threads (``None``: leave as is), then restore."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ModelView:
    """One model on one small image set, with every widget quantity computed lazily and cached.

    Parameters
    ----------
    model : nn.Module
        A timm-style ViT (``patch_embed``, ``blocks``), e.g. from :func:`asg_probe.create_model`.
    images : None, str, Path, ImageSet or tensor, optional
        As in :func:`asg_probe.layerwise_probes`; ``None`` takes ``num_images``
        embedded photographs at the model's input size.
    label : str, optional
        Name in the widgets; default: the model's ``pos``.
    num_images : int, default=16
        Used when ``images`` is ``None`` or a folder.
    img_size : int, optional
        Size of embedded/folder images (default: the model's).
    n_folds : int, default=5
        Probe cross-validation folds, split by image (fewer if there are fewer images).
    alphas : array-like, optional
        Ridge penalties searched (default :data:`asg_probe.probes.DEFAULT_ALPHAS`, extended
        past an end while a layer's CV R² still climbs towards it; a grid you pass is searched as given).
    embedding : {"umap", "pca"}, default="umap"
        2-D layout of the tokens. UMAP's first call in a process compiles numba code
        (~20 s on 2 cores), later layers take 1-3 s; ``"pca"`` is instant.
    max_embed_tokens : int, default=2048
        Tokens laid out per layer: whole images, the first ones, up to this count.
    batch_size : int, default=32
    seed : int, default=0
        Embedded-image crops and the UMAP layout.
    solver_threads : int or None, default=1
        Torch threads for the probe solves, the 2-D layout and the single-image
        attention pass (``None``: the session's setting). That work is small (D x D
        matrices, one image): threads mostly add synchronisation, and on a busy
        2-core machine a threaded 128 x 128 ``eigh`` was measured 4 to 60 times
        slower than a serial one. The batched token pass keeps the session's threads.

    Attributes
    ----------
    forward_count : int
        Forward passes this view has run (one for the tokens, one per image for attention).
    timings : dict
        Seconds spent in the last computation of each kind (``tokens``, ``probe``,
        ``attention``, ``embedding``).

    Examples
    --------
    >>> import asg_probe
    >>> from asg_probe.widgets import ModelView
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2)
    >>> view = ModelView(m, num_images=6, embedding="pca")
    >>> view.tokens(2).shape, view.probe(0).predictions.shape
    (torch.Size([6, 64, 128]), (6, 64, 2))
    >>> view.attention(1, image=0).shape  # (heads, patches, patches)
    torch.Size([4, 64, 64])
    """

    def __init__(self, model, images=None, label=None, *, num_images=16, img_size=None, n_folds=5,
                 alphas=None, embedding="umap", max_embed_tokens=2048, batch_size=32, seed=0, solver_threads=1):
        if embedding not in EMBEDDING_METHODS:
            raise ValueError(f"embedding must be one of {EMBEDDING_METHODS}, got {embedding!r}")
        self.model = model
        self.label = str(label) if label is not None else _model_label(model, 0)
        geo = model_geometry(model)
        self.patch_size, self.num_prefix_tokens, self.depth = geo.patch_size, geo.num_prefix_tokens, geo.depth
        self.num_heads = int(model.blocks[0].attn.num_heads)
        data = ImageBatches.prepare(model, images, num_images=int(num_images), img_size=img_size,
                                    batch_size=batch_size, seed=seed)
        self.inputs, self.display_images = data.tensor(), data.display().numpy()
        self.provenance = data.provenance()
        self.num_images = int(self.inputs.shape[0])
        if self.num_images < 2:
            raise ValueError(f"a view needs at least 2 images to fit a cross-validated probe, "
                             f"got {self.num_images}")
        self.grid = (self.inputs.shape[-2] // self.patch_size, self.inputs.shape[-1] // self.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.n_folds = int(min(n_folds, self.num_images))
        self.alphas = alphas  # None: the default grid, extended past an edge where needed
        self.embedding_method = embedding
        self.max_embed_tokens = int(max_embed_tokens)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.solver_threads = solver_threads
        self.forward_count = 0
        self.timings = {}
        self._tokens = None
        self._probes = {}
        self._embeddings = {}
        self._attention = OrderedDict()  # image -> {layer: (H, N, N)}, least recently used first

    def __repr__(self):
        return (f"ModelView({self.label!r}, depth={self.depth}, heads={self.num_heads}, grid={self.grid}, "
                f"images={self.num_images}, cached: tokens={self._tokens is not None}, "
                f"probes={sorted(self._probes)}, embeddings={sorted(self._embeddings)}, "
                f"attention images={list(self._attention)})")

    def cached(self, kind: str, key=None) -> bool:
        """Whether ``kind`` (``tokens``, ``probe``, ``embedding`` by layer, ``attention`` by image) is computed."""
        if kind == "tokens":
            return self._tokens is not None
        stores = {"probe": self._probes, "embedding": self._embeddings, "attention": self._attention}
        if kind not in stores:
            raise ValueError(f"kind must be 'tokens' or one of {sorted(stores)}, got {kind!r}")
        return key in stores[kind]

    # ------------------------------------------------------------------ validation

    def check_layer(self, layer) -> int:
        """``layer`` as an int in ``0..depth`` (negative counts from the end)."""
        (layer,) = resolve_layers([int(layer)], self.depth)
        return layer

    def check_image(self, image) -> int:
        image = int(image)
        if not 0 <= image < self.num_images:
            raise ValueError(f"image {image} does not exist: {self.label} has images 0..{self.num_images - 1}")
        return image

    def patch_index(self, row: int, col: int) -> int:
        """Row-major index of patch ``(row, col)``."""
        row, col = int(row), int(col)
        if not (0 <= row < self.grid[0] and 0 <= col < self.grid[1]):
            raise ValueError(f"patch ({row}, {col}) is outside the {self.grid[0]}x{self.grid[1]} grid")
        return row * self.grid[1] + col

    # ------------------------------------------------------------------ forward passes

    def _eval_forward(self, fn):
        # The model may be mid-training in the user's notebook: analyse it in eval mode
        # (no dropout) and hand it back as it was.
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return fn()
        finally:
            self.model.train(was_training)

    def tokens(self, layer) -> torch.Tensor:
        """Patch tokens of ``layer`` for every image, ``(n_images, N, D)`` float32.

        The first call runs one forward pass that records every layer.
        """
        layer = self.check_layer(layer)
        if self._tokens is None:
            start = time.perf_counter()

            def run():
                parts = {}
                for s in range(0, self.num_images, self.batch_size):
                    out = forward_tokens(self.model, self.inputs[s:s + self.batch_size], layers=None)
                    for k, v in out.items():
                        parts.setdefault(k, []).append(v.float().cpu())
                return {k: torch.cat(v) for k, v in parts.items()}

            self._tokens = self._eval_forward(run)
            self.forward_count += 1
            self.timings["tokens"] = time.perf_counter() - start
        return self._tokens[layer]

    def attention(self, layer, image) -> torch.Tensor:
        """Attention among patch tokens in block ``layer`` (1-based) for one image, ``(H, N, N)``.

        Rows are queries. Prefix tokens (class, registers) are dropped and each row
        renormalised to sum to 1, so a uniform attention reads ``1 / N`` everywhere.
        Layer 0 (the patch embedding) has no attention and raises ``ValueError``.
        """
        from ..capture import capture_attention

        layer = self.check_layer(layer)
        image = self.check_image(image)
        if layer == 0:
            raise ValueError("layer 0 is the patch embedding: it has no attention (blocks are 1..depth)")
        if image not in self._attention:
            start = time.perf_counter()

            def run():
                with capture_attention(self.model) as rec:
                    self.model.forward_features(self.inputs[image:image + 1])
                return dict(rec.attn)

            with torch_threads(self.solver_threads):  # one image: too little work to share out
                raw = self._eval_forward(run)
            self.forward_count += 1
            p = self.num_prefix_tokens
            maps = {}
            for k, a in raw.items():
                a = a[0, :, p:, p:].float().cpu()
                maps[int(k)] = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
            self._attention[image] = maps
            while len(self._attention) > ATTENTION_CACHE_IMAGES:
                self._attention.popitem(last=False)
            self.timings["attention"] = time.perf_counter() - start
        self._attention.move_to_end(image)
        return self._attention[image][layer]

    def attention_map(self, layer, image, query: int, head=None) -> np.ndarray:
        """Where patch ``query`` looks in block ``layer``: ``(grid_h, grid_w)``, sums to 1.

        ``head=None`` averages the heads.
        """
        att = self.attention(layer, image)
        query = int(query)
        if not 0 <= query < self.num_patches:
            raise ValueError(f"query patch {query} is outside 0..{self.num_patches - 1}")
        if head is None:
            row = att[:, query].mean(0)
        else:
            head = int(head)
            if not 0 <= head < att.shape[0]:
                raise ValueError(f"head {head} does not exist: {self.label} has heads 0..{att.shape[0] - 1}")
            row = att[head, query]
        return row.reshape(self.grid).numpy()

    # ------------------------------------------------------------------ probes and embeddings

    def probe(self, layer) -> ProbeFit:
        """Cross-validated ridge probe of ``layer`` with held-out predictions (cached)."""
        layer = self.check_layer(layer)
        if layer not in self._probes:
            X = self.tokens(layer)
            start = time.perf_counter()
            index = torch.arange(self.num_images)
            with torch_threads(self.solver_threads):
                probe = CoordinateProbe(n_folds=self.n_folds, control=False, alphas=self.alphas, online_code=True)
                probe.partial_fit(X, index, grid=self.grid).finalize()
                # Each image is predicted by the fold model that never saw it, so short arrows
                # mean position is decodable, not memorised.
                pred = probe.predict_heldout(X, index)                                 # (n, N, 2)
                reps = jackknife_cv_r2(probe.stats_, probe.alpha_, [0, 1])
                r2 = float(np.mean(probe.cv_r2_))
                r2_ci = tuple(jackknife_interval(r2, reps.mean(1)))
                compression = online_code(probe.stats_, probe.alpha_, [0, 1], self.grid)["compression"]
            scale = torch.tensor([max(self.grid[0] - 1, 1), max(self.grid[1] - 1, 1)], dtype=torch.float64)
            true = coordinate_targets(self.grid, dtype=torch.float64) * scale
            self._probes[layer] = ProbeFit(layer=layer, predictions=(pred * scale).numpy(), true=true.numpy(),
                                           r2=r2, cv_r2=probe.cv_r2_, probe=probe.without_stats(), r2_ci=r2_ci,
                                           compression=compression, num_images=self.num_images)
            self.timings["probe"] = time.perf_counter() - start
        return self._probes[layer]

    def r2_curve(self) -> np.ndarray:
        """Cross-validated probe R² of every layer ``0..depth``."""
        return np.array([self.probe(layer).r2 for layer in range(self.depth + 1)])

    def embedding(self, layer) -> Embedding2D:
        """2-D layout of ``layer``'s tokens (the first images, up to ``max_embed_tokens``; cached)."""
        layer = self.check_layer(layer)
        if layer not in self._embeddings:
            X = self.tokens(layer)
            start = time.perf_counter()
            n_img = int(min(self.num_images, max(1, self.max_embed_tokens // self.num_patches)))
            feats = X[:n_img].reshape(-1, X.shape[-1]).numpy()
            image = np.repeat(np.arange(n_img), self.num_patches)
            patch = np.tile(np.arange(self.num_patches), n_img)
            with torch_threads(self.solver_threads):
                # 200 UMAP epochs: settled for a few thousand tokens, at 40% of the wait
                xy, _, method = embed_2d(feats, self.seed, method=self.embedding_method, n_epochs=200)
            self._embeddings[layer] = Embedding2D(layer=layer, xy=xy, image=image, patch=patch, method=method)
            self.timings["embedding"] = time.perf_counter() - start
        return self._embeddings[layer]

    def precompute(self, layers=None, embedding=True, images=()):
        """Fill the caches now (e.g. before a demo), so later interaction never waits.

        Parameters
        ----------
        layers : iterable of int, optional
            Default: all.
        embedding : bool
            Also lay out the tokens (the slow part with UMAP).
        images : iterable of int
            Images whose attention maps to compute.
        """
        layers = range(self.depth + 1) if layers is None else [self.check_layer(x) for x in layers]
        for layer in layers:
            self.probe(layer)
            if embedding:
                self.embedding(layer)
        for image in images:
            if self.depth:
                self.attention(1, image)
        return self


def as_views(models, images=None, **view_kwargs) -> "OrderedDict[str, ModelView]":
    """``{label: ModelView}`` from a dict ``{label: model or ModelView}`` or a list of them.

    Labels of a list come from each model's ``pos``; repeats get a ``" (2)"`` suffix.
    """
    if isinstance(models, ModelView) or hasattr(models, "blocks"):
        models = [models]
    if isinstance(models, dict):
        items = [(str(k), v) for k, v in models.items()]
    else:
        items, seen = [], {}
        for i, m in enumerate(models):
            label = m.label if isinstance(m, ModelView) else _model_label(m, i)
            seen[label] = seen.get(label, 0) + 1
            items.append((label if seen[label] == 1 else f"{label} ({seen[label]})", m))
    if not items:
        raise ValueError("no models given")
    views = OrderedDict()
    for label, m in items:
        if isinstance(m, ModelView):
            views[label] = m  # the caller's key names it here; the view itself is left as it was
        else:
            views[label] = ModelView(m, images, label, **view_kwargs)
    return views
