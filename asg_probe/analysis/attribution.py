"""Attribution: which input pixels drive a coordinate probe's prediction for one patch?

A ridge probe is fit on one layer's patch tokens (streamed, alpha by
cross-validation split by image, as in :mod:`asg_probe.analysis.layerwise`).
The function *image → predicted (row, col) of the query patch at that layer* is
then attributed to the input pixels with captum (Integrated Gradients by
default, or plain gradients: ``method="saliency"``). The prediction uses the
fold model that did **not** see the explained image, so "predicted" is a
held-out prediction.

Reading the map: at layer 0 of a model without positional injection the query
token is computed from its own patch only, so all attribution falls inside the
patch. Once attention mixes tokens, pixels elsewhere can move the prediction;
position injected independently of the pixels (APE, RoPE, biases) does not show
up at all, since it has no pixel to be attributed to.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..errors import UsageError
from ..results import AnalysisResult

__all__ = ["AttributionResult", "probe_attribution", "patch_tokens_with_grad"]

METHODS = ("integrated_gradients", "saliency")
TARGETS = {"row": (0,), "col": (1,), "both": (0, 1)}
#: Largest side of the attribution maps written to JSON (larger maps are average-pooled).
JSON_MAX_SIDE = 64


class _Reached(Exception):
    """Raised by the hook once the requested layer is computed, so later blocks are skipped."""


@contextlib.contextmanager
def patch_tokens_with_grad(model, layer):
    """Differentiable access to one layer's patch tokens; the hook is always removed.

    Yields a function ``tokens(x) -> (B, N, D)`` that runs ``model`` on ``x`` up to
    ``layer`` (0 = tokens entering block 1, ``i`` = output of block ``i``), keeping
    the autograd graph (no ``no_grad``, no ``detach``), and skips later blocks.
    """
    from ..extract import _features
    from ..geometry import model_geometry, resolve_layers

    geo = model_geometry(model)
    prefix, depth = geo.num_prefix_tokens, geo.depth
    (layer,) = resolve_layers([layer], depth)
    store = {}

    def keep(tensor):
        store["tokens"] = tensor[:, prefix:]
        raise _Reached

    if layer == 0:
        handle = model.blocks[0].register_forward_pre_hook(lambda m, args: keep(args[0]))
    else:
        handle = model.blocks[layer - 1].register_forward_hook(lambda m, args, out: keep(out))

    def tokens(x):
        store.clear()
        try:
            _features(model, x)
        except _Reached:
            pass
        if "tokens" not in store:
            raise RuntimeError(f"layer {layer} was not reached by the forward pass")
        return store.pop("tokens")

    try:
        yield tokens
    finally:
        handle.remove()


def _in_patch_fraction(abs_map, patch, patch_size):
    r, c = patch
    inside = abs_map[r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size].sum()
    total = abs_map.sum()
    return float(inside / total) if total > 0 else float("nan")


def _pooled(a, max_side=JSON_MAX_SIDE):
    """Average-pool a (H, W) map by an integer factor so that no side exceeds ``max_side``."""
    H, W = a.shape
    f = int(np.ceil(max(H, W) / max_side))
    if f <= 1:
        return a, 1
    t = torch.as_tensor(np.ascontiguousarray(a))[None, None]
    return torch.nn.functional.avg_pool2d(t, f, ceil_mode=True).numpy()[0, 0], f


class AttributionResult(AnalysisResult):
    """Pixel attribution of one patch's probe prediction at one layer.

    Attributes
    ----------
    image : ndarray (H, W, 3)
        The explained image, de-normalised to [0, 1] for display.
    maps : dict
        ``{"row"|"col": (H, W)}`` attribution magnitude, ``Σ_channels |attr|``.
    signed : dict
        ``{"row"|"col": (H, W)}`` ``Σ_channels attr`` (sign: pushes the prediction up or down).
    patch : (int, int)
        The query patch ``(row, col)``.
    predicted, true : dict
        Normalised ``row``/``col`` (0..1) predicted by the held-out probe, and the truth.
    convergence_delta : dict
        Integrated Gradients' completeness error per target (None for saliency).
    """

    name = "attribution"

    def __init__(self, image, maps, signed, patch, grid, patch_size, layer, predicted, true, method,
                 convergence_delta, image_index=0, probe_r2=None, checkpoint="", n_steps=None):
        self.image = image
        self.maps = maps
        self.signed = signed
        self.patch = tuple(int(p) for p in patch)
        self.grid = tuple(int(g) for g in grid)
        self.patch_size = int(patch_size)
        self.layer = int(layer)
        self.predicted = predicted
        self.true = true
        self.method = method
        self.convergence_delta = convergence_delta
        self.image_index = int(image_index)
        self.probe_r2 = probe_r2 or {}
        self.checkpoint = checkpoint
        self.n_steps = n_steps

    @property
    def targets(self):
        return list(self.maps)

    @property
    def combined(self):
        """``Σ_targets |attr|`` summed over channels, (H, W)."""
        return sum(self.maps.values())

    def fraction_in_patch(self, target=None):
        """Share of ``|attribution|`` that lies inside the query patch (``target=None``: all targets)."""
        a = self.combined if target is None else self.maps[target]
        return _in_patch_fraction(a, self.patch, self.patch_size)

    def to_dict(self):
        combined, factor = _pooled(self.combined)
        return {
            "checkpoint": self.checkpoint, "layer": self.layer, "patch": list(self.patch),
            "grid": list(self.grid), "patch_size": self.patch_size,
            "img_size": [int(self.image.shape[0]), int(self.image.shape[1])], "image_index": self.image_index,
            "method": self.method, "n_steps": self.n_steps, "targets": self.targets,
            "predicted": self.predicted, "true": self.true, "probe_r2": self.probe_r2,
            "convergence_delta": self.convergence_delta,
            "fraction_in_patch": self.fraction_in_patch(),
            "fraction_in_patch_by_target": {t: self.fraction_in_patch(t) for t in self.targets},
            "attribution_downsample": factor,
            "attribution": combined.astype(np.float32),
            "attribution_by_target": {t: _pooled(a)[0].astype(np.float32) for t, a in self.maps.items()},
            "attribution_signed": {t: _pooled(a)[0].astype(np.float32) for t, a in self.signed.items()},
        }

    def to_frame(self):
        import pandas as pd

        rows = []
        for t in self.targets:
            rows.append({"target": t, "true": self.true[t], "predicted": self.predicted[t],
                         "error": self.predicted[t] - self.true[t], "probe_r2": self.probe_r2.get(t),
                         "fraction_in_patch": self.fraction_in_patch(t),
                         "total_abs_attribution": float(self.maps[t].sum()),
                         "convergence_delta": self.convergence_delta.get(t)})
        return pd.DataFrame(rows)

    def colour_limit(self, target=None, clip=98.0) -> float:
        """Top of the colour scale: the ``clip`` percentile of the |attribution| map(s).

        ``target=None`` takes the largest over every target, so the row and column panels share
        one scale. Pass the same value as ``plot(vmax=...)`` to several results (models, methods
        of the same quantity) to draw them on one scale.

        Examples
        --------
        >>> import numpy as np
        >>> r = AttributionResult.__new__(AttributionResult)
        >>> r.maps = {"row": np.arange(101.0).reshape(1, -1)}
        >>> r.colour_limit(clip=98), r.colour_limit(clip=100)
        (98.0, 100.0)
        """
        targets = self.targets if target is None else [target]
        top = max(float(np.percentile(self.maps[t], clip)) for t in targets)
        return top or max(float(self.maps[t].max()) for t in targets) or 1.0

    def plot(self, ax=None, vmax=None, clip=98.0):
        """The image with the query patch outlined, then one heat overlay per target (row, col).

        Every heat panel uses one colour scale, from 0 to ``vmax`` (default:
        :meth:`colour_limit` at the ``clip`` percentile over all targets); values above are
        drawn at the top colour, so diffuse attribution outside the query patch stays visible
        next to the patch's own, usually much larger, values.
        """
        from matplotlib.patches import Rectangle

        from ..plotting import panel_axes

        n = 1 + len(self.targets)
        fig, axes = panel_axes(ax, n, 3.0, 3.2)
        p, (r, c) = self.patch_size, self.patch
        gh, gw = self.grid

        def centre(row_norm, col_norm):
            return (col_norm * max(gw - 1, 1) * p + p / 2 - 0.5, row_norm * max(gh - 1, 1) * p + p / 2 - 0.5)

        def outline(a):
            a.add_patch(Rectangle((c * p - 0.5, r * p - 0.5), p, p, fill=False, ec="lime", lw=1.5))
            if set(self.predicted) == {"row", "col"}:
                a.plot(*centre(self.predicted["row"], self.predicted["col"]), "x", color="red", ms=7, mew=2,
                       label="predicted")
            a.set_xticks([])
            a.set_yticks([])

        first = axes[0]
        first.imshow(self.image)
        outline(first)
        first.set_title(f"image {self.image_index}, patch ({r}, {c})", fontsize=8)
        if set(self.predicted) == {"row", "col"}:
            first.legend(fontsize=6, loc="lower right")
        top = float(vmax) if vmax is not None else self.colour_limit(clip=clip)
        for a, t in zip(axes[1:], self.targets):
            heat = self.maps[t]
            a.imshow(self.image.mean(-1), cmap="gray")
            a.imshow(heat, cmap="inferno", alpha=0.75, vmin=0, vmax=top)
            outline(a)
            a.set_title(f"{t}: pred {self.predicted[t]:.2f} / true {self.true[t]:.2f}\n"
                        f"in patch {self.fraction_in_patch(t):.0%}", fontsize=8)
        name = {"integrated_gradients": "Integrated Gradients", "saliency": "Saliency"}[self.method]
        scale = (f"one colour scale, 0 to {top:.2g}" if vmax is not None
                 else f"one colour scale, clipped at the {clip:g}th percentile")
        title = f"{name} of the layer-{self.layer} coordinate probe ({scale})"
        if self.checkpoint:
            title += f" — {self.checkpoint}"
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        return fig


def probe_attribution(model, images=None, *, layer=-1, patch=None, image_index=0, target="both",
                      method="integrated_gradients", n_steps=50, n_folds=5, alphas=None, num_images=32,
                      img_size=None, batch_size=32, seed=0, device="cpu", progress=True, label="",
                      checkpoint=None):
    """Attribute a coordinate probe's prediction for one patch to the input pixels.

    Parameters
    ----------
    model : nn.Module
        A timm-style ViT.
    images : None, str, Path, ImageSet or tensor
        The image set the probe is fit on (as in :func:`asg_probe.layerwise_probes`);
        image ``image_index`` of it is explained.
    layer : int
        Layer of the probe (0 = tokens entering block 1, ``-1`` = last).
    patch : (int, int), optional
        Query patch ``(row, col)``; default: the grid centre.
    image_index : int
        Which image to explain.
    target : {"both", "row", "col"}
        Which predicted coordinate(s) to attribute.
    method : {"integrated_gradients", "saliency"}
        Integrated Gradients from an all-zero normalised image (the mean colour),
        or the plain gradient at the image.
    n_steps : int
        Integration steps (Integrated Gradients only).
    n_folds, alphas
        Cross-validation of the ridge probe (split by image).
    num_images, img_size, batch_size, seed, device, progress, label
        Image set, run and display name, as in :func:`asg_probe.layerwise_probes`
        (``checkpoint=``: a deprecated alias of ``label``).

    Returns
    -------
    AttributionResult

    Examples
    --------
    >>> import asg_probe
    >>> model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2)
    >>> res = probe_attribution(model, torch.randn(8, 3, 32, 32), layer=0, patch=(2, 5), n_steps=8,
    ...                         progress=False)
    >>> round(res.fraction_in_patch(), 3)   # a layer-0 token sees its own pixels only
    1.0
    """
    from captum.attr import IntegratedGradients, Saliency

    from ..extract import run_analyses
    from ..geometry import model_geometry, resolve_layers
    from ..inputs import ImageBatches, display_label
    from .layerwise import LayerwiseAccumulator

    label = display_label(label, checkpoint)
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if target not in TARGETS:
        raise UsageError(f"target must be 'row', 'col' or 'both'; got {target!r}")
    geo = model_geometry(model)
    patch_size, depth = geo.patch_size, geo.depth
    (layer,) = resolve_layers([layer], depth)
    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                batch_size=batch_size, seed=seed)
    if not 0 <= int(image_index) < data.num_images:
        raise UsageError(f"image_index {image_index} is outside the image set: pass 0..{data.num_images - 1}")
    H, W = data.img_size
    gh, gw = H // patch_size, W // patch_size
    if patch is None:
        patch = (gh // 2, gw // 2)
    try:
        row, col = (int(v) for v in patch)
    except (TypeError, ValueError):
        raise UsageError(f"patch must be a pair (row, col), got {patch!r}") from None
    if not (0 <= row < gh and 0 <= col < gw):
        raise UsageError(f"patch ({row}, {col}) is outside the {gh}x{gw} grid: pass row in 0..{gh - 1} "
                         f"and col in 0..{gw - 1}")
    if data.num_images < n_folds:
        raise UsageError(f"{data.num_images} images are too few for the {n_folds}-fold probe; "
                         f"use at least {n_folds} (num_images)")

    fitter = LayerwiseAccumulator(n_folds=n_folds, alphas=alphas, online_code=False)
    run_analyses(model, data, [fitter], layers=[layer], device=device, progress=progress,
                 desc=f"attribution: fit layer {layer}")
    fit = fitter.fitted()[layer]
    fold = int(image_index) % n_folds  # the fold model that never saw this image
    cols = list(TARGETS[target])
    weight = torch.as_tensor(fit.fold_coef_[fold][cols], dtype=torch.float32, device=device)   # (T, D)
    bias = torch.as_tensor(fit.fold_intercept_[fold][cols], dtype=torch.float32, device=device)  # (T,)
    query = row * gw + col

    one = data.subset([int(image_index)], shard=False)  # every process explains the same image
    x = one.tensor().to(device)
    names = [("row", "col")[c] for c in cols]
    model.eval().to(device)
    with patch_tokens_with_grad(model, layer) as tokens:
        def predict(inp):  # (B, 3, H, W) -> (B, T) probe prediction for the query patch
            return tokens(inp)[:, query].float() @ weight.T + bias

        inputs = x.expand(len(cols), -1, -1, -1).clone().requires_grad_(True)
        tgt = list(range(len(cols)))  # example t explains output column t
        with torch.no_grad():
            predicted = predict(x)[0].tolist()
        if method == "integrated_gradients":
            attr, delta = IntegratedGradients(predict).attribute(
                inputs, baselines=torch.zeros_like(inputs), target=tgt, n_steps=int(n_steps),
                internal_batch_size=max(len(cols), int(batch_size)), return_convergence_delta=True)
            deltas = {n: float(d) for n, d in zip(names, delta.detach().cpu())}
        else:
            attr = Saliency(predict).attribute(inputs, target=tgt, abs=False)
            deltas = {n: None for n in names}
    attr = attr.detach().float().cpu()
    maps = {n: attr[i].abs().sum(0).numpy() for i, n in enumerate(names)}
    signed = {n: attr[i].sum(0).numpy() for i, n in enumerate(names)}
    truth = [row / max(gh - 1, 1), col / max(gw - 1, 1)]
    shown = one.display()[0].numpy()
    result = AttributionResult(
        image=shown, maps=maps, signed=signed, patch=(row, col), grid=(gh, gw), patch_size=patch_size, layer=layer,
        predicted={n: float(p) for n, p in zip(names, predicted)}, true={n: truth[c] for n, c in zip(names, cols)},
        method=method, convergence_delta=deltas, image_index=image_index,
        probe_r2={n: float(fit.cv_r2_[c]) for n, c in zip(names, cols)}, checkpoint=label,
        n_steps=int(n_steps) if method == "integrated_gradients" else None)
    return result.record_inputs(data, device=device)
