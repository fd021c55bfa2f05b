"""Patch-grid geometry shared by positional mechanisms, guidance and analyses.

Patches are numbered row-major: token ``i`` of a ``(gh, gw)`` grid sits at
row ``i // gw`` and column ``i % gw``.
"""
from __future__ import annotations

import torch


def grid_coords(grid, device=None, dtype=torch.float32) -> torch.Tensor:
    """Integer (row, col) of every patch, shape ``(gh*gw, 2)``, row-major.

    Examples
    --------
    >>> grid_coords((2, 3)).tolist()
    [[0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [1.0, 1.0], [1.0, 2.0]]
    """
    gh, gw = int(grid[0]), int(grid[1])
    rows = torch.arange(gh, device=device, dtype=dtype)
    cols = torch.arange(gw, device=device, dtype=dtype)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=-1)


def check_grid(grid) -> tuple[int, int]:
    """``grid`` as a validated ``(grid_h, grid_w)`` pair of positive ints (one-line ``ValueError`` otherwise).

    Examples
    --------
    >>> check_grid([4, 5])
    (4, 5)
    """
    try:
        gh, gw = int(grid[0]), int(grid[1])
    except (TypeError, IndexError, ValueError):
        raise ValueError(f"grid must be a pair (grid_h, grid_w), got {grid!r}") from None
    if gh < 1 or gw < 1:
        raise ValueError(f"grid sides must be >= 1, got {gh}x{gw}")
    return gh, gw


def coordinate_targets(grid, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised (row, col) of every patch, ``row/(gh-1)`` and ``col/(gw-1)``, in [0, 1].

    The regression target of both the guidance loss and the coordinate probes (the
    package's only definition; :mod:`asg_probe.probes` re-exports it). A grid side of
    1 has no extent and gives 0.

    Examples
    --------
    >>> coordinate_targets((2, 3)).tolist()
    [[0.0, 0.0], [0.0, 0.5], [0.0, 1.0], [1.0, 0.0], [1.0, 0.5], [1.0, 1.0]]
    """
    gh, gw = check_grid(grid)
    coords = grid_coords((gh, gw), device=device, dtype=torch.float64)
    scale = torch.tensor([max(gh - 1, 1), max(gw - 1, 1)], dtype=torch.float64, device=device)
    return (coords / scale).to(dtype)


def axis_offsets(grid, device=None, dtype=torch.float32):
    """Absolute row and column offsets between every pair of patches, each ``(N, N)``."""
    coords = grid_coords(grid, device=device, dtype=dtype)
    d_row = (coords[:, None, 0] - coords[None, :, 0]).abs()
    d_col = (coords[:, None, 1] - coords[None, :, 1]).abs()
    return d_row, d_col


def manhattan_distances(grid, device=None, dtype=torch.float32) -> torch.Tensor:
    """``|Δrow| + |Δcol|`` between every pair of patches, ``(N, N)`` in patch units."""
    d_row, d_col = axis_offsets(grid, device=device, dtype=dtype)
    return d_row + d_col


def euclidean_distances(grid, device=None, dtype=torch.float32) -> torch.Tensor:
    """Euclidean distance between patch centres, ``(N, N)`` in patch units."""
    d_row, d_col = axis_offsets(grid, device=device, dtype=dtype)
    return torch.sqrt(d_row ** 2 + d_col ** 2)


def pad_prefix(bias: torch.Tensor, num_prefix_tokens: int, value: float = 0.0) -> torch.Tensor:
    """Extend a patch-to-patch bias ``(..., N, N)`` to the full sequence with prefix tokens.

    Prefix tokens (cls, registers) have no position, so every pair involving one
    gets ``value`` (0: no bias), as in ALiBi-style mechanisms.
    """
    if num_prefix_tokens == 0:
        return bias
    p = num_prefix_tokens
    return torch.nn.functional.pad(bias, (p, 0, p, 0), value=value)


def permute_patches(images: torch.Tensor, patch_size: int, perm: torch.Tensor) -> torch.Tensor:
    """Rearrange the non-overlapping patches of ``images`` ``(B, C, H, W)``.

    Slot ``s`` of the output holds input patch ``perm[s]`` (row-major numbering), so for
    a model with no positional injection, output token ``s`` equals the unshuffled
    output token ``perm[s]``. ``perm`` is ``(N,)`` (same for every image) or ``(B, N)``.

    Examples
    --------
    >>> x = torch.arange(16.).reshape(1, 1, 4, 4)
    >>> permute_patches(x, 2, torch.tensor([3, 2, 1, 0]))[0, 0, :2, :2].tolist()
    [[10.0, 11.0], [14.0, 15.0]]
    """
    B, C, H, W = images.shape
    p = int(patch_size)
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    gh, gw = H // p, W // p
    patches = images.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C, p, p)
    perm = perm.to(images.device)
    if perm.dim() == 1:
        patches = patches[:, perm]
    else:
        patches = torch.gather(patches, 1, perm[:, :, None, None, None].expand(-1, -1, C, p, p))
    return patches.reshape(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
