"""What a coordinate probe regresses: grid coordinates and the control task's permuted ones.

Targets follow SPEC §4: ``(row / (grid_h - 1), col / (grid_w - 1))`` in ``[0, 1]``
(:func:`coordinate_targets`, defined once in :mod:`asg_probe.layers.grid` and shared
with the guidance loss), plus a slot-permutation control task in which every patch
slot takes the coordinates of another slot under one fixed random permutation
(:func:`control_permutation`). :func:`probe_targets` stacks both, so one ``X^T X``
serves the probe and its control.

What the control rules out: any representation that tells slots apart solves it
(a learned absolute table does, at R² ~1), so true minus control separates a code of
*geometry* (neighbouring slots, neighbouring codes) from mere slot *identity*. It is
not Hewitt & Liang's (2019) control task, whose labels follow each input's content
type so that only memorising inputs solves it.

Examples
--------
>>> probe_targets((2, 2), control_seed=0).shape
torch.Size([4, 4])
"""
from __future__ import annotations

import math

import torch

from ..layers.grid import check_grid, coordinate_targets

__all__ = ["TARGET_NAMES", "coordinate_targets", "control_permutation", "probe_targets", "check_grid",
           "resolve_grid"]

#: Column names of :func:`probe_targets` with the control task.
TARGET_NAMES = ("row", "col", "control_row", "control_col")


def control_permutation(num_patches: int, seed: int = 0) -> torch.Tensor:
    """Fixed random permutation of patch slots for the control task, ``(num_patches,)`` long.

    Control targets are ``coordinate_targets(grid)[perm]``: patch slot ``i`` is asked
    for the coordinates of slot ``perm[i]``, the same in every image: an identity-vs-geometry
    control (see the module docstring).

    Examples
    --------
    >>> perm = control_permutation(6, seed=0)
    >>> sorted(perm.tolist())
    [0, 1, 2, 3, 4, 5]
    >>> torch.equal(perm, control_permutation(6, seed=0))
    True
    """
    if int(num_patches) < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(num_patches), generator=gen)


def probe_targets(grid, control: bool = True, control_seed: int = 0, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """Targets for one image: ``(N, 4)`` columns :data:`TARGET_NAMES`, or ``(N, 2)`` without control.

    Examples
    --------
    >>> probe_targets((3, 4)).shape
    torch.Size([12, 4])
    >>> probe_targets((3, 4), control=False).shape
    torch.Size([12, 2])
    """
    true = coordinate_targets(grid, device=device, dtype=dtype)
    if not control:
        return true
    perm = control_permutation(true.shape[0], control_seed).to(true.device)
    return torch.cat([true, true[perm]], dim=1)


def resolve_grid(num_patches: int, grid=None) -> tuple[int, int]:
    """``grid`` validated against ``num_patches``; ``None`` infers a square grid.

    Examples
    --------
    >>> resolve_grid(16), resolve_grid(12, (3, 4))
    ((4, 4), (3, 4))
    """
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"cannot infer a grid from {num_patches} patches (not a square); "
                             f"pass grid=(grid_h, grid_w)")
        return side, side
    gh, gw = check_grid(grid)
    if gh * gw != num_patches:
        raise ValueError(f"grid {gh}x{gw} has {gh * gw} cells but X has {num_patches} patches per image")
    return gh, gw
