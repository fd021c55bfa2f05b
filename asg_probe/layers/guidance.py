"""Active Spatial Guidance: the training-time row/column regression head (SPEC §1).

The head sits on the final-layer patch tokens (after the final norm, prefix tokens
excluded) and is *not* part of the model: training code owns it, the exported
inference model never contains it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grid import coordinate_targets

GUIDANCE_TARGETS = ("true", "random", "shuffled")


class GuidanceHead(nn.Module):
    """Two MLPs (D → hidden → ReLU → 1), one for the row and one for the column.

    ``forward(patch_tokens, grid)`` returns the ASG loss: SmoothL1 (beta 1) averaged
    over row and column. Two controls replace the true coordinates:

    - ``target="random"``: a *fixed* random permutation of the coordinates (the
      control named in SPEC). The permutation is a pure function of ``(seed, grid)``
      so every process and every resumed run agrees. Note that it is not
      position-free: to hit a fixed permutation the model must still tell the
      cells apart, so it learns position too.
    - ``target="shuffled"``: a *fresh* permutation per image and step, drawn from
      torch's global RNG (saved and restored by the training state). The targets
      carry no information about the patch, so the head can only learn their mean:
      the same loss machinery and gradient scale with no spatial signal.

    Parameters
    ----------
    embed_dim : int
        Width of the patch tokens.
    hidden_dim : int, default 256
    target : {"true", "random", "shuffled"}
    seed : int
        Seed of the fixed control permutation (``target="random"``).

    Examples
    --------
    >>> head = GuidanceHead(embed_dim=8)
    >>> tokens = torch.randn(2, 6, 8)
    >>> loss = head(tokens, grid=(2, 3))
    >>> loss.shape
    torch.Size([])
    """

    def __init__(self, embed_dim: int, hidden_dim: int = 256, target: str = "true", seed: int = 0):
        super().__init__()
        if target not in GUIDANCE_TARGETS:
            raise ValueError(f"target must be one of {GUIDANCE_TARGETS}, got {target!r}")
        self.target = target
        self.seed = int(seed)
        self.row_head = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))
        self.col_head = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))

    def targets(self, grid, device=None, dtype=torch.float32) -> torch.Tensor:
        """Regression targets ``(N, 2)`` for a grid: true coordinates or their fixed permutation.

        For ``target="shuffled"`` these are the true coordinates; ``forward`` permutes
        them per image.
        """
        coords = coordinate_targets(grid, device=device, dtype=dtype)
        if self.target == "random":
            n = coords.shape[0]
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(grid[0]) * 1009 + int(grid[1]))
            coords = coords[torch.randperm(n, generator=gen).to(coords.device)]
        return coords

    def predict(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Predicted (row, col) per token, ``(B, N, 2)``."""
        return torch.cat([self.row_head(patch_tokens), self.col_head(patch_tokens)], dim=-1)

    def forward(self, patch_tokens: torch.Tensor, grid) -> torch.Tensor:
        B, N, _ = patch_tokens.shape
        if N != int(grid[0]) * int(grid[1]):
            raise ValueError(f"GuidanceHead got {N} patch tokens for a {grid[0]}x{grid[1]} grid; "
                             "pass patch tokens only (drop the prefix tokens).")
        pred = self.predict(patch_tokens).float()
        target = self.targets(grid, device=patch_tokens.device).expand(B, N, 2)
        if self.target == "shuffled":
            # argsort of uniform noise: an independent uniform permutation per image
            perm = torch.rand(B, N, device=patch_tokens.device).argsort(dim=1)
            target = target.gather(1, perm.unsqueeze(-1).expand(B, N, 2))
        loss_row = F.smooth_l1_loss(pred[..., 0], target[..., 0])
        loss_col = F.smooth_l1_loss(pred[..., 1], target[..., 1])
        return 0.5 * (loss_row + loss_col)
