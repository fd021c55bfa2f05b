"""Self-describing checkpoints, and safe loading of the formats researchers actually have.

Our format is one ``.safetensors`` file: the weights, plus JSON metadata under the
``"asg_probe"`` key (model name, constructor arguments, ``pos``, training config,
metrics, code version), so :func:`load_checkpoint` rebuilds the model by itself.

:func:`load_checkpoint` also reads

- a bare timm state dict (``torch.save(model.state_dict(), path)``),
- the public ASG script's full checkpoint (``{"model", "args": SimpleNamespace, RNG states...}``),
- timm safetensors exports (weights without our metadata),
- a training run directory (it holds ``model.safetensors``).

Pickle-based files are opened with ``torch.load(weights_only=True)`` and a small
allow-list of harmless types that such files really contain (``SimpleNamespace``,
``argparse.Namespace``, numpy arrays and dtypes for RNG state). Anything else is
refused without running it; ``trust=True`` is the explicit opt-in. Before unpickling, the
archive's members are measured: one that would unpack to far more than the file holds (a
zip bomb) is refused without reading it.

What is loaded is checked, not cast: metadata of the wrong shape, a tensor stored as integers
where the model holds floating-point weights, or a NaN or infinity in any weight
(:func:`asg_probe.finite.require_finite`) is a :class:`CheckpointError` naming the file and the
first offending entry.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
import types
from pathlib import Path

import torch

from .errors import CheckpointError  # defined with the other error types; public here too
from .files import atomic_write_path
from .finite import require_finite

FORMAT_NAME = "asg_probe"
FORMAT_VERSION = 1
_RUN_DIR_FILE = "model.safetensors"
# A torch file is a zip of stored (uncompressed) members, so what it unpacks to is about its
# own size; far more than that is a zip bomb. The slack covers deflated re-packs of real files.
_MAX_UNPACK_RATIO = 8
_UNPACK_SLACK = 64 << 20


# --------------------------------------------------------------------------- saving


def model_description(model) -> dict:
    """What is needed to rebuild ``model``: ``{"name", "pos", "kwargs"}`` or a timm architecture."""
    config = getattr(model, "asg_config", None)
    if config is not None:
        return {"source": "asg_probe", **config}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if arch is None:
        raise CheckpointError(
            f"cannot describe a {type(model).__name__}: build it with asg_probe.create_model or timm.create_model")
    kwargs = {"num_classes": int(getattr(model, "num_classes", 0))}
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        kwargs["img_size"] = list(patch_embed.img_size)
    return {"source": "timm", "name": arch, "pos": None, "kwargs": kwargs}


def save_checkpoint(path, model, **meta) -> Path:
    """Save ``model`` as a self-describing safetensors file, atomically.

    Parameters
    ----------
    path : str or Path
        File to write (``.safetensors`` is appended if missing); a directory gets
        ``model.safetensors`` inside it.
    model : nn.Module
        A model from :func:`asg_probe.create_model` (or a timm model).
    **meta
        JSON-serialisable extras stored with the weights, e.g. ``config=...``, ``metrics=...``.

    Examples
    --------
    >>> import asg_probe, tempfile, os
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", num_classes=4)
    >>> p = asg_probe.save_checkpoint(os.path.join(tempfile.mkdtemp(), "m"), m, metrics={"top1": 0.5})
    >>> asg_probe.load_checkpoint(p).asg_meta["metrics"]
    {'top1': 0.5}
    """
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    if path.is_dir():
        path = path / _RUN_DIR_FILE
    elif path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "code_version": __version__,
                "model": model_description(model), **meta}
    try:
        text = json.dumps(document)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint metadata must be JSON-serialisable: {exc}") from None
    # safetensors refuses tensors that share storage; a detached contiguous copy is exact.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    # a killed process leaves the old file or the new one, never half of one
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(path) as tmp:
        save_file(state, tmp, metadata={FORMAT_NAME: text})
    return path


# --------------------------------------------------------------------------- reading files

def _safe_globals():
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    allowed = [types.SimpleNamespace, argparse.Namespace, np.ndarray, np.dtype, reconstruct,
               (reconstruct, "numpy.core.multiarray._reconstruct"),
               (reconstruct, "numpy._core.multiarray._reconstruct"),
               core.multiarray.scalar, (core.multiarray.scalar, "numpy.core.multiarray.scalar")]
    # numpy >= 1.25 pickles dtypes as instances of numpy.dtypes.*DType classes
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors: 8-byte little-endian header length, then a JSON header. Checked first
    # because the length's low byte can be 0x80, which looks like a pickle protocol byte.
    if len(head) >= 10 and head[8:10] in (b'{"', b"{ ") and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"  # (a header longer than the file means truncated: reading says so)
    if head[:2] == b"PK":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    return "unknown"


def _read_safetensors(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: safetensors file is truncated or corrupt ({_first_line(exc)}); "
                              "re-save or re-download it") from None
    meta = None
    if FORMAT_NAME in metadata:
        try:
            meta = json.loads(metadata[FORMAT_NAME])
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: the asg_probe metadata is not valid JSON; "
                                  "pass arch=/pos= (--arch/--pos) to load the weights alone") from None
    return state, meta


def _check_archive_size(path: Path) -> None:
    """Refuse a torch zip archive whose members would unpack to far more than the file's size."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load says what is wrong with it
    size = path.stat().st_size
    if unpacked > _MAX_UNPACK_RATIO * size + _UNPACK_SLACK:
        raise CheckpointError(f"{path}: the archive would unpack to {unpacked / 2**20:.0f} MiB from a "
                              f"{size / 2**20:.1f} MiB file (a zip bomb?); refused, nothing was read")


