"""Hugging Face ``transformers`` vision models, seen by asg_probe as timm ViTs.

:class:`HFViT` wraps ``ViTModel``, ``DeiTModel``, ``Dinov2Model``,
``Dinov2WithRegistersModel``, ``CLIPVisionModel``, ``SiglipVisionModel``, ``ViTMAEModel``,
``ViTMSNModel``, ``IJepaModel``, ``BeitModel``, ``Data2VecVisionModel``, ``DINOv3ViTModel``,
``Aimv2VisionModel`` and ``MetaClip2VisionModel`` (:data:`SUPPORTED_MODEL_TYPES`) so
that every analysis reads them the way it reads a timm ``VisionTransformer``:

* ``model.blocks[i]`` is encoder layer ``i``, wrapped so that its forward takes
  and returns the hidden-state tensor alone (forward hooks read the output
  tokens, forward pre-hooks the input);
* ``model.patch_embed.patch_size`` / ``.img_size`` / ``.grid_size`` and
  ``model.num_prefix_tokens`` (class token, DeiT's distillation token,
  DINOv2's registers; 0 for SigLIP) describe the token sequence;
* ``model.forward_features(x)`` runs embeddings → blocks → final norm, resampling
  the position table when the input size is not the table's;
* ``model.pretrained_cfg`` holds ``mean``/``std``/``input_size`` from the model's
  own ``preprocessor_config.json``, which :func:`asg_probe.data.data_config_for`
  reads.

Attention: in ``transformers`` 5.x (and 4.x) the ``sdpa`` implementation calls
``torch.nn.functional.scaled_dot_product_attention`` by attribute look-up at call
time, so :func:`asg_probe.capture.capture_attention` intercepts it and computes
the probabilities from the very q, k the layer passed. The adapter therefore
switches a model loaded with another implementation (``eager``, flash) to
``sdpa``; outputs are the same up to float rounding.

``transformers`` is imported here only, on first use (the optional extra ``hf``).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError

__all__ = ["HFViT", "load_hf_folder", "load_hf_hub", "is_hf_folder", "SUPPORTED_MODEL_TYPES"]

# model_type in config.json -> (transformers class name, prefix tokens besides registers)
SUPPORTED_MODEL_TYPES = {
    "vit": ("ViTModel", 1),
    "deit": ("DeiTModel", 2),                      # class + distillation token
    "dinov2": ("Dinov2Model", 1),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", 1),  # + config.num_register_tokens
    "clip_vision_model": ("CLIPVisionModel", 1),
    "clip": ("CLIPVisionModel", 1),                # a full CLIP folder: its vision tower
    "siglip_vision_model": ("SiglipVisionModel", 0),
    "siglip": ("SiglipVisionModel", 0),
    "vit_mae": ("ViTMAEModel", 1),                 # read unmasked, patches in order (see HFViT.embed)
    "vit_msn": ("ViTMSNModel", 1),
    "ijepa": ("IJepaModel", 0),                    # no class token
    "beit": ("BeitModel", 1),                      # relative position bias in the layers
    "data2vec-vision": ("Data2VecVisionModel", 1),
    "dinov3_vit": ("DINOv3ViTModel", 1),           # + config.num_register_tokens; RoPE in the layers
    "aimv2_vision_model": ("Aimv2VisionModel", 0),
    "metaclip_2_vision_model": ("MetaClip2VisionModel", 1),
    "metaclip_2": ("MetaClip2VisionModel", 1),     # a full MetaCLIP 2 folder: its vision tower
}

# The image processors' defaults, for a folder without preprocessor_config.json.
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_DEFAULT_NORM = {"vit": _HALF, "deit": _IMAGENET, "dinov2": _IMAGENET, "dinov2_with_registers": _IMAGENET,
                 "clip_vision_model": _OPENAI_CLIP, "clip": _OPENAI_CLIP,
                 "siglip_vision_model": _HALF, "siglip": _HALF, "vit_mae": _IMAGENET, "vit_msn": _IMAGENET,
                 "ijepa": _IMAGENET, "beit": _HALF, "data2vec-vision": _HALF, "dinov3_vit": _IMAGENET,
                 "aimv2_vision_model": _OPENAI_CLIP, "metaclip_2_vision_model": _OPENAI_CLIP,
                 "metaclip_2": _OPENAI_CLIP}

#: Types transformers has that asg_probe does not read, and why (said in the refusal).
_UNSUPPORTED_WHY = {"siglip2_vision_model": "NaFlex patches (a flat patch sequence with spatial_shapes)",
                    "siglip2": "NaFlex patches (a flat patch sequence with spatial_shapes)"}


def _unsupported(what, model_type) -> str:
    names = ", ".join(sorted(set(c for c, _ in SUPPORTED_MODEL_TYPES.values())))
    why = f" ({_UNSUPPORTED_WHY[model_type]})" if model_type in _UNSUPPORTED_WHY else ""
    return f"{what}: Hugging Face model_type {model_type!r} is not supported{why}; asg_probe reads {names}"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise CheckpointError("Hugging Face models need the `transformers` package: "
                              "pip install 'asg-probe[hf]'") from None
    return transformers


class PatchGeometry:
    """What asg_probe reads from a timm ``patch_embed``: patch, input and table sizes (no weights)."""

    def __init__(self, patch_size, img_size, grid_size):
        self.patch_size = (int(patch_size), int(patch_size))
        self.img_size = tuple(int(v) for v in img_size)
        self.grid_size = tuple(int(v) for v in grid_size)  # the position table's native grid

    def __repr__(self):
        return f"PatchGeometry(patch_size={self.patch_size}, img_size={self.img_size}, grid_size={self.grid_size})"


class _Heads:
    """``block.attn.num_heads``, as on a timm block (the widgets read it)."""

    def __init__(self, num_heads):
        self.num_heads = int(num_heads)


class HFBlock(nn.Module):
    """One encoder layer whose forward takes and returns the hidden states only.

    The layer is referenced, not registered: its weights stay under ``HFViT.hf``
    once, so the adapter's ``state_dict`` is the Hugging Face model's.
    """

    def __init__(self, layer: nn.Module, num_heads: int, per_forward: dict | None = None):
        super().__init__()
        object.__setattr__(self, "layer", layer)
        # extra layer arguments that depend on the input (BEiT's resolution, DINOv3's RoPE),
        # refilled by HFViT.embed on every forward
        object.__setattr__(self, "per_forward", per_forward if per_forward is not None else {})
        self.attn = _Heads(num_heads)
        params = list(inspect.signature(layer.forward).parameters.values())[1:]
        # transformers 4.x CLIP layers take attention_mask and causal_attention_mask without defaults
        self._none_args = {p.name: None for p in params
                           if p.default is inspect.Parameter.empty
                           and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def forward(self, x):
        out = self.layer(x, **self._none_args, **self.per_forward)
        # transformers 4.x layers return a tuple (hidden_states, attentions?); 5.x the tensor
        return out[0] if isinstance(out, (tuple, list)) else out

    def extra_repr(self):
        return type(self.layer).__name__


def _first_attr(obj, names):
    for name in names:
        cur = obj
        for part in name.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    return None


class HFViT(nn.Module):
    """A ``transformers`` vision encoder with a timm ``VisionTransformer``'s interface.

    Parameters
    ----------
    hf_model : transformers.PreTrainedModel
        ``ViTModel``, ``DeiTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``,
        ``CLIPVisionModel`` or ``SiglipVisionModel`` (or a full CLIP/SigLIP model: its
        vision tower is used).
    preprocessor : dict, optional
        The image-processor config (``preprocessor_config.json``) for ``mean``/``std``
        and input size; the processor's defaults for the model type when absent.

    Attributes
    ----------
    blocks : nn.ModuleList of HFBlock
    patch_embed : PatchGeometry
    num_prefix_tokens : int
    pretrained_cfg : dict
        ``mean``, ``std``, ``input_size`` as in timm.

    Examples
    --------
    >>> import transformers, torch
    >>> cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                              intermediate_size=64, image_size=32, patch_size=8)
    >>> m = HFViT(transformers.ViTModel(cfg)).eval()
    >>> len(m.blocks), m.num_prefix_tokens, m.patch_embed.patch_size, m.pretrained_cfg["input_size"]
    (2, 1, (8, 8), (3, 32, 32))
    >>> m.forward_features(torch.randn(1, 3, 48, 48)).shape  # position table resampled to 6x6
    torch.Size([1, 37, 32])
    """

    def __init__(self, hf_model: nn.Module, preprocessor: dict | None = None):
        super().__init__()
        core = hf_model
        while getattr(core, "embeddings", None) is None and getattr(core, "vision_model", None) is not None:
            core = core.vision_model  # CLIPModel / SiglipModel / transformers 4.x *VisionModel
        config = getattr(core, "config", None) or hf_model.config
        model_type = str(getattr(config, "model_type", ""))
        if model_type not in SUPPORTED_MODEL_TYPES or getattr(core, "embeddings", None) is None:
            raise CheckpointError(_unsupported(type(hf_model).__name__, model_type))
        layers = _first_attr(core, ("layers", "encoder.layer", "encoder.layers", "model.layer"))
        if layers is None:
            raise CheckpointError(f"{type(hf_model).__name__}: no encoder layers found")
        self.hf = hf_model
        object.__setattr__(self, "_core", core)
        self.model_type = model_type
        self._use_sdpa()
        num_heads = int(config.num_attention_heads)
        self._per_forward = {}
        self.blocks = nn.ModuleList(HFBlock(layer, num_heads, self._per_forward) for layer in layers)
        self.embed_dim = self.num_features = int(config.hidden_size)
        self.num_heads = num_heads
        self.num_prefix_tokens = SUPPORTED_MODEL_TYPES[model_type][1] + int(getattr(config, "num_register_tokens", 0) or 0)
        self.cls_token = True if self.num_prefix_tokens else None  # timm's "has a class token" signal
        self.dynamic_img_size = True  # the position table is resampled to any input grid
        patch = int(config.patch_size if not isinstance(config.patch_size, (tuple, list)) else config.patch_size[0])
        table = int(config.image_size if not isinstance(config.image_size, (tuple, list)) else config.image_size[0])
        mean, std, size = _preprocessing(preprocessor, model_type, table)
        self.patch_embed = PatchGeometry(patch, size, (table // patch, table // patch))
        self.pretrained_cfg = {"mean": mean, "std": std, "input_size": (3, *size),
                               "architecture": type(hf_model).__name__, "source": "transformers"}
        # referenced, not registered: the weights live under self.hf once
        object.__setattr__(self, "_pre_norm", getattr(core, "pre_layrnorm", None) or nn.Identity())
        object.__setattr__(self, "_norm", _first_attr(core, ("layernorm", "post_layernorm", "norm", "rms_norm"))
                           or nn.Identity())
        params = inspect.signature(core.embeddings.forward).parameters
        self._interpolate_kw = "interpolate_pos_encoding" in params

    def _use_sdpa(self):
        config = self.hf.config
        if getattr(config, "_attn_implementation", "sdpa") == "sdpa":
            return
        # capture_attention reads attention where the layer calls SDPA (module docstring)
        setter = getattr(self.hf, "set_attn_implementation", None)
        if setter is not None:
            setter("sdpa")
        else:  # transformers 4.x before set_attn_implementation
            for sub in self.hf.modules():
                cfg = getattr(sub, "config", None)
                if cfg is not None and hasattr(cfg, "_attn_implementation"):
                    cfg._attn_implementation = "sdpa"

    @property
    def pos_embed(self) -> torch.Tensor:
        """The learned position table as ``(1, prefix + grid_h * grid_w, D)`` (SigLIP: no prefix rows)."""
        emb = self._core.embeddings
        table = getattr(emb, "position_embeddings", None)
        if isinstance(table, torch.Tensor):
            return table
        return emb.position_embedding.weight[None]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence entering block 0: prefix tokens, then patch tokens row-major.

        Also sets the layers' input-dependent arguments for this forward: BEiT and
        Data2Vec-Vision's ``resolution`` (their relative position bias is resampled to
        it), DINOv3's RoPE ``position_embeddings``. ViTMAE's embeddings shuffle and mask
        patches at random; they are given the identity order and ``mask_ratio`` 0, so
        every patch is kept, row-major.
        """
        kwargs = {}
        grid = (x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1])
        if self._interpolate_kw:
            kwargs["interpolate_pos_encoding"] = grid != self.patch_embed.grid_size
        self._per_forward.clear()
        if self.model_type == "vit_mae":
            self._core.embeddings.config.mask_ratio = 0.0
            kwargs["noise"] = torch.arange(grid[0] * grid[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1)
        elif self.model_type in ("beit", "data2vec-vision"):
            self._per_forward.update(resolution=tuple(x.shape[-2:]),
                                     interpolate_pos_encoding=grid != self.patch_embed.grid_size)
        elif self.model_type == "dinov3_vit":
            self._per_forward["position_embeddings"] = self._core.rope_embeddings(x)
        elif (self.model_type == "aimv2_vision_model" and grid != self.patch_embed.grid_size
              and not getattr(self._core.config, "is_native", False)):
            from .errors import InputError

            side = self.patch_embed.grid_size[0] * self.patch_embed.patch_size[0]
            raise InputError(f"AIMv2's learned position table fits {side}x{side} inputs only (transformers does not "
                             f"resample it); pass --img-size {side} (img_size={side})")
        out = self._core.embeddings(x, **kwargs)
        if isinstance(out, (tuple, list)):   # ViTMAE: (tokens, mask, ids_restore); BEiT 4.x: (tokens, grid)
            out = out[0]
        return self._pre_norm(out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings → blocks → final norm, every token: ``(B, prefix + N, D)``."""
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self._norm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def _size_of(value):
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        edge = value.get("shortest_edge")
        return (int(edge), int(edge)) if edge else None
    if isinstance(value, (int, float)):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def _preprocessing(pre, model_type, table_size):
    """``(mean, std, (H, W))`` from an image-processor config, else the processor's defaults."""
    mean, std = _DEFAULT_NORM.get(model_type, _IMAGENET)
    size = None
    if pre:
        if pre.get("do_normalize", True):
            mean = tuple(float(v) for v in pre.get("image_mean") or mean)
            std = tuple(float(v) for v in pre.get("image_std") or std)
        else:  # the model sees x / 255 as is
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if pre.get("do_center_crop") and pre.get("crop_size") is not None:
            size = _size_of(pre["crop_size"])
        if size is None and pre.get("size") is not None:
            size = _size_of(pre["size"])
    return mean, std, size or (table_size, table_size)


def is_hf_folder(path) -> bool:
    """A folder written by ``save_pretrained`` (``config.json`` with a ``model_type``)."""
    path = Path(path)
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def load_hf_folder(path, map_location="cpu") -> HFViT:
    """Load a ``save_pretrained`` folder (``config.json`` + weights) as an :class:`HFViT`.

    Parameters
    ----------
    path : str or Path
        The folder; ``preprocessor_config.json`` in it, when present, gives mean/std
        and input size.
    map_location : str or torch.device

    Returns
    -------
    HFViT
        In eval mode, float32, with ``asg_meta`` like :func:`asg_probe.load_checkpoint`'s.

    Raises
    ------
    CheckpointError
        Not a supported model type, missing ``transformers``, unreadable weights.

    Examples
    --------
    >>> import tempfile, transformers
    >>> cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                                 intermediate_size=64, image_size=28, patch_size=14)
    >>> folder = tempfile.mkdtemp()
    >>> transformers.Dinov2Model(cfg).save_pretrained(folder)
    >>> load_hf_folder(folder).num_prefix_tokens
    1
    """
    path = Path(path)
    transformers = _transformers()
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}/config.json: not readable JSON ({exc})") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(_unsupported(str(path), model_type))
    cls = getattr(transformers, SUPPORTED_MODEL_TYPES[model_type][0])
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load would drown the CLI's output
    # transformers' load report is a table of every key (a full CLIP folder lists its whole text
    # tower): silenced, and what matters said here, in one line or in asg_meta
    hf_logging.set_verbosity_error()
    try:
        hf_model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{path}: transformers could not load the folder ({first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    # a pooler or head the folder lacks is never run here; a missing encoder weight would be
    missing = sorted(k for k in info.get("missing_keys") or [] if not any(p in k for p in ("pooler", "head")))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} weights of {cls.__name__} are not in the folder (e.g. "
                              f"{', '.join(missing[:2])}); it would run with random weights there")
    pre = None
    pre_file = path / "preprocessor_config.json"
    if pre_file.is_file():
        try:
            pre = json.loads(pre_file.read_text())
        except ValueError:
            raise CheckpointError(f"{pre_file}: not valid JSON") from None
    else:
        _warn_default_preprocessing(path, model_type)
    model = HFViT(hf_model.float(), pre)
    model.to(map_location).eval()
    model.asg_meta = {"checkpoint": str(path), "checkpoint_format": "transformers",
                      "model": {"name": f"{cls.__name__}", "model_type": model_type},
                      "inferred": {"arch": f"config.json: model_type {model_type!r}",
                                   "preprocessing": "preprocessor_config.json" if pre else
                                   f"{model_type} image-processor defaults"},
                      "unused_weights": len(info.get("unexpected_keys") or [])}  # e.g. a CLIP folder's text tower
    return model


_WARNED_DEFAULT_PREPROCESSING: set = set()  # folders already warned about, once per process


def _warn_default_preprocessing(path, model_type) -> None:
    """Say once per folder that mean/std are the image processor's defaults, not the folder's own.

    A model trained with other statistics would be probed on shifted inputs without any sign,
    so the guess is said out loud (also recorded in ``asg_meta["inferred"]["preprocessing"]``).
    """
    import warnings

    key = str(Path(path).resolve())
    if key in _WARNED_DEFAULT_PREPROCESSING:
        return
    _WARNED_DEFAULT_PREPROCESSING.add(key)
    mean, std = _DEFAULT_NORM.get(model_type, _IMAGENET)
    warnings.warn(f"{path}: no preprocessor_config.json, so images are normalised with the {model_type} "
                  f"image processor's defaults (mean {tuple(round(m, 3) for m in mean)}, std "
                  f"{tuple(round(v, 3) for v in std)}); copy the model's preprocessor_config.json into the "
                  "folder if it was trained with others", UserWarning, stacklevel=3)


def load_hf_hub(repo_id: str, map_location="cpu") -> HFViT:
    """Load ``hf:ORG/NAME``: from the local Hugging Face cache, else downloaded into it.

    The download is ``huggingface_hub.snapshot_download`` (its cache, its progress bars,
    ``HF_TOKEN``), of the config and weight files only (safetensors, else ``.bin``).
    With ``HF_HUB_OFFLINE=1`` only the cache is read.

    Raises
    ------
    CheckpointError
        One line when the model is neither cached nor downloadable, saying what to do.
    """
    _transformers()
    from huggingface_hub import constants, snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, or an invalid repo id: either way nothing local
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(f"hf:{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                                  f"unset it to download, or run `huggingface-cli download {repo_id}` on a "
                                  "machine with internet, or pass a folder") from None
        folder = _download(repo_id, snapshot_download)
    if not is_hf_folder(folder):
        raise CheckpointError(f"hf:{repo_id}: the cached snapshot {folder} has no config.json with a model_type")
    model = load_hf_folder(folder, map_location=map_location)
    model.asg_meta["checkpoint"] = f"hf:{repo_id}"
    return model


def _download(repo_id, snapshot_download):
    """The config and weights of ``repo_id`` into the hub cache (safetensors, else ``.bin``); one-line errors."""
    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"])
        if not any(Path(folder).glob("*.safetensors")):
            folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.bin"])
    except Exception as exc:  # noqa: BLE001 - no network, unknown or gated repo: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"hf:{repo_id} is not in the local Hugging Face cache and could not be downloaded "
                              f"({type(exc).__name__}: {first}); check the name and the network (HF_TOKEN for "
                              f"gated models), or run `huggingface-cli download {repo_id}` on a machine with "
                              "internet") from None
    return folder
