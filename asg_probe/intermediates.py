"""Per-layer tokens of grid backbones, from timm's own ``forward_intermediates``.

Hierarchical and windowed backbones (Swin, Hiera, MViTv2, PVTv2, Twins, NesT, VOLO,
CoaT, MCi, and CNNs alike) do not keep one token sequence through ``model.blocks``:
their grid shrinks from stage to stage, windows are partitioned and merged, and a
class token may join late. Rather than one set of hooks per family, asg_probe asks
the model for its feature maps, as timm itself does for detection and
segmentation: ``forward_intermediates(x, indices=..., output_fmt="NCHW",
intermediates_only=True)``. Each map ``(B, C, h, w)`` becomes ``h * w`` tokens in
row-major order with its own grid ``(h, w)``; the stride of a layer is the input
side over its grid side.

Layer numbering for these models (:func:`asg_probe.geometry.model_geometry` says
``kind="intermediates"``): layer ``i`` (1-based) is the ``i``-th feature map timm
returns (its ``feature_info`` entry ``i - 1``, usually the end of a stage).

An input size the model was not built for goes through timm's ``set_input_size``
(position tables resampled as timm does, windows and masks rebuilt) on a copy of the
model, so the caller's model is never changed.
"""
from __future__ import annotations

import copy

import torch

from .errors import InputError, UsageError

__all__ = ["intermediate_tokens", "at_input_size"]


def _one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def at_input_size(model, size):
    """``model`` itself at its own size (or where timm has no ``set_input_size`` for it: convolutional
    models take any size), else a copy resized by timm's ``set_input_size`` to ``size`` (H, W).

    Raises
    ------
    InputError
        timm refuses to resize the model to ``size``.
    """
    from .geometry import model_geometry

    size = tuple(int(v) for v in size)
    native = model_geometry(model).img_size
    native = (native, native) if isinstance(native, int) else tuple(native)
    if size == native or not callable(getattr(model, "set_input_size", None)):
        return model
    work = copy.deepcopy(model)
    try:
        work.set_input_size(img_size=size)
    except Exception as exc:  # noqa: BLE001 - timm's own refusal, reported in one line
        raise InputError(f"{type(model).__name__} cannot be resized from {native[0]}x{native[1]} to "
                         f"{size[0]}x{size[1]} ({_one_line(exc)}); pass --img-size {native[0]}") from None
    return work


def intermediate_tokens(model, x, layers):
    """``({layer: (B, h*w, C)}, {layer: (h, w)})`` for 1-based ``layers``, from ``forward_intermediates``.

    Examples
    --------
    >>> import timm, torch
    >>> m = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(1, 1),
    ...                       num_heads=(1, 2), window_size=4).eval()
    >>> tokens, grids = intermediate_tokens(m, torch.zeros(2, 3, 32, 32), [1, 2])
    >>> tuple(tokens[1].shape), grids
    ((2, 64, 16), {1: (8, 8), 2: (4, 4)})
    """
    layers = sorted(int(l) for l in layers)
    if not layers:
        return {}, {}
    try:
        with torch.no_grad():
            maps = model.forward_intermediates(x, indices=[l - 1 for l in layers], output_fmt="NCHW",
                                               intermediates_only=True)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise InputError(f"{type(model).__name__} did not run on {x.shape[-2]}x{x.shape[-1]} inputs "
                         f"({_one_line(exc)}); pass the size it was built for (--img-size)") from None
    if len(maps) != len(layers):
        raise InputError(f"{type(model).__name__}.forward_intermediates returned {len(maps)} maps for "
                         f"{len(layers)} layers; read it as a plain timm ViT or pass other layers")
    tokens, grids = {}, {}
    for layer, fmap in zip(layers, maps):
        if fmap.ndim != 4:
            raise UsageError(f"layer {layer} of {type(model).__name__} is not a 2D feature map "
                             f"(shape {tuple(fmap.shape)})")
        b, c, h, w = fmap.shape
        tokens[layer] = fmap.detach().flatten(2).transpose(1, 2)   # (B, h*w, C), row-major
        grids[layer] = (int(h), int(w))
    return tokens, grids