def _read_torch(path: Path, trust: bool):
    _check_archive_size(path)
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found[0]})" if found else ""
        raise CheckpointError(
            f"{path}: refused to unpickle objects outside the safe allow-list{what}; nothing was run. "
            "If you trust the file's source, pass trust=True (--trust)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch file, truncated or corrupt "
                              f"({_first_line(exc)}); re-save or re-download it") from None


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def _state_dict_from(obj, path):
    """Find the model weights inside whatever a torch file held."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict", "model_state", "module", "model_ema"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner, obj.get("args") or obj.get("config")
    raise CheckpointError(f"{path}: no model weights found (expected a state dict, or a dict with a "
                          "'model' or 'state_dict' entry)")


def _clean_keys(state):
    """Drop wrappers' prefixes: DistributedDataParallel ('module.') and torch.compile ('_orig_mod.')."""
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# --------------------------------------------------------------------------- inference from keys

# pos values that leave no parameter in a state dict
_TRACELESS = ("none", "rope-axial", "rope-dinov3", "sincos", "alibi2d", "rmt-decay")


def _args_dict(args):
    if args is None:
        return {}
    if isinstance(args, (types.SimpleNamespace, argparse.Namespace)):
        return dict(vars(args))
    return dict(args) if isinstance(args, dict) else {}


def _pos_from_args(args: dict):
    """Read the positional strategy from the ASG script's arguments (heuristic, reported)."""
    for key in ("pos", "strategy", "pos_type", "pe_type", "position", "mode"):
        value = args.get(key)
        if isinstance(value, str):
            v = value.lower().replace("_", "-")
            if v in ("none", "nope", "no-pe", "nope-vit", "guidance", "asg", "rc", "row-col"):
                return "none", f"args.{key}={value!r}"
            if v in ("ape", "abs", "abspe", "abs-pe", "absolute", "learned"):
                return "ape", f"args.{key}={value!r}"
            if v in ("rope", "rot", "rotary"):
                return "rope-dinov3", f"args.{key}={value!r}"
    abs_flag, rot_flag = args.get("use_abs_pos_emb"), args.get("use_rot_pos_emb")
    if isinstance(abs_flag, bool) or isinstance(rot_flag, bool):
        if rot_flag:
            # timm's DINOv3 models use the dinov3 RoPE flavour unless told otherwise
            rope_type = str(args.get("rope_type", "dinov3"))
            pos = {"cat": "rope-axial", "mixed": "rope-mixed"}.get(rope_type, "rope-dinov3")
            return pos, "args.use_rot_pos_emb=True"
        return ("ape" if abs_flag else "none"), f"args.use_abs_pos_emb={bool(abs_flag)}"
    return None, None


def _infer_pos(state, args):
    pos, why = _pos_from_args(args)
    if pos:
        return pos, why
    if any(k.endswith("spatial.gate.weight") for k in state):
        return "sdt-decay", "keys '*.spatial.gate.weight'"
    if any(k.endswith("spatial.rel_pos_table") for k in state):
        return "relpos", "keys '*.spatial.rel_pos_table'"
    if "rope.freqs" in state:
        return "rope-mixed", "key 'rope.freqs'"
    if "pos_embed" in state:
        return "ape", "key 'pos_embed'"
    return None, None


# where timm families keep their classifier: ViT, Swin/SAM-ViT/ConvNeXt, ResNet, EfficientNet, LeViT
_HEAD_KEYS = ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight", "head.l.weight", "head.linear.weight")


