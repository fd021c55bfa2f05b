"""Which ViT families asg_probe reads: the list behind README's compatibility table.

Each :class:`Arch` is built with random weights at a small size (2 blocks, narrow,
small input) and run through :func:`asg_probe.layerwise_probes` (first and last
layer) and :func:`asg_probe.attention_distance` on a few photographs.
``tests/test_compat.py`` does this for every entry; ``python -m asg_probe.compat
--markdown`` does the same and prints the table for README.

Examples
--------
>>> [a.name for a in ARCHITECTURES if a.family.startswith("DeiT")][:2]
['deit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224']
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Arch", "ARCHITECTURES", "build", "check", "markdown"]

NUM_IMAGES = 6
_NARROW = {"embed_dim": 64, "num_heads": 2}


@dataclass(frozen=True)
class Arch:
    """One row of the table.

    Attributes
    ----------
    family, source : str
        What README shows (``source`` is ``"timm"`` or ``"transformers"``).
    name : str
        timm model name, or the ``transformers`` class name.
    kwargs : dict
        Shrinking arguments: timm ``create_model`` kwargs, or the ``transformers`` config's.
    note : str
        Shown in the table.
    pending : str
        Non-empty while asg_probe cannot read this architecture yet: why (the test
        expects the failure, strictly, so it flips once fixed).
    no_attention : str
        Non-empty where attention distance is undefined and must refuse (its message
        must contain this text).
    factory : str
        For families whose timm entry points fix the sizes (NesT, VOLO, MViTv2): the timm
        class, ``"module:Class"`` under ``timm.models``, built with ``kwargs``; ``name``
        is then the registered model the class stands for.
    input_size : int
        Image side the analyses run at (0: the model's own).
    """

    family: str
    source: str
    name: str
    kwargs: dict = field(default_factory=dict)
    note: str = ""
    pending: str = ""
    no_attention: str = ""
    factory: str = ""
    input_size: int = 0


def _timm(family, name, note="", pending="", no_attention="", img_size=64, narrow=True, **kw):
    kwargs = {"img_size": img_size, "depth": 2, **(_NARROW if narrow else {}), **kw}
    return Arch(family, "timm", name, kwargs, note, pending, no_attention)


#: The refusal of attention analyses on grid backbones (see :mod:`asg_probe.intermediates`).
_GRID_REFUSAL = "grid backbone"


def _grid(family, name, note, factory="", windowed=False, **kw):
    """A hierarchical or windowed backbone, read through ``forward_intermediates`` at 64 px; ``windowed``:
    its attention distance is measured within windows (:func:`asg_probe.attention_distance`), else refused."""
    return Arch(family, "timm", name, kw, note, no_attention="" if windowed else _GRID_REFUSAL, factory=factory,
                input_size=64)


def _mvitv2_cfg():
    from timm.models.mvitv2 import MultiScaleVitCfg

    return MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1)


def _hf(family, cls, note="", **kw):
    config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": 32, "patch_size": 8, **kw}
    return Arch(family, "transformers", cls, config, note)


ARCHITECTURES = [
    _timm("ViT", "vit_tiny_patch16_224", "class token, learned APE"),
    _timm("MAE", "vit_base_patch16_224", "ViT-B architecture of the `.mae` weights"),
    _timm("DeiT", "deit_tiny_patch16_224"),
    _timm("DeiT distilled", "deit_tiny_distilled_patch16_224", "class + distillation token"),
    _timm("DeiT-3", "deit3_small_patch16_224", "layer scale, APE without prefix entries"),
    _timm("DINOv2", "vit_small_patch14_dinov2", img_size=56),
    _timm("DINOv2 + registers", "vit_small_patch14_reg4_dinov2", "1 class + 4 register tokens", img_size=56),
    _timm("DINOv3", "vit_small_patch16_dinov3", "RoPE, registers (Eva)"),
    _timm("CLIP", "vit_base_patch16_clip_224", "pre-norm"),
    _timm("SigLIP", "vit_base_patch16_siglip_224", "no class token, attention-pool head"),
    _timm("GAP ViT", "vit_base_patch16_gap_224", "no class token, mean pool"),
    _timm("register ViT", "vit_betwixt_patch16_reg4_gap_256", "4 registers, no class token"),
    _timm("EVA-02", "eva02_tiny_patch14_224", "RoPE, SwiGLU", img_size=56),
    _timm("BEiT", "beit_base_patch16_224", "relative position bias"),
    _timm("BEiT v2", "beitv2_base_patch16_224", "relative position bias"),
    _timm("FlexiViT", "flexivit_small", "resizable patch embedding", img_size=60, patch_size=15),
    _timm("RoPE-ViT (axial)", "vit_base_patch16_rope_224", "RoPE, no APE"),
    _timm("RoPE-ViT (mixed)", "vit_base_patch16_rope_mixed_224", "learned-frequency RoPE"),
    _timm("RoPE-ViT (mixed + APE)", "vit_base_patch16_rope_mixed_ape_224"),
    _timm("RoPE-ViT (register, GAP)", "vit_base_patch16_rope_reg1_gap_256", "1 register, no class token"),
    _timm("relpos ViT", "vit_relpos_small_patch16_224", "relative position MLP/bias"),
    _timm("ResNet-ViT hybrid", "vit_tiny_r_s16_p8_224", "grid from the backbone's stride",
          img_size=128, narrow=False),
    _timm("CaiT", "cait_xxs24_224", "class token joins in the last blocks only",
          depth_token_only=1),
    _timm("XCiT", "xcit_tiny_12_p16_224", "attention over channels: no attention distance",
          no_attention="channels"),
    _timm("SAM-ViT", "samvit_base_patch16", "NHWC tokens; attention distance within 2x2 windows, global in block 2",
          window_size=2, global_attn_indexes=(1,), neck_chans=16),
    _timm("ConViT", "convit_tiny", "class token joins after the GPSA blocks", local_up_to_layer=1,
          embed_dim=16, num_heads=4),  # ConViT's width is embed_dim x num_heads
    _grid("Swin", "swin_tiny_patch4_window7_224", "windowed (attention distance within windows); "
          "grid backbone, 2 stages (strides 4, 8)", windowed=True,
          img_size=64, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4),
    _grid("Swin V2", "swinv2_tiny_window8_256", "windowed (attention distance within windows); grid backbone, "
          "2 stages (strides 4, 8)", windowed=True,
          img_size=64, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4),
    _grid("Hiera", "hiera_tiny_224", "mask-unit attention (attention distance within units, pooled queries at "
          "their cell centres); grid backbone, 4 stages (strides 4-32)", windowed=True,
          img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)),
    _grid("MViTv2", "mvitv2_tiny", "pooling attention; grid backbone, 4 stages (strides 4-32)",
          factory="mvitv2:MultiScaleVit", img_size=64, cfg="mvitv2"),
    _grid("PVTv2", "pvt_v2_b0", "spatial-reduction attention (attention distance to pooled keys at their cell "
          "centres); grid backbone, 4 stages (strides 4-32)", windowed=True,
          embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2)),
    _grid("Twins-SVT", "twins_svt_small", "local + global sub-sampled attention (attention distance within "
          "windows / to pooled keys at their cell centres); grid backbone, 4 stages", windowed=True,
          img_size=64, embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
          wss=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1)),
    _grid("NesT", "nest_tiny", "nested blocks (attention distance within blocks); grid backbone, 3 levels "
          "(strides 4-16)", factory="nest:Nest", windowed=True,
          img_size=64, embed_dims=(16, 32, 32), depths=(1, 1, 1), num_heads=(1, 2, 2)),
    _grid("VOLO", "volo_d1_224", "outlooker + transformer; grid backbone (strides 8, 16)", factory="volo:VOLO",
          img_size=64, layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(1, 2, 2, 2)),
    _grid("CoaT-Lite", "coat_lite_tiny", "conv-attentional; grid backbone, 4 stages (strides 4-32)",
          img_size=64, embed_dims=(16, 32, 32, 32), serial_depths=(1, 1, 1, 1)),
    _grid("MCi (FastViT)", "fastvit_mci0", "MobileCLIP image tower; grid backbone, 4 stages (strides 4-32)",
          layers=(1, 1, 1, 1), embed_dims=(16, 32, 64, 64)),
    _hf("ViT", "ViTModel"),
    _hf("DeiT", "DeiTModel", "class + distillation token"),
    _hf("DINOv2", "Dinov2Model", patch_size=8),
    _hf("DINOv2 + registers", "Dinov2WithRegistersModel", "4 register tokens", num_register_tokens=4),
    _hf("CLIP", "CLIPVisionModel"),
    _hf("SigLIP", "SiglipVisionModel", "no class token"),
    _hf("MAE", "ViTMAEModel", "read unmasked, patches in order"),
    _hf("ViT-MSN", "ViTMSNModel"),
    _hf("I-JEPA", "IJepaModel", "no class token"),
    _hf("BEiT", "BeitModel", "relative position bias", use_relative_position_bias=True),
    _hf("Data2Vec-Vision", "Data2VecVisionModel", "relative position bias", use_relative_position_bias=True),
    _hf("DINOv3", "DINOv3ViTModel", "RoPE, 1 class + 2 register tokens", num_register_tokens=2),
    _hf("AIMv2", "Aimv2VisionModel", "no class token; learned table: native size only"),
    _hf("MetaCLIP 2", "MetaClip2VisionModel"),
]


def build(arch: Arch, workdir):
    """The model for ``arch`` with random weights; ``transformers`` models go through a
    ``save_pretrained`` folder in ``workdir`` and :func:`asg_probe.load_checkpoint`, as a user's would."""
    import torch

    torch.manual_seed(0)
    if arch.source == "timm":
        import importlib

        import timm

        if not arch.factory:
            return timm.create_model(arch.name, pretrained=False, num_classes=0, **arch.kwargs).eval()
        module, cls = arch.factory.split(":")
        kwargs = dict(arch.kwargs)
        if kwargs.get("cfg") == "mvitv2":
            kwargs["cfg"] = _mvitv2_cfg()
        return getattr(importlib.import_module(f"timm.models.{module}"), cls)(num_classes=0, **kwargs).eval()
    import transformers

    from .checkpoint import load_checkpoint

    config_cls = getattr(transformers, arch.name.replace("Model", "Config"))
    from transformers.utils import logging as hf_logging

    folder = Path(workdir) / arch.name
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per model would fill the log
    try:
        getattr(transformers, arch.name)(config_cls(**arch.kwargs)).save_pretrained(folder)
    finally:
        hf_logging.enable_progress_bar()
    return load_checkpoint(folder)


def _one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120] if text else ''}"


