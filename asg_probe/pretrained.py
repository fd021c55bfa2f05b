"""Models named rather than stored as one file: ``timm:NAME``, ``hf:ORG/NAME``, Hugging Face folders.

:func:`load_named` is what :func:`asg_probe.load_checkpoint` asks first; it returns
``None`` for anything else (an asg_probe, timm or ASG-script checkpoint file or a
training run folder), which ``load_checkpoint`` then reads as before.

``timm:NAME`` loads timm's pretrained weights from the local Hugging Face cache (or
torch hub cache for URL-only weights), ``hf:ORG/NAME`` a cached snapshot; what is not
cached is downloaded into those caches the way timm and huggingface_hub do (their
progress bars). With ``HF_HUB_OFFLINE=1``, or without network, a one-line
:class:`~asg_probe.checkpoint.CheckpointError` says what to do instead.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

__all__ = ["load_named", "load_timm_pretrained", "cached_timm_weights"]


def load_named(path, arch=None, map_location="cpu", **model_kwargs):
    """A model for ``timm:NAME``, ``hf:ORG/NAME`` or a ``save_pretrained`` folder, else ``None``.

    Examples
    --------
    >>> load_named("some/file.safetensors") is None
    True
    """
    text = str(path)
    if not Path(text).exists():
        if text.startswith("hf:"):
            from .hf import load_hf_hub

            return load_hf_hub(text[3:], map_location=map_location)
        if text.startswith("timm:"):
            return load_timm_pretrained(text[5:], map_location=map_location, **model_kwargs)
        if text.startswith("open_clip:"):
            from .openclip import load_open_clip

            return load_open_clip(text[len("open_clip:"):], pretrained=arch, map_location=map_location)
    from .hf import is_hf_folder

    if is_hf_folder(text):
        from .hf import load_hf_folder

        return load_hf_folder(text, map_location=map_location)
    return None


def _pretrained_cfg(name):
    import timm
    from timm.models import get_pretrained_cfg

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise CheckpointError(f"timm:{name}: timm {timm.__version__} has no model {arch!r}")
    cfg = get_pretrained_cfg(name, allow_unregistered=False) if "." in name else None
    if cfg is None:
        tags = timm.list_pretrained(f"{arch}.*") or timm.list_pretrained(arch)
        if "." in name or not tags:
            raise CheckpointError(f"timm:{name}: timm has no pretrained weights of that name"
                                  + (f" (e.g. timm:{tags[0]})" if tags else ""))
        cfg = get_pretrained_cfg(tags[0])  # timm's default tag for the bare architecture
    return arch, cfg.to_dict()


def cached_timm_weights(cfg: dict):
    """Path of a timm pretrained config's weights in the local caches, and where it looked.

    Looks in the Hugging Face hub cache (``cfg['hf_hub_id']``, the files timm would
    fetch) and in torch hub's ``checkpoints`` folder (``cfg['url']``); never downloads.

    Returns
    -------
    (str or None, list of str)
    """
    looked = []
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
        names += ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                  "open_clip_pytorch_model.bin"]
        for filename in names:
            # the constant is read at call time, so HF_HUB_CACHE set after import still counts
            found = try_to_load_from_cache(hub_id, filename, cache_dir=constants.HF_HUB_CACHE)
            if isinstance(found, str) and os.path.isfile(found):
                return found, looked
        looked.append(f"Hugging Face cache {constants.HF_HUB_CACHE} ({hub_id})")
    url = cfg.get("url")
    if url:
        import torch

        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
        if local.is_file():
            return str(local), looked
        looked.append(str(local))
    return None, looked


def load_timm_pretrained(name: str, *, file=None, map_location="cpu", **model_kwargs):
    """A timm model with its pretrained weights from the local cache (offline), for ``timm:NAME``.

    Parameters
    ----------
    name : str
        ``architecture`` or ``architecture.tag`` as in ``timm.list_pretrained()``.
    file : str or Path, optional
        Weights file to use instead of the cache (timm's
        ``pretrained_cfg_overlay=dict(file=...)``).
    map_location : str or torch.device
    **model_kwargs
        Passed to ``timm.create_model`` (e.g. ``img_size``).

    Returns
    -------
    nn.Module
        In eval mode; ``model.pretrained_cfg`` gives the preprocessing (mean, std,
        input size) that :func:`asg_probe.data.data_config_for` reads.

    Raises
    ------
    CheckpointError
        Unknown name, or weights neither cached nor given: one line saying how to
        get them.
    """
    import timm

    arch, cfg = _pretrained_cfg(name)
    full = f"{arch}.{cfg['tag']}" if cfg.get("tag") else arch
    if file is None:
        file, looked = cached_timm_weights(cfg)
        if file is None:
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                raise CheckpointError(
                    f"timm:{full}: pretrained weights are not in the local cache (looked in "
                    f"{'; '.join(looked) or 'nothing'}) and HF_HUB_OFFLINE is set; unset it to download them, fetch "
                    f"them once on a machine with internet (timm.create_model('{full}', pretrained=True)), or pass "
                    f"a local weights file with --arch {arch}")
            return _download_timm(full, arch, map_location, model_kwargs)
    file = str(file)
    # npz files (Google's original ViT weights) need timm's custom loader; everything else is a state dict
    overlay = {"file": file, "custom_load": file.endswith(".npz")}
    try:
        model = timm.create_model(full, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"timm:{full}: the weights in {file} do not load ({first})") from None
    model.to(map_location).eval()
    model.asg_meta = {"checkpoint": f"timm:{full}", "checkpoint_format": "timm-pretrained",
                      "weights_file": file, "inferred": {"arch": "timm pretrained name"}}
    return model


def _download_timm(full, arch, map_location, model_kwargs):
    """``timm.create_model(full, pretrained=True)``: timm downloads into its caches; one-line errors."""
    import timm

    try:
        model = timm.create_model(full, pretrained=True, **model_kwargs)
    except Exception as exc:  # noqa: BLE001 - no network, missing file: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"timm:{full}: pretrained weights are not in the local cache and could not be "
                              f"downloaded ({type(exc).__name__}: {first}); check the network, fetch them once on "
                              f"a machine with internet, or pass a local weights file with --arch {arch}") from None
    model.to(map_location).eval()
    model.asg_meta = {"checkpoint": f"timm:{full}", "checkpoint_format": "timm-pretrained",
                      "weights_file": "downloaded by timm", "inferred": {"arch": "timm pretrained name"}}
    return model
