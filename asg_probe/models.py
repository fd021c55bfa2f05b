"""One ViT family (timm's ``Eva``, the DINOv3 ViT class) with every positional mechanism.

``create_model(name, pos=...)`` builds a :class:`SpatialViT`. For ``pos`` in
``none``/``ape``/``rope-*`` the model *is* a timm Eva with the same state-dict
keys, so checkpoints of the public ASG code (timm DINOv3 ViTs built with
``use_abs_pos_emb``/``use_rot_pos_emb``) load unchanged. Bias-type mechanisms
convert each block's attention into :class:`~asg_probe.layers.attention.PositionalAttention`.

Examples
--------
>>> import torch
>>> model = create_model("vit_tiny_patch4_32", pos="sdt-decay", num_classes=5)
>>> model(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 5])
>>> model.forward_features(torch.randn(1, 3, 48, 40)).shape  # any multiple of the patch
torch.Size([1, 121, 128])
"""
from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.eva import Eva

from .layers.attention import GridContext, PositionalAttention
from .layers.spatial_bias import ALiBi2D, ContextAwareDecay, ManhattanDecay, RelPosBias

# pos value -> (Eva keyword arguments, attention-bias kind or None)
_POSITIONS = {
    "none": (dict(use_abs_pos_emb=False, use_rot_pos_emb=False), None),
    "ape": (dict(use_abs_pos_emb=True, use_rot_pos_emb=False), None),
    "sincos": (dict(use_abs_pos_emb=False, use_rot_pos_emb=False), None),
    # RoPE-ViT axial uses theta 100; RoPE-ViT mixed initialises learned frequencies at theta 10.
    "rope-axial": (dict(use_abs_pos_emb=False, use_rot_pos_emb=True, rope_type="cat",
                        rope_temperature=100.0, rope_rotate_half=False), None),
    "rope-mixed": (dict(use_abs_pos_emb=False, use_rot_pos_emb=True, rope_type="mixed",
                        rope_temperature=10.0, rope_rotate_half=False), None),
    "rope-dinov3": (dict(use_abs_pos_emb=False, use_rot_pos_emb=True, rope_type="dinov3",
                         rope_temperature=100.0, rope_rotate_half=True), None),
    "alibi2d": (dict(use_abs_pos_emb=False, use_rot_pos_emb=False), "alibi2d"),
    "relpos": (dict(use_abs_pos_emb=False, use_rot_pos_emb=False), "relpos"),
    "rmt-decay": (dict(use_abs_pos_emb=False, use_rot_pos_emb=False), "rmt"),
    "sdt-decay": (dict(use_abs_pos_emb=False, use_rot_pos_emb=False), "sdt"),
}
# Eva arguments that `pos` decides; passing them as well would be ambiguous.
_POSITION_KEYS = {"use_abs_pos_emb", "use_rot_pos_emb", "rope_type", "rope_temperature", "rope_rotate_half"}
DECAY_FORMS = ("full", "decomposed", "hybrid")

_COMMON = dict(dynamic_img_size=True, use_fc_norm=False, class_token=True, global_pool="avg")
_MODEL_CONFIGS = {
    # CPU-scale models: train in minutes on two cores.
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4,
                               mlp_ratio=4.0, qkv_bias=True),
    "vit_tiny_patch8_64": dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3,
                               mlp_ratio=4.0, qkv_bias=True),
    # The paper's backbones: timm's DINOv3 ViT-S/16 and ViT-B/16 (1 cls + 4 registers, layer scale).
    "vit_small_patch16_dinov3": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                     qkv_bias=False, init_values=1e-5, num_reg_tokens=4),
    "vit_base_patch16_dinov3": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                    qkv_bias=False, init_values=1e-5, num_reg_tokens=4),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODEL_CONFIGS)


def list_positions() -> list[str]:
    """Values accepted by ``create_model(..., pos=...)``."""
    return list(_POSITIONS)