def check(arch: Arch, workdir, num_images: int = NUM_IMAGES) -> dict:
    """Run both analyses on ``arch``; ``{"layerwise": ..., "attention_distance": ...}``.

    Each value is ``"yes"``, ``"refuses"`` (an expected one-line refusal, see
    :attr:`Arch.no_attention`) or ``"no (Error: message)"``.
    """
    import math

    from .analysis.attention_distance import attention_distance
    from .analysis.layerwise import layerwise_probes

    from .geometry import model_geometry

    model = build(arch, workdir)
    out = {}
    try:
        # the first and last layer: 0 for a ViT, the first feature map of a grid backbone
        first = model_geometry(model).first_layer
        frame = layerwise_probes(model, num_images=num_images, layers=[first, -1], n_folds=3, progress=False,
                                 img_size=arch.input_size or None,
                                 init_baseline=False).to_frame()
        ok = len(frame) == 2 and all(math.isfinite(v) for v in frame["r2_row"])
        out["layerwise"] = "yes" if ok else "no (non-finite R²)"
    except Exception as exc:  # the table records any failure, whatever it is
        out["layerwise"] = f"no ({_one_line(exc)})"
    try:
        result = attention_distance(model, num_images=num_images, progress=False, img_size=arch.input_size or None)
        ok = all(math.isfinite(v) for v in result.to_frame()["distance_px"])
        out["attention_distance"] = "yes" if ok else "no (non-finite distance)"
    except Exception as exc:  # noqa: BLE001 - recorded as above
        if arch.no_attention and arch.no_attention in str(exc) and "\n" not in str(exc).strip():
            out["attention_distance"] = "refuses"
        else:
            out["attention_distance"] = f"no ({_one_line(exc)})"
    return out


