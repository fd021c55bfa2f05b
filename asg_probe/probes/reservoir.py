"""A bounded, order-independent sample of tokens, for probes that need the tokens themselves.

The ridge probe streams sufficient statistics; a non-linear probe (:class:`~asg_probe.probes.MLPProbe`)
or a 2-D embedding (:mod:`asg_probe.analysis.embeddings`) needs actual tokens, and
:class:`TokenReservoir` keeps a uniform sample of them in fixed memory.
"""
from __future__ import annotations

import torch

from ._inputs import as_features, as_index, as_tensor

__all__ = ["TokenReservoir"]


class TokenReservoir:
    """Bounded, order-independent sample of tokens for probes that need the tokens themselves.

    Every token gets a pseudo-random key from ``(seed, image_index, patch)``; the
    reservoir keeps the ``max_tokens`` smallest keys (bottom-k sampling). The
    sample is uniform over tokens, is the same whatever the batch order or size,
    and two reservoirs merge exactly. Memory: ``max_tokens * (D + T)`` floats.

    Examples
    --------
    >>> from asg_probe.probes import coordinate_targets
    >>> res = TokenReservoir(max_tokens=10)
    >>> res.update(torch.randn(4, 6, 3), coordinate_targets((2, 3)), torch.arange(4))
    >>> res.features.shape, res.targets.shape
    (torch.Size([10, 3]), torch.Size([10, 2]))
    """

    def __init__(self, max_tokens: int = 20000, seed: int = 0):
        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        self.features = self.targets = self.image_index = self.keys = None

    def _image_keys(self, image_index, N):
        rows = []
        for i in image_index.tolist():
            # a per-image stream keeps keys independent of which batch the image came in
            gen = torch.Generator().manual_seed((self.seed * 0x9E3779B97F4A7C15 + int(i)) % (2 ** 63))
            rows.append(torch.rand(N, generator=gen, dtype=torch.float64))
        return torch.stack(rows)

    def update(self, X, Y, image_index) -> None:
        """Offer a batch ``X`` (B, N, D) with targets ``Y`` (N, T) or (B, N, T)."""
        X = as_features(X, ndims=(3,))
        B, N, D = X.shape
        Y = as_tensor(Y, device=X.device)
        Y = Y[..., None] if Y.ndim == 1 else Y
        if Y.ndim == 2:
            Y = Y.expand(B, *Y.shape)
        if Y.shape[:2] != (B, N):
            raise ValueError(f"Y must be (N, T) or (B, N, T) with B={B}, N={N}, got {tuple(Y.shape)}")
        idx = as_index(image_index, B).cpu().long()
        keys = self._image_keys(idx, N).to(X.device)
        self._offer(X.reshape(-1, D), Y.reshape(B * N, -1), idx.to(X.device).repeat_interleave(N),
                    keys.reshape(-1))

    def _offer(self, X, Y, img, keys) -> None:
        X, Y = X.float(), Y.float()
        if self.keys is not None:
            X = torch.cat([self.features, X.to(self.features.device)])
            Y = torch.cat([self.targets, Y.to(self.features.device)])
            img = torch.cat([self.image_index, img.to(self.features.device)])
            keys = torch.cat([self.keys, keys.to(self.features.device)])
        if keys.numel() > self.max_tokens:
            keep = torch.topk(keys, self.max_tokens, largest=False).indices
            keep = keep.sort().values
            X, Y, img, keys = X[keep], Y[keep], img[keep], keys[keep]
        self.features, self.targets, self.image_index, self.keys = X, Y, img, keys

    def merge(self, other: "TokenReservoir") -> "TokenReservoir":
        """Offer ``other``'s sample to this one (in place; exact: the result is as if one reservoir saw both)."""
        if other.keys is not None:
            self._offer(other.features, other.targets, other.image_index, other.keys)
        return self


