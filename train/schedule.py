"""Learning-rate and guidance-weight schedules as pure functions of the optimiser step.

Being pure functions of ``step`` makes them resumable by construction: the
checkpoint stores the step and the horizon, nothing else.
"""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ~0 to ``lr``, then cosine to ``min_lr`` at ``total_steps`` (SPEC §1).

    Step 0 already has ``lr / warmup_steps`` (never exactly 0, which would waste a step).

    Examples
    --------
    >>> lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=4, total_steps=10)
    0.25
    >>> lr_at(10, lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=10)
    0.1
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    span = max(total_steps - warmup_steps, 1)
    progress = (step - warmup_steps) / span
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def guidance_lambda(step: int, *, lambda_min: float, rc_lambda: float, warmup_steps_for_aux: int) -> float:
    """ASG weight: linear from ``lambda_min`` at step 0 to ``rc_lambda`` at ``warmup_steps_for_aux``.

    Examples
    --------
    >>> guidance_lambda(30, lambda_min=10, rc_lambda=300, warmup_steps_for_aux=60)
    155.0
    >>> guidance_lambda(1000, lambda_min=10, rc_lambda=300, warmup_steps_for_aux=60)
    300.0
    """
    if warmup_steps_for_aux <= 0:
        return float(rc_lambda)
    frac = min(step / warmup_steps_for_aux, 1.0)
    return float(lambda_min + (rc_lambda - lambda_min) * frac)
