"""The same architecture, freshly initialised: the baseline of "is this learned?".

A probe can read position from a model that never learned anything: an added position table
is decodable at initialisation, and so is whatever the architecture and the image statistics
give away (a ``none`` model reads the row of sky-above-ground scenes at init). The
random-initialisation baseline probes :func:`reinitialised` copies of a model, on the same
images and folds, so that ``r2 - r2_init`` is what training added.

:func:`reinitialised` uses each library's own initialisation, in this order, under its own seed
(the global random state is left as it was):

1. every submodule's ``reset_parameters()`` (torch layers: linear, conv, norm, embedding; our
   relative-position tables and decay gates);
2. the model's ``init_weights()`` (timm ViTs and our models: position tables, class and register
   tokens, timm's truncated-normal linear init), or, for Hugging Face models (``asg_probe.hf``),
   ``_init_weights`` applied to every module, as ``from_config`` would;
3. any parameter that neither touched and that is not constant (e.g. a position table of a
   family without ``init_weights``) is redrawn from a truncated normal of std 0.02, the usual
   ViT initialisation.

Buffers (fixed sin-cos tables, RoPE frequencies) are part of the architecture and kept.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["reinitialised"]


def _hf_modules(model: nn.Module):
    """Submodules that are Hugging Face pretrained models (they carry ``config`` and ``_init_weights``)."""
    return [m for m in model.modules() if hasattr(m, "_init_weights") and hasattr(m, "config")]


def reinitialised(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every weight drawn afresh (seeded), in eval mode.

    Parameters
    ----------
    model : nn.Module
        Any model the loader returns (timm, asg_probe, :class:`asg_probe.hf.HFViT`).
    seed : int
        Seed of the new weights; the caller's random state is not consumed.

    Examples
    --------
    >>> import asg_probe
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    >>> a, b = reinitialised(m, 1), reinitialised(m, 1)
    >>> torch.equal(a.pos_embed, b.pos_embed), torch.equal(a.pos_embed, m.pos_embed)
    (True, False)
    """
    fresh = copy.deepcopy(model)
    before = {name: p.detach().clone() for name, p in fresh.named_parameters()}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(seed))
        for module in fresh.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and module is not fresh:
                reset()
        hf = _hf_modules(fresh)
        if hf:
            for core in hf:
                core.apply(core._init_weights)
        elif callable(getattr(fresh, "init_weights", None)):
            fresh.init_weights()
        for name, p in fresh.named_parameters():
            if torch.equal(p, before[name]) and p.numel() > 1 and bool(p.std() > 0):
                nn.init.trunc_normal_(p, std=0.02)
    return fresh.eval()
