"""Model geometry and layer numbering: the one place that reads them off a model.

Every analysis needs the same few facts about a ViT: its patch size, how many
prefix tokens (class, distillation, registers) precede the patch tokens, its
depth, and the input size and normalisation it expects. :func:`model_geometry`
reads them once, into a :class:`ModelGeometry`; :func:`resolve_layers` turns a
user's layer list into validated layer numbers.

Layer numbering (the whole package): ``0`` is the token sequence entering
block 0 (patch embedding plus whatever position the model injects there); ``i``
is the output of block ``i`` (1-based), before the final norm. Attention exists
for layers ``1..depth`` only.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

from .errors import UsageError

__all__ = ["ModelGeometry", "model_geometry", "input_config", "resolve_layers", "IMAGENET_MEAN", "IMAGENET_STD",
           "DEFAULT_IMG_SIZE"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMG_SIZE = 224


@dataclass(frozen=True)
class ModelGeometry:
    """What the analyses need to know about a ViT's token sequence and input.

    Attributes
    ----------
    patch_size : int
        Pixels per patch side (square patches).
    num_prefix_tokens : int
        Tokens before the patch tokens (class, distillation, registers).
    depth : int
        Number of blocks; layers are ``0..depth``.
    img_size : int
        Input side the model is built for.
    mean, std : tuple of float
        Input normalisation.

    Examples
    --------
    >>> g = ModelGeometry(patch_size=16, num_prefix_tokens=1, depth=12, img_size=224)
    >>> g.grid(224), g.grid((64, 32))
    ((14, 14), (4, 2))
    """

    patch_size: int
    num_prefix_tokens: int
    depth: int
    img_size: int = DEFAULT_IMG_SIZE
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def grid(self, size) -> tuple:
        """``(grid_h, grid_w)`` of an input of ``size`` (int, ``(H, W)`` or an image tensor's shape)."""
        if isinstance(size, int):
            size = (size, size)
        h, w = (int(v) for v in tuple(size)[-2:])
        return h // self.patch_size, w // self.patch_size

    def check_size(self, size) -> None:
        """Raise a one-line ``ValueError`` unless ``size`` is a multiple of the patch size."""
        h, w = (size, size) if isinstance(size, int) else (int(v) for v in tuple(size)[-2:])
        if h % self.patch_size or w % self.patch_size:
            raise UsageError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")


def _square(value, what):
    if isinstance(value, (tuple, list)):
        if len(set(int(v) for v in value)) != 1:
            raise UsageError(f"{what} must be square, got {tuple(value)}")
        value = value[0]
    return int(value)


def model_geometry(model) -> ModelGeometry:
    """Read a timm-style ViT's :class:`ModelGeometry`.

    ``img_size`` is ``model.patch_embed.img_size`` when set (a model built with an
    ``img_size`` override keeps its original ``pretrained_cfg['input_size']`` yet
    accepts only the new size), otherwise ``pretrained_cfg['input_size']``, else 224;
    ``mean``/``std`` come from ``pretrained_cfg`` (ImageNet's when absent).

    Raises
    ------
    ValueError
        The model has no ``patch_embed.patch_size`` or no ``blocks``.

    Examples
    --------
    >>> import timm
    >>> g = model_geometry(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2))
    >>> g.patch_size, g.num_prefix_tokens, g.depth, g.img_size
    (16, 1, 2, 32)
    """
    mean, std, size, patch = input_config(model)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks`: the analyses need a timm-style ViT")
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        # timm sets num_prefix_tokens on its ViTs; elsewhere guess from the class token.
        prefix = 0 if getattr(model, "cls_token", True) is None else 1
    return ModelGeometry(patch_size=patch, num_prefix_tokens=int(prefix), depth=len(blocks), img_size=size,
                         mean=mean, std=std)


def input_config(model):
    """``(mean, std, img_size, patch_size)`` of a timm-style model (see :func:`model_geometry`).

    Needs only ``patch_embed.patch_size`` (no blocks): the input side of the geometry.
    """
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed.patch_size; cannot tell its token grid")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = getattr(embed, "img_size", None) or (cfg.get("input_size") or (3, DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE))[1:]
    mean = tuple(float(v) for v in (cfg.get("mean") or IMAGENET_MEAN))
    std = tuple(float(v) for v in (cfg.get("std") or IMAGENET_STD))
    return mean, std, _square(size, "img_size"), _square(patch, "patch_size")


def resolve_layers(layers, depth, *, first=0):
    """Validated, sorted, unique layer numbers.

    Parameters
    ----------
    layers : None, int or iterable of int
        ``None`` means all of ``first..depth``; negative numbers count from the end
        (``-1`` is the last block).
    depth : int
        Number of blocks.
    first : {0, 1}
        Lowest valid layer: 0 for tokens, 1 for attention (layer 0 has none).

    Examples
    --------
    >>> resolve_layers(None, 3), resolve_layers([-1, 0, 0], 3), resolve_layers(None, 3, first=1)
    ([0, 1, 2, 3], [0, 3], [1, 2, 3])
    """
    if layers is None:
        return list(range(first, depth + 1))
    if isinstance(layers, int):
        layers = [layers]
    out = set()
    for layer in layers:
        try:
            layer = operator.index(layer)  # ints (also numpy's), not strings or floats
        except TypeError:
            raise TypeError(f"layers must be integers, got {layer!r}") from None
        layer = depth + 1 + layer if layer < 0 else layer
        if not first <= layer <= depth:
            if first == 1:
                raise UsageError(f"layer {layer} has no attention: this model's blocks are layers 1..{depth} "
                                 "(layer 0 is the patch embedding)")
            raise UsageError(f"layer {layer} does not exist: this model has layers 0..{depth}")
        out.add(layer)
    return sorted(out)