def _num_classes(state) -> int:
    """Classes of the classifier the weights carry (0: none)."""
    head = next((state[k] for k in _HEAD_KEYS if k in state and state[k].ndim == 2), None)
    return int(head.shape[0]) if head is not None else 0


def _infer_kwargs(state):
    """Constructor arguments that the weights themselves reveal."""
    kw = {}
    proj = state.get("patch_embed.proj.weight")
    if proj is None:
        return None
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    kw["embed_dim"], kw["patch_size"] = embed_dim, patch
    depths = [int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))]
    if not depths:   # not one sequence of blocks (Swin's layers.i.blocks.j, PVT's stages, ...): not a plain ViT
        return None
    kw["depth"] = 1 + max(depths)
    kw["num_reg_tokens"] = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    kw["class_token"] = "cls_token" in state
    kw["num_classes"] = _num_classes(state)
    kw["qkv_bias"] = "blocks.0.attn.q_bias" in state
    if "blocks.0.gamma_1" in state:
        kw["init_values"] = 1e-5  # overwritten by the loaded gammas; only switches layer scale on
    else:
        kw["init_values"] = None
    pos_embed = state.get("pos_embed")
    if pos_embed is not None:
        prefix = kw["num_reg_tokens"] + int(kw["class_token"])
        n = int(pos_embed.shape[1])
        grid = int(round((n - prefix) ** 0.5))
        if grid * grid == n - prefix:
            kw["no_embed_class"] = False
        else:
            grid = int(round(n ** 0.5))
            kw["no_embed_class"] = True
        kw["img_size"] = grid * patch
    return kw


_TIMM_VIT_WIDTHS = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def _timm_layout_message(path, kw) -> str:
    """A bare state dict of a timm VisionTransformer (fused qkv bias, which asg_probe's Eva-based
    models never have): name the timm architecture to pass instead of guessing one of ours."""
    size = _TIMM_VIT_WIDTHS.get(kw["embed_dim"])
    what = (f"likely --arch vit_{size}_patch16_224 (patch size, image size and depth are read from the weights)"
            if size else "pass its timm model name with --arch")
    return (f"{path}: a bare state dict in timm's VisionTransformer layout (width {kw['embed_dim']}, patch "
            f"{kw['patch_size']}, {kw['depth']} blocks) does not name its architecture; {what}")


def _closest_registered(kw):
    from .models import _MODEL_CONFIGS

    for name, cfg in _MODEL_CONFIGS.items():
        if cfg["embed_dim"] == kw["embed_dim"] and cfg["patch_size"] == kw["patch_size"]:
            return name
    return None


# --------------------------------------------------------------------------- building

def _build(arch, pos, kwargs, inferred=(), path=None):
    """The model for ``arch``; ``inferred``: keys of ``kwargs`` read off the weights, dropped for a
    timm family that does not take them; ``path`` names the checkpoint in errors."""
    from .models import create_model, list_models

    if arch in list_models():
        try:
            return create_model(arch, pos=pos or "none", **kwargs)
        except (TypeError, ValueError) as exc:  # arguments from a file: the file is wrong, not the code
            raise CheckpointError(f"{path}: cannot build {arch} pos={pos!r} with the stored arguments {kwargs} "
                                  f"({_first_line(exc)}); pass arch=/pos= (--arch/--pos)") from None
    import timm

    if pos not in (None, "none", "ape"):
        raise CheckpointError(f"pos={pos!r} needs an asg_probe architecture ({', '.join(list_models())}); "
                              f"{arch!r} is a plain timm model")
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise CheckpointError(f"unknown architecture {arch!r}: pass one of asg_probe.list_models() or a "
                              f"timm model name ({_first_line(exc)})") from None
    except TypeError as exc:
        if not inferred:
            raise CheckpointError(f"{arch!r} does not take {sorted(kwargs)} ({_first_line(exc)})") from None
    # the ViT arguments read off the weights (depth, patch and image size) are not this family's
    # (Hiera, Swin, ...): build it as named, and let the weights say whether it fits
    return timm.create_model(arch, pretrained=False, **{k: v for k, v in kwargs.items() if k not in inferred})


