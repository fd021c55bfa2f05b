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
not Hewitt & Liang's (2019) control task, and it says nothing about whether position is
learned or read off content: the random-initialisation baseline (``r2_init`` in
:func:`asg_probe.layerwise_probes`) and the online code length
(:mod:`asg_probe.probes.mdl`) answer those. (Earlier versions also reported a "content
control" built on a 6-bit pixel hash; it was capped far below R² 1 even for a probe handed
the hash, so it measured a shifted R², and it was removed.)

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
           "resolve_grid", "control_seeds", "control_target_names", "slot_control_targets", "FactoredTargets"]

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


def control_seeds(control_seed: int = 0, n_control_seeds: int = 5) -> list:
    """The control seeds used: ``control_seed, control_seed + 1, ...`` (``n_control_seeds`` of them).

    Examples
    --------
    >>> control_seeds(3, 2)
    [3, 4]
    """
    if int(n_control_seeds) < 1:
        raise ValueError(f"n_control_seeds must be >= 1, got {n_control_seeds}")
    return [int(control_seed) + k for k in range(int(n_control_seeds))]


def control_target_names(seeds) -> tuple:
    """Column names of the slot controls for ``seeds``: the first seed keeps
    :data:`TARGET_NAMES`' ``control_row``/``control_col``, later ones ``control_row_s{seed}``.

    Examples
    --------
    >>> control_target_names([0, 1])
    ('control_row', 'control_col', 'control_row_s1', 'control_col_s1')
    """
    seeds = [int(s) for s in seeds]
    names = list(TARGET_NAMES[2:4])
    for s in seeds[1:]:
        names += [f"control_row_s{s}", f"control_col_s{s}"]
    return tuple(names)


def slot_control_targets(grid, seeds, device=None, dtype=torch.float32) -> torch.Tensor:
    """Slot-permutation control targets for several seeds, ``(N, 2 * len(seeds))``.

    Examples
    --------
    >>> t = slot_control_targets((2, 3), [0, 1])
    >>> t.shape, torch.equal(t[:, :2], probe_targets((2, 3), control_seed=0)[:, 2:])
    (torch.Size([6, 4]), True)
    """
    true = coordinate_targets(grid, device=device, dtype=dtype)
    return torch.cat([true[control_permutation(true.shape[0], s).to(true.device)] for s in seeds], dim=1)


class FactoredTargets:
    """Per-image targets ``(B, N, Ts + Tc)`` kept factored: columns shared by every image, then a
    per-patch lookup. Row ``(b, n)`` of the dense targets (:meth:`dense`) is
    ``cat(shared[n], table[labels[b, n]])``.

    E.g. a label per patch (a segment, a content class) whose targets are looked up, next to the
    coordinates every image shares. :meth:`~asg_probe.probes.RidgeStats.update` forms ``X^T Y`` from the factors (on the CPU): the
    shared columns from the fold's summed images, the lookup columns as per-label sums of token
    rows times the table, ``O(N D)`` per image instead of ``O(N D T)``; the statistics are those of
    the dense targets up to rounding.

    Parameters
    ----------
    shared : tensor (N, Ts) or None
        Columns that are the same in every image (None: ``Ts = 0``).
    labels : integer tensor (B, N)
        Label of every patch, in ``0 .. K - 1``.
    table : tensor (K, Tc)
        Target values of each label.

    Examples
    --------
    >>> y = FactoredTargets(torch.zeros(3, 1), torch.tensor([[0, 1, 1], [2, 0, 0]]), torch.arange(6.).reshape(3, 2))
    >>> y.shape, y.dense()[1, 0].tolist()
    (torch.Size([2, 3, 3]), [0.0, 4.0, 5.0])
    """

    ndim = 3

    def __init__(self, shared, labels, table):
        labels, table = torch.as_tensor(labels), torch.as_tensor(table)
        if labels.ndim != 2 or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer (B, N) tensor, got {tuple(labels.shape)} of {labels.dtype}")
        if table.ndim != 2 or table.shape[0] < 1:
            raise ValueError(f"table must be (K, Tc) with K >= 1, got shape {tuple(table.shape)}")
        if shared is None:
            shared = table.new_zeros(labels.shape[1], 0)
        shared = torch.as_tensor(shared)
        if shared.ndim != 2 or shared.shape[0] != labels.shape[1]:
            raise ValueError(f"shared must be (N, Ts) with N={labels.shape[1]}, got shape {tuple(shared.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= table.shape[0]):
            raise ValueError(f"labels must lie in 0..{table.shape[0] - 1} (the rows of table)")
        self.shared, self.labels, self.table = shared, labels.long(), table

    @property
    def shape(self) -> torch.Size:
        B, N = self.labels.shape
        return torch.Size((B, N, self.shared.shape[1] + self.table.shape[1]))

    @property
    def n_shared(self) -> int:
        """``Ts``, the number of shared columns (they come first)."""
        return self.shared.shape[1]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, images) -> "FactoredTargets":
        """The targets of some images (``labels[images]``), still factored."""
        labels = self.labels[images]
        return FactoredTargets(self.shared, labels if labels.ndim == 2 else labels[None], self.table)

    def to(self, device) -> "FactoredTargets":
        return FactoredTargets(self.shared.to(device), self.labels.to(device), self.table.to(device))

    def dense(self, dtype=None) -> torch.Tensor:
        """The ``(B, N, Ts + Tc)`` targets as one tensor (``dtype``: by default ``shared``'s and ``table``'s)."""
        dtype = dtype or torch.promote_types(self.shared.dtype, self.table.dtype)
        B, N = self.labels.shape
        table = self.table.to(self.labels.device, dtype)
        shared = self.shared.to(self.labels.device, dtype).expand(B, N, -1)
        return torch.cat([shared, table[self.labels]], dim=-1)

    def __repr__(self) -> str:
        B, N, T = self.shape
        return f"FactoredTargets(B={B}, N={N}, shared={self.n_shared}, labels={self.table.shape[0]}, T={T})"


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