def expected(arch: Arch) -> dict:
    """What :func:`check` returns once asg_probe reads ``arch``."""
    return {"layerwise": "yes", "attention_distance": "refuses" if arch.no_attention else "yes"}


_MARK = {"yes": "✓", "refuses": "refuses (one line)"}


def markdown(results: dict) -> str:
    """README's table from ``{arch.name + source: check(arch)}`` (``results`` keyed by :func:`key`)."""
    lines = ["| family | source | model (as built here) | layerwise | attention distance | note |",
             "| --- | --- | --- | --- | --- | --- |"]
    for arch in ARCHITECTURES:
        res = results[key(arch)]
        # a failure is one mark in the table; `python -m asg_probe.compat` prints the messages
        cells = [_MARK.get(res[k], "✗" if res[k].startswith("no") else res[k])
                 for k in ("layerwise", "attention_distance")]
        note = arch.note + (f"; pending: {arch.pending}" if arch.pending and res != expected(arch) else "")
        lines.append(f"| {arch.family} | {arch.source} | `{arch.name}` | {cells[0]} | {cells[1]} | {note} |")
    return "\n".join(lines)


def key(arch: Arch) -> str:
    return f"{arch.source}:{arch.name}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m asg_probe.compat",
                                     description="Build every listed ViT family small and run the analyses.")
    parser.add_argument("--markdown", action="store_true", help="print README's table")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for arch in ARCHITECTURES:
            results[key(arch)] = check(arch, workdir)
            if not args.markdown:
                print(f"{key(arch)}: {results[key(arch)]}", flush=True)
    if args.markdown:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
