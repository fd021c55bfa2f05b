"""open_clip image towers, seen by asg_probe as timm ViTs.

:func:`from_open_clip` takes an ``open_clip.create_model(...)`` model (or its ``.visual``)
and returns what every analysis reads:

* a timm trunk (``TimmModel`` towers: SigLIP, ConvNeXt, ...) as it is, with open_clip's
  mean/std;
* open_clip's own ``VisionTransformer`` wrapped in :class:`OpenCLIPViT`: ``blocks`` are
  its ``transformer.resblocks`` (batch-first, tensor in, tensor out), one class token,
  the position table resampled at other input sizes as timm does
  (``timm.layers.resample_abs_pos_embed``), ``ln_pre`` before the blocks.

open_clip's blocks use ``nn.MultiheadAttention``; its fused fast path never calls
``scaled_dot_product_attention``, so :class:`OpenCLIPViT` turns the fast path off during its
own forward (and restores it): the attention then goes through
``F.multi_head_attention_forward`` → SDPA, where :func:`asg_probe.capture.capture_attention`
reads it. Outputs are the same up to float rounding.

``open_clip`` is the optional extra ``openclip`` (``pip install 'asg-probe[openclip]'``),
imported only here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .errors import CheckpointError

__all__ = ["OpenCLIPViT", "from_open_clip", "load_open_clip"]


class _Geometry:
    def __init__(self, patch_size, img_size, grid_size):
        self.patch_size, self.img_size, self.grid_size = tuple(patch_size), tuple(img_size), tuple(grid_size)


class _Heads:
    def __init__(self, num_heads):
        self.num_heads = int(num_heads)


def _config(visual):
    size = getattr(visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    mean = tuple(getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = tuple(getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    return {"mean": mean, "std": std, "input_size": (3, *size), "architecture": type(visual).__name__,
            "source": "open_clip"}


class OpenCLIPViT(nn.Module):
    """open_clip's ``VisionTransformer`` with a timm ``VisionTransformer``'s interface.

    Examples
    --------
    >>> import open_clip, torch
    >>> visual = open_clip.create_model("ViT-B-32", pretrained=None).visual   # doctest: +SKIP
    >>> m = OpenCLIPViT(visual)                                                # doctest: +SKIP
    >>> m.forward_features(torch.randn(1, 3, 64, 64)).shape                    # doctest: +SKIP
    torch.Size([1, 5, 768])
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        for block in self.blocks:
            if not hasattr(getattr(block, "attn", None), "num_heads"):
                raise CheckpointError(f"{type(block).__name__}: an open_clip block without attention heads")
        patch = tuple(int(v) for v in (visual.patch_size if isinstance(visual.patch_size, (tuple, list))
                                       else (visual.patch_size, visual.patch_size)))
        self.pretrained_cfg = _config(visual)
        size = self.pretrained_cfg["input_size"][1:]
        self.patch_embed = _Geometry(patch, size, (size[0] // patch[0], size[1] // patch[1]))
        self.num_prefix_tokens = 1
        self.cls_token = True
        self.dynamic_img_size = True
        self.embed_dim = self.num_features = int(visual.class_embedding.shape[-1])

    @property
    def pos_embed(self) -> torch.Tensor:
        """The position table as ``(1, 1 + grid_h * grid_w, D)``."""
        return self.visual.positional_embedding[None]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens entering block 0: class token, then patches row-major, position added, ``ln_pre``."""
        from timm.layers import resample_abs_pos_embed

        v = self.visual
        x = v.conv1(x)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = self.pos_embed
        if grid != self.patch_embed.grid_size:
            pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(self.patch_embed.grid_size),
                                         num_prefix_tokens=1)
        return v.ln_pre(v.patch_dropout(x + pos.to(x.dtype)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings → blocks → ``ln_post``, every token: ``(B, 1 + N, D)``."""
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # attention through SDPA, where it can be read
        try:
            h = self.embed(x)
            for block in self.blocks:
                h = block(h)
            return self.visual.ln_post(h)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)

    def forward(self, x):
        return self.forward_features(x)


def from_open_clip(model) -> nn.Module:
    """What the analyses read from an ``open_clip.create_model(...)`` model or its ``.visual``.

    Raises
    ------
    CheckpointError
        A tower that is neither open_clip's ViT nor a timm trunk (ModifiedResNet, ...): one line.
    """
    visual = getattr(model, "visual", model)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:   # TimmModel: the timm model itself, with open_clip's preprocessing
        cfg = dict(getattr(trunk, "pretrained_cfg", None) or {})
        own = _config(visual)
        cfg.update(mean=own["mean"], std=own["std"])
        trunk.pretrained_cfg = cfg
        return trunk.eval()
    if hasattr(visual, "transformer") and hasattr(visual, "conv1") and hasattr(visual, "class_embedding"):
        return OpenCLIPViT(visual).eval()
    raise CheckpointError(f"open_clip tower {type(visual).__name__} is not read by asg_probe (it reads open_clip's "
                          "VisionTransformer and timm-trunk towers)")


def load_open_clip(name: str, *, pretrained=None, map_location="cpu") -> nn.Module:
    """``open_clip:ARCH`` or ``open_clip:ARCH:TAG``: ``open_clip.create_model(ARCH, pretrained=TAG or file)``.

    ``pretrained`` (a weights file, e.g. from ``--arch``'s checkpoint) overrides ``TAG``.
    Without either the weights are random (for testing the plumbing). A tag that must
    be downloaded follows open_clip (Hugging Face hub cache, ``HF_HUB_OFFLINE``).
    """
    try:
        import open_clip
    except ImportError:
        raise CheckpointError("open_clip models need the `open_clip_torch` package: "
                              "pip install 'asg-probe[openclip]'") from None
    arch, _, tag = name.partition(":")
    if arch not in open_clip.list_models():
        raise CheckpointError(f"open_clip:{arch}: open_clip has no such model (see open_clip.list_models())")
    weights = pretrained or tag or None
    try:
        model = open_clip.create_model(arch, pretrained=weights)
    except Exception as exc:  # noqa: BLE001 - download, tag or file errors: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"open_clip:{name}: open_clip could not load weights {weights!r} ({first}); "
                              "check the tag (open_clip.list_pretrained()), the network or HF_HUB_OFFLINE") from None
    out = from_open_clip(model).to(map_location).eval()
    out.asg_meta = {"checkpoint": f"open_clip:{name}", "checkpoint_format": "open_clip",
                    "inferred": {"arch": "open_clip model name"}, "weights": weights or "random"}
    return out