class SpatialViT(Eva):
    """timm ``Eva`` with a named positional mechanism ``pos``.

    Parameters
    ----------
    pos : str
        One of :func:`list_positions`.
    decay_form : {"full", "decomposed", "hybrid"}
        For ``rmt-decay``/``sdt-decay``: full 2D bias, axial two-pass form, or axial in
        the first half of the blocks and full in the second (SDT's early/late split).
    decay_r : float
        RMT's ``r`` in ``log γ_h = log(1 - 2^(-2 - r h / n))``.
    **kwargs
        Passed to ``timm.models.eva.Eva``.
    """

    def __init__(self, pos: str = "none", decay_form: str = "full", decay_r: float = 4.0, **kwargs):
        if pos not in _POSITIONS:
            raise ValueError(f"unknown pos {pos!r}; choose one of: {', '.join(_POSITIONS)}")
        clash = _POSITION_KEYS & set(kwargs)
        if clash:
            raise ValueError(f"{sorted(clash)} are set by pos={pos!r}; pass pos= only")
        if decay_form not in DECAY_FORMS:
            raise ValueError(f"decay_form must be one of {DECAY_FORMS}, got {decay_form!r}")
        if not kwargs.get("dynamic_img_size", True):
            raise ValueError("SpatialViT needs dynamic_img_size=True (every mechanism works at any grid)")
        eva_kwargs, bias_kind = _POSITIONS[pos]
        super().__init__(**{**kwargs, **eva_kwargs, "dynamic_img_size": True})
        self.pos = pos
        self.decay_form = decay_form
        self.decay_r = float(decay_r)
        self.grid_context = GridContext()
        if bias_kind is not None:
            self._convert_attention(bias_kind)

    def _convert_attention(self, bias_kind):
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            heads = block.attn.num_heads
            if bias_kind == "alibi2d":
                spatial = ALiBi2D(heads)
            elif bias_kind == "relpos":
                spatial = RelPosBias(heads, self.patch_embed.grid_size)
            elif bias_kind == "rmt":
                spatial = ManhattanDecay(heads, self.decay_r)
            else:
                spatial = ContextAwareDecay(self.embed_dim, heads, self.decay_r)
            decomposed = bias_kind in ("rmt", "sdt") and (
                self.decay_form == "decomposed" or (self.decay_form == "hybrid" and i < depth // 2))
            PositionalAttention.convert(block.attn, spatial=spatial, context=self.grid_context,
                                        decomposed=decomposed)

    def init_weights(self, needs_reset: bool = True):
        super().init_weights(needs_reset=needs_reset)
        # timm's init re-draws every nn.Linear; put the spatial modules back at their own
        # initialisation (SDT must start exactly at RMT).
        for module in self.modules():
            if module is not self and hasattr(module, "spatial") and hasattr(module.spatial, "reset_parameters"):
                module.spatial.reset_parameters()

    def _pos_embed(self, x):
        # x is NHWC here (dynamic_img_size), the only place where the grid is known.
        B, H, W, C = x.shape
        self.grid_context.grid = (H, W)
        if self.pos == "sincos":
            x = x + sincos_2d(H, W, C, device=x.device, dtype=x.dtype)
        return super()._pos_embed(x)

    def no_weight_decay(self):
        names = set(super().no_weight_decay())
        for name, _ in self.named_parameters():
            if name.endswith(("rel_pos_table", "spatial.alpha")):
                names.add(name)
        return names


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0, device=None, dtype=None):
    """Fixed 2D sin-cos embedding ``(grid_h, grid_w, dim)`` built with timm's helper.

    Quarter of the channels each: ``sin(row ω)``, ``sin(col ω)``, ``cos(row ω)``, ``cos(col ω)``
    with ``ω_k = temperature^(-k / (dim/4))``; recomputed for every grid, so no interpolation.
    """
    emb = build_sincos2d_pos_embed([grid_h, grid_w], dim=dim, temperature=temperature, device=device)
    return emb.reshape(grid_h, grid_w, dim).to(dtype or torch.float32)


def create_model(name: str, pos: str = "none", pretrained: bool = False, **kwargs) -> SpatialViT:
    """Build a registered ViT with positional mechanism ``pos``.

    Parameters
    ----------
    name : str
        One of :func:`list_models`.
    pos : str
        One of :func:`list_positions`.
    pretrained : bool
        Must be False: weights cannot be downloaded here; use :func:`asg_probe.load_checkpoint`.
    **kwargs
        Overrides of the config (``num_classes``, ``img_size``, ``num_reg_tokens``, ``depth``, ...)
        and ``decay_form``/``decay_r`` for the decay mechanisms.

    Returns
    -------
    SpatialViT
        With ``model.asg_config = {"name", "pos", "kwargs"}``, everything needed to rebuild it.

    Examples
    --------
    >>> m = create_model("vit_tiny_patch4_32", pos="rope-mixed", num_classes=10)
    >>> m.pos, m.num_prefix_tokens
    ('rope-mixed', 1)
    """
    if name not in _MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    if pretrained:
        raise ValueError("pretrained weights cannot be downloaded; build the model and use "
                         "asg_probe.load_checkpoint(path) instead")
    config = {**_COMMON, **_MODEL_CONFIGS[name], **kwargs}
    if name.endswith("dinov3"):
        config.setdefault("norm_layer", partial(LayerNorm, eps=1e-5))
    model = SpatialViT(pos=pos, **config)
    img = config["img_size"]
    img = (img, img) if isinstance(img, int) else tuple(img)
    model.pretrained_cfg = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                                input_size=(3, *img), interpolation="bicubic", crop_pct=1 / 1.143)
    model.asg_config = {"name": name, "pos": pos, "kwargs": copy.deepcopy(kwargs)}
    return model
