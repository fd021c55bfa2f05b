"""Building blocks of a run that do not depend on the task: device, precision, model, optimiser, RNG.

Examples
--------
>>> import asg_probe
>>> model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", num_classes=3, depth=1)
>>> [g["name"] for g in param_groups(model, None, 0.05)]
['decay', 'no_decay']
"""
from __future__ import annotations

import random

import numpy as np
import torch

from .config import ConfigError


def pick_device(cfg) -> torch.device:
    """``device=auto`` → CUDA when visible; a CUDA request without CUDA is a :class:`ConfigError`."""
    want = cfg["device"]
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu")
    return torch.device(want)


def pick_precision(cfg, device) -> str:
    """``precision=auto`` → bf16 on CUDA (fp16 where bf16 is missing), fp32 on CPU."""
    precision = cfg["precision"]
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision=fp16 needs CUDA; use fp32 or bf16 on CPU")
    return precision


def build_model(cfg, num_classes: int):
    """The backbone to train (a separate function so that tests can wrap it)."""
    from asg_probe import create_model

    m = cfg["model"]
    return create_model(m["name"], pos=m["pos"], num_classes=num_classes, img_size=m["img_size"], **m["kwargs"])


def build_guidance_head(cfg, model):
    """ASG's coordinate head on the final-norm patch tokens, or None when guidance is off."""
    g = cfg["guidance"]
    if not g["enabled"]:
        return None
    from asg_probe import GuidanceHead

    return GuidanceHead(embed_dim=model.embed_dim, hidden_dim=g["hidden_dim"], target=g["target"], seed=cfg["seed"])


def param_groups(model, head, weight_decay: float, task_head=None) -> list[dict]:
    """AdamW groups: decay only on ≥2-d weights not named by ``no_weight_decay()``.

    Biases, norms, other 1-d tensors, tokens/position tables (timm's list) and the whole
    guidance head get weight decay 0 (SPEC §1). A task head (dense tasks) decays its ≥2-d weights.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or name.split(".")[0] in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    if task_head is not None:
        for p in task_head.parameters():
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if head is not None:
        groups.append({"params": list(head.parameters()), "weight_decay": 0.0, "name": "guidance_head"})
    return [g for g in groups if g["params"]]


def seed_everything(seed: int):
    """Seed Python, numpy and torch: the same initial weights on every process."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def gather_rng_states(ctx) -> list:
    """Every process's RNG state, in rank order (rank 0 saves them all)."""
    from .state import rng_state

    mine = rng_state()
    if not ctx.enabled:
        return [mine]
    import torch.distributed as dist

    states = [None] * ctx.world_size
    dist.all_gather_object(states, mine)
    return states


@torch.no_grad()
def ranks_in_sync(module) -> bool:
    """True when every process holds bit-identical parameters (DDP's promise, checked)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return bool(torch.equal(hi, lo))