def _check_dtypes(model, state, path) -> None:
    """A tensor stored as integers (or bool) where the model holds floating-point weights would
    be cast silently by ``load_state_dict``: refuse it instead."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, value in state.items():
        target = own.get(name)
        if target is not None and target.is_floating_point() and not value.is_floating_point():
            raise CheckpointError(f"{path}: {name} is stored as {str(value.dtype).replace('torch.', '')}, but the "
                                  "model holds floating-point weights there; re-save the checkpoint with float "
                                  "weights")


def _check_meta(meta, path):
    """The asg_probe metadata must have the shape :func:`save_checkpoint` writes; else one line."""
    def bad(what):
        return CheckpointError(f"{path}: the asg_probe metadata is malformed ({what}); "
                               "pass arch=/pos= (--arch/--pos) to load the weights alone")

    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise bad(f"a {type(meta).__name__}, not a mapping")
    desc = meta.get("model", {})
    if not isinstance(desc, dict):
        raise bad(f"'model' is a {type(desc).__name__}")
    if not isinstance(desc.get("name"), str):
        raise bad("no model.name" if desc.get("name") is None else f"model.name is a {type(desc['name']).__name__}")
    for key, kinds in (("pos", (str, type(None))), ("kwargs", (dict,))):
        if key in desc and not isinstance(desc[key], kinds):
            raise bad(f"model.{key} is a {type(desc[key]).__name__}")
    for key in ("config", "data_config"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise bad(f"'{key}' is a {type(meta[key]).__name__}")
    return meta


def _load_weights(model, state, path, arch, pos):
    _check_dtypes(model, state, path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even with strict=False
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), _first_line(exc))
        raise CheckpointError(f"{path}: weights do not fit arch={arch!r} pos={pos!r} ({detail[:200]}); "
                              "pass the right arch=/pos= (--arch/--pos) or model arguments") from None
    missing = [k for k in result.missing_keys if not k.endswith(("k_bias",))]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{path}: weights do not fit arch={arch!r} pos={pos!r}: {'; '.join(parts)}; "
                              "pass the right arch=/pos= (--arch/--pos)")


def load_checkpoint(path, arch: str | None = None, pos: str | None = None, trust: bool = False,
                    map_location="cpu", **model_kwargs):
    """Load a model from any supported checkpoint format and return it in eval mode.

    Parameters
    ----------
    path : str or Path
        A file, or a training run directory holding ``model.safetensors``; also a
        Hugging Face ``save_pretrained`` folder, ``hf:ORG/NAME`` or ``timm:NAME`` (from the
        local caches, downloaded into them when missing unless ``HF_HUB_OFFLINE`` is set), or
        ``open_clip:ARCH[:TAG]`` (``arch`` is then an optional weights file).
    arch : str, optional
        Architecture for files that don't describe themselves: a name from
        :func:`asg_probe.list_models` or any timm model name.
    pos : str, optional
        Positional mechanism for files that don't describe themselves. A bare state
        dict cannot tell RoPE (axial, DINOv3), ALiBi, RMT or sin-cos from no injection,
        since none of them store parameters; we refuse to guess.
    trust : bool
        Allow arbitrary pickled objects. Only for files from a source you trust.
    **model_kwargs
        Extra constructor arguments (e.g. ``num_heads`` for unusual widths).

    Returns
    -------
    nn.Module
        With ``model.asg_meta``: the stored metadata plus ``checkpoint_format`` and
        ``inferred`` (how arch/pos were decided).

    Raises
    ------
    CheckpointError
        One line saying what is wrong and what to pass or do.
    """
    # --- hook: `timm:NAME`, `hf:ORG/NAME` and Hugging Face folders (asg_probe/pretrained.py, hf.py)
    from .pretrained import load_named

    named = load_named(path, arch=arch, map_location=map_location, **model_kwargs)
    if named is not None:
        require_finite(named.state_dict(), source=path, error=CheckpointError)
        return named
    # ---
    path = Path(path)
    if path.is_dir():
        if not (path / _RUN_DIR_FILE).exists():
            raise CheckpointError(f"{path} is a directory without {_RUN_DIR_FILE}; point to a checkpoint file "
                                  "or a finished training run")
        path = path / _RUN_DIR_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file; point to a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    try:
        kind = _sniff(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from None
    meta, args = None, None
    if kind == "safetensors":
        state, meta = _read_safetensors(path)
        meta = _check_meta(meta, path)
        fmt = FORMAT_NAME if meta else "safetensors"
    elif kind.startswith("torch"):
        obj = _read_torch(path, trust)
        state, args = _state_dict_from(obj, path)
        fmt = "asg-script" if args is not None else "state-dict"
    else:
        raise CheckpointError(f"{path}: not a checkpoint (neither safetensors nor a PyTorch file)")
    state = _clean_keys(state)
    inferred = {}
    read_off = []   # constructor arguments read off the weights for a plain timm model

    if meta is not None and arch is None and pos is None:
        desc = meta.get("model", {})
        arch, pos = desc.get("name"), desc.get("pos")
        kwargs = {**desc.get("kwargs", {}), **model_kwargs}
        inferred["arch"] = inferred["pos"] = "checkpoint metadata"
    else:
        args_d = _args_dict(args)
        kw = _infer_kwargs(state)
        if kw is None and arch is None:
            raise CheckpointError(f"{path}: weights have no 'patch_embed.proj.weight', so this is not a ViT "
                                  "we can infer; pass arch= (--arch) with a timm or asg_probe model name")
        from .models import list_models

        if arch is None:
            named = args_d.get("model") or args_d.get("arch") or args_d.get("model_name")
            if isinstance(named, str) and named in list_models():
                arch, inferred["arch"] = named, f"args: {named!r}"
            else:
                if "blocks.0.attn.qkv.bias" in state:  # timm's VisionTransformer: a guess of ours could not fit
                    raise CheckpointError(_timm_layout_message(path, kw))
                arch = _closest_registered(kw)
                if arch is None:
                    raise CheckpointError(f"{path}: cannot infer the architecture (width {kw['embed_dim']}, "
                                          f"patch {kw['patch_size']}); pass arch= (--arch)")
                inferred["arch"] = f"weights: width {kw['embed_dim']}, patch {kw['patch_size']}"
        else:
            inferred["arch"] = "given"
        if arch in list_models():
            from .models import _MODEL_CONFIGS

            ref = _MODEL_CONFIGS[arch]
            if kw and "num_heads" not in model_kwargs and (
                    kw["embed_dim"], kw["patch_size"]) != (ref["embed_dim"], ref["patch_size"]):
                # the head count is not in the weights: a different width would be a silent guess
                raise CheckpointError(
                    f"{path}: weights have width {kw['embed_dim']} and patch {kw['patch_size']}, but {arch} has "
                    f"{ref['embed_dim']} and {ref['patch_size']}; pass the matching --arch (or num_heads=)")
            if pos is None:
                pos, why = _infer_pos(state, args_d)
                if pos is None:
                    raise CheckpointError(
                        f"{path}: the weights carry no positional parameters, so this could be pos=none or "
                        f"any parameter-free mechanism ({', '.join(_TRACELESS[1:])}); pass pos= (--pos)")
                inferred["pos"] = why
            else:
                inferred["pos"] = "given"
            kwargs = {**({k: v for k, v in (kw or {}).items()}), **model_kwargs}
        else:
            # a plain timm model: pass what the weights reveal and timm's ViTs accept
            kwargs = dict(model_kwargs)
            kwargs.setdefault("num_classes", _num_classes(state))   # also for families that are no ViT
            for key in ("num_classes", "img_size", "depth", "patch_size"):
                if kw and kw.get(key) is not None and key not in kwargs:
                    kwargs[key] = kw[key]
                    read_off.append(key)
        if args is not None and "num_classes" in args_d and kw and kw["num_classes"] == 0:
            kwargs.setdefault("num_classes", int(args_d["num_classes"]))

    model = _build(arch, pos, kwargs, read_off, path)
    _load_weights(model, state, path, arch, pos)
    require_finite(model.state_dict(), source=path, error=CheckpointError)
    data_config = (meta or {}).get("data_config")
    if isinstance(data_config, dict):
        # the normalisation the model was trained with (e.g. a data set's own mean/std)
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        for key in ("mean", "std", "interpolation", "crop_pct"):
            if key in data_config:
                cfg[key] = tuple(data_config[key]) if isinstance(data_config[key], list) else data_config[key]
        model.pretrained_cfg = cfg
    model.to(map_location).eval()
    model.asg_meta = {**(meta or {}), "checkpoint": str(path), "checkpoint_format": fmt, "inferred": inferred}
    if args is not None:
        model.asg_meta["args"] = {k: v for k, v in _args_dict(args).items()
                                  if isinstance(v, (str, int, float, bool, type(None)))}
    return model


def trained_on_scenes(model) -> bool:
    """Whether ``model``'s checkpoint metadata says it was trained on procedural scenes.

    Read from the training config that :func:`save_checkpoint` stores (``config.data.kind``);
    the bundled reference models and ``asg-train`` scene runs say so, other files do not.
    Analyses use it to default to held-out scenes, the data such a model knows.

    Examples
    --------
    >>> import asg_probe
    >>> trained_on_scenes(asg_probe.load_reference_model("ape"))
    True
    >>> trained_on_scenes(asg_probe.create_model("vit_tiny_patch4_32"))
    False
    """
    config = (getattr(model, "asg_meta", None) or {}).get("config")
    data = config.get("data") if isinstance(config, dict) else None
    return isinstance(data, dict) and data.get("kind") == "scenes"
