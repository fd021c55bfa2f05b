"""Turning "images" (nothing, a folder, a tensor) into model-ready batches, sharded for torchrun."""
from __future__ import annotations

import torch


def dist_rank_world():
    """``(rank, world_size)`` when torch.distributed is initialised, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ImageBatches:
    """Re-iterable batches ``(float images (B,3,H,W), global image index (B,))``.

    Under torchrun each rank takes a strided share of the images; indices stay
    global so fold assignment (``index % n_folds``) is the same for any process count.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, mean=None, std=None, source="", skipped=()):
        self.images = images
        self.batch_size = int(batch_size)
        self.mean, self.std = mean, std
        self.source = source
        self.skipped = list(skipped)
        self.rank, self.world = dist_rank_world()
        self.indices = torch.arange(self.rank, len(images), self.world)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def img_size(self):
        return [int(self.images.shape[-2]), int(self.images.shape[-1])]

    def __len__(self):
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def _normalise(self, x):
        from ..data import preprocess

        return preprocess(x, self.mean, self.std) if x.dtype == torch.uint8 else x

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start:start + self.batch_size]
            yield self._normalise(self.images[idx]), idx

    @classmethod
    def prepare(cls, model, images=None, *, num_images=64, img_size=None, batch_size=32, seed=0):
        """Resolve ``images`` for ``model``: embedded photos, a folder, an ImageSet or a tensor."""
        from ..data import data_config_for, load_images

        mean, std, native_size, patch = data_config_for(model)
        size = img_size or native_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if size[0] % patch or size[1] % patch:
            raise ValueError(f"image size {size[0]}x{size[1]} is not a multiple of the patch size {patch}")
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be a (N, 3, H, W) tensor, got shape {tuple(images.shape)}")
            if images.shape[-2] % patch or images.shape[-1] % patch:
                raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {patch}")
            return cls(images, batch_size, mean, std, source="tensor")
        if hasattr(images, "images") and isinstance(images.images, torch.Tensor):
            imageset = images
        else:
            if size[0] != size[1]:
                raise ValueError("embedded and folder images are square crops; pass a square img_size")
            imageset = load_images(images, num_images=num_images, img_size=size[0], seed=seed)
        return cls(imageset.images, batch_size, mean, std, source=str(getattr(imageset, "source", images)),
                   skipped=getattr(imageset, "skipped", ()))
