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

import math
import operator
import weakref
from dataclasses import dataclass

import contextlib

from .errors import InputError, UsageError

__all__ = ["ModelGeometry", "model_geometry", "input_config", "resolve_layers", "any_input_size", "IMAGENET_MEAN",
           "IMAGENET_STD", "DEFAULT_IMG_SIZE", "NO_GRID_HELP"]

#: What a model needs for asg_probe to read it, said at the end of every refusal.
NO_GRID_HELP = ("asg_probe reads models with a 2D grid of tokens: timm ViTs (patch_embed + blocks) and timm "
                "backbones with forward_intermediates; see README's compatibility table")

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
    img_size : int or (int, int)
        Input size the model is built for: its side, or ``(H, W)`` when not square.
    mean, std : tuple of float
        Input normalisation.
    token_attention : bool
        Whether the blocks' attention is over tokens (False for XCiT, whose
        cross-covariance attention is over channels, and for every ``"intermediates"`` model).
    kind : {"vit", "intermediates"}
        ``"vit"``: one token sequence through ``model.blocks``, read by hooks (layers
        ``0..depth``, one grid). ``"intermediates"``: a grid backbone (hierarchical or
        windowed: Swin, Hiera, MViTv2, PVTv2, ...) read through timm's
        ``forward_intermediates``; layer ``i`` is its ``i``-th feature map (layers
        ``1..depth``), each with its own grid and stride.
    strides : tuple of int
        ``"intermediates"`` only: the declared stride (pixels per token) of layers
        ``1..depth`` (timm's ``feature_info`` reductions). The grids actually used are
        read off each batch's feature maps.

    Examples
    --------
    >>> g = ModelGeometry(patch_size=16, num_prefix_tokens=1, depth=12, img_size=224)
    >>> g.grid(224), g.grid((64, 32))
    ((14, 14), (4, 2))
    """

    patch_size: int
    num_prefix_tokens: int
    depth: int
    img_size: int | tuple = DEFAULT_IMG_SIZE
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    token_attention: bool = True
    kind: str = "vit"
    strides: tuple = ()

    @property
    def first_layer(self) -> int:
        """Lowest layer: 0 (tokens entering block 0) for ``"vit"``, 1 (first feature map) otherwise."""
        return 0 if self.kind == "vit" else 1

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this: the patch, or a grid backbone's largest stride."""
        return max((self.patch_size, *self.strides))

    def grid(self, size) -> tuple:
        """``(grid_h, grid_w)`` of an input of ``size`` (int, ``(H, W)`` or an image tensor's shape)."""
        if isinstance(size, int):
            size = (size, size)
        h, w = (int(v) for v in tuple(size)[-2:])
        return h // self.patch_size, w // self.patch_size

    def check_size(self, size) -> None:
        """Raise a one-line ``ValueError`` unless ``size`` is a multiple of the patch size
        (of the largest stride, for a grid backbone)."""
        h, w = (size, size) if isinstance(size, int) else (int(v) for v in tuple(size)[-2:])
        step = self.size_multiple
        if h % step or w % step:
            what = "patch size" if step == self.patch_size else "largest stride"
            raise UsageError(f"image size {h}x{w} is not a multiple of the {what} {step}")


def _square(value, what):
    if isinstance(value, (tuple, list)):
        if len(set(int(v) for v in value)) != 1:
            raise UsageError(f"{what} must be square, got {tuple(value)}")
        value = value[0]
    return int(value)


def model_geometry(model) -> ModelGeometry:
    """Read a ViT's :class:`ModelGeometry` from the model itself (cached per model until what it declares changes).

    The patch grid and the prefix tokens are *measured*: one blank image at the
    model's input size runs up to the first block (in eval mode, without gradients;
    the model's mode is restored), and

    * the patch count comes from the patch embedding's output, so a hybrid's grid
      follows its backbone's stride (``patch_size`` is the effective stride in
      pixels, ``img_size / grid``), whatever ``patch_embed.patch_size`` says;
    * the prefix tokens are the tokens entering the first block beyond the patches:
      2 for DeiT-distilled, 0 for GAP models and for CaiT and XCiT, whose class token
      joins only in their last (class-attention) blocks, registers included.

    Where the model cannot be run that way (a patch embedding that is not a
    module, an error), ``patch_embed.patch_size`` and ``model.num_prefix_tokens``
    are used as they are. ``img_size`` is ``model.patch_embed.img_size`` when set (a
    model built with an ``img_size`` override keeps its original
    ``pretrained_cfg['input_size']`` yet accepts only the new size), otherwise
    ``pretrained_cfg['input_size']``, else 224; ``mean``/``std`` come from
    ``pretrained_cfg`` (ImageNet's when absent).

    A model without that ViT layout (no ``blocks``, or a patch embedding without
    ``patch_size``: Swin, Hiera, MViTv2, PVTv2, NesT, VOLO, CoaT, ...) that implements
    timm's ``forward_intermediates`` and ``feature_info`` is a grid backbone
    (``kind="intermediates"``): ``depth`` is its number of feature maps, ``patch_size``
    the stride of the first, ``strides`` those of all.

    Raises
    ------
    InputError
        The model has neither layout: it has no 2D token grid that asg_probe can read.

    Examples
    --------
    >>> import timm
    >>> g = model_geometry(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2))
    >>> g.patch_size, g.num_prefix_tokens, g.depth, g.img_size, g.token_attention
    (16, 1, 2, 32, True)
    >>> model_geometry(timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1)).num_prefix_tokens
    2
    """
    blocks = getattr(model, "blocks", None)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if blocks is None or not hasattr(blocks, "__len__") or len(blocks) == 0 or patch is None:
        return _grid_backbone_geometry(model)
    config = input_config(model)
    # what the model declares: if it changes (timm's set_input_size, a new patch
    # embedding), the cached measurement no longer holds
    declared = (config, getattr(model, "num_prefix_tokens", None), len(blocks))
    try:
        cached = _CACHE.get(model)
    except TypeError:  # not weak-referenceable: measure every time
        cached = None
    if cached is not None and cached[0] == declared:
        return cached[1]
    mean, std, size, patch = config
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = 0 if getattr(model, "cls_token", True) is None else 1
    measured = _measure(model, size)
    if measured is not None:
        patch, prefix = measured
    geo = ModelGeometry(patch_size=patch, num_prefix_tokens=int(prefix), depth=len(blocks), img_size=size,
                        mean=mean, std=std, token_attention=not _channel_attention(blocks[0]))
    try:
        _CACHE[model] = (declared, geo)
    except TypeError:
        pass
    return geo


_CACHE = weakref.WeakKeyDictionary()


def _grid_backbone_geometry(model) -> ModelGeometry:
    """Geometry of a timm backbone read through ``forward_intermediates`` (see :func:`model_geometry`)."""
    info = getattr(model, "feature_info", None)
    if not callable(getattr(model, "forward_intermediates", None)) or not isinstance(info, (list, tuple)) or not info:
        raise InputError(f"{type(model).__name__} has no 2D token grid that asg_probe can read: it is neither a "
                         f"ViT (patch_embed.patch_size + blocks) nor a timm backbone with forward_intermediates; "
                         f"{NO_GRID_HELP}")
    strides = tuple(int(f.get("reduction", 1)) for f in info)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or getattr(model, "img_size", None)
    if size is None:
        size = (cfg.get("input_size") or (3, DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE))[1:]
    size = tuple(int(v) for v in size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    mean = tuple(float(v) for v in (cfg.get("mean") or IMAGENET_MEAN))
    std = tuple(float(v) for v in (cfg.get("std") or IMAGENET_STD))
    return ModelGeometry(patch_size=strides[0], num_prefix_tokens=0, depth=len(strides),
                         img_size=size[0] if size[0] == size[1] else size, mean=mean, std=std,
                         token_attention=False, kind="intermediates", strides=strides)


class _Stop(Exception):
    pass


def _channel_attention(block) -> bool:
    # XCiT's cross-covariance attention (timm's XCA) mixes channels, not tokens: its
    # (d x d) maps have no query or key patch.
    return any(type(m).__name__ == "XCA" for m in block.modules())


def _measure(model, size):
    """``(stride, prefix)`` seen on one blank ``size × size`` image, or ``None`` when it cannot be seen."""
    import torch

    embed = getattr(model, "patch_embed", None)
    if not isinstance(embed, torch.nn.Module):
        return None
    seen = {}

    def embedded(module, args, out):
        out = out[0] if isinstance(out, (tuple, list)) else out
        seen["embed"] = tuple(out.shape)

    def entering(module, args):
        seen["tokens"] = tuple(args[0].shape)
        raise _Stop

    try:
        param = next(model.parameters())
    except StopIteration:
        return None
    handles = [embed.register_forward_hook(embedded), model.blocks[0].register_forward_pre_hook(entering)]
    was_training = model.training
    try:
        model.eval()
        height, width = (size, size) if isinstance(size, int) else size
        x = torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            (model.forward_features if hasattr(model, "forward_features") else model)(x)
    except _Stop:
        pass
    except Exception:  # noqa: BLE001 - any failure: fall back to the declared geometry
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    tokens, out = seen.get("tokens"), seen.get("embed")
    if tokens is not None and len(tokens) == 4:
        # blocks that take an NHWC grid (SAM-ViT): no prefix tokens, the grid is the tensor's
        tokens = (tokens[0], tokens[1] * tokens[2], tokens[3])
    if tokens is None or out is None or len(tokens) != 3:
        return None
    dim = tokens[-1]
    if len(out) == 3 and out[-1] == dim:          # (B, N, D)
        patches = out[1]
    elif len(out) == 4 and out[-1] == dim:        # (B, H, W, D)
        patches = out[1] * out[2]
    elif len(out) == 4 and out[1] == dim:         # (B, D, H, W)
        patches = out[2] * out[3]
    else:
        return None
    # patches = (H / stride) * (W / stride): the stride is the side of one patch's pixel area
    area, rest = divmod(height * width, patches)
    stride = math.isqrt(area)
    if rest or stride * stride != area or height % stride or width % stride or not 0 <= tokens[1] - patches <= 64:
        return None
    return stride, tokens[1] - patches


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
    size = tuple(int(v) for v in size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return mean, std, size[0] if size[0] == size[1] else size, _square(patch, "patch_size")


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
        given, layer = layer, depth + 1 + layer if layer < 0 else layer
        if not first <= layer <= depth:
            # the message names the value the user gave, and both ways of counting
            counted = f"{first}..{depth}, or {first - depth - 1}..-1 counted from the end"
            if first == 1:
                raise UsageError(f"layer {given} has no attention: this model's blocks are layers {counted} "
                                 "(layer 0 is the patch embedding)")
            raise UsageError(f"layer {given} does not exist: this model has layers {counted}")
        out.add(layer)
    return sorted(out)


@contextlib.contextmanager
def any_input_size(model):
    """Let a timm ViT built for one input size take any size (multiple of the patch) while in the block.

    Models with ``dynamic_img_size=True`` (every asg_probe model) are left alone.
    For the others timm's own dynamic path is switched on (the patch embedding
    returns NHWC and the absolute position table is resampled to the grid, as
    ``timm.layers.resample_abs_pos_embed`` does for ``dynamic_img_size=True``) and
    switched off again on exit, also after an exception. At the model's own size the
    outputs are unchanged. Every forward pass of the analyses runs inside it.

    Examples
    --------
    >>> import timm, torch
    >>> m = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    >>> with any_input_size(m):
    ...     tuple(m.forward_features(torch.zeros(1, 3, 64, 48)).shape)
    (1, 13, 192)
    """
    pe = getattr(model, "patch_embed", None)
    if getattr(model, "dynamic_img_size", True) or pe is None or not hasattr(pe, "strict_img_size"):
        yield model
        return
    from timm.layers import Format

    saved = (model.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt)
    try:
        model.dynamic_img_size = True
        pe.strict_img_size, pe.flatten, pe.output_fmt = False, False, Format.NHWC
        yield model
    finally:
        model.dynamic_img_size = saved[0]
        pe.strict_img_size, pe.flatten, pe.output_fmt = saved[1:]
