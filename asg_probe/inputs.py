"""The one image-input path: ``images`` (nothing, a folder, an ImageSet, a tensor) → model batches.

Every analysis entry point and the widgets accept the same ``images`` argument and
the same ``num_images``, ``img_size``, ``batch_size`` and ``seed``;
:meth:`ImageBatches.prepare` turns them into re-iterable batches, sharded for
torchrun, and records where the images came from (:meth:`ImageBatches.provenance`)
so results can say so.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .distributed import rank_world, shard_indices
from .errors import UsageError
from .geometry import IMAGENET_MEAN, IMAGENET_STD, model_geometry

__all__ = ["ImageBatches", "display_label"]


def display_label(label="", checkpoint=None) -> str:
    """The display name an entry point stores, from ``label=`` or the deprecated ``checkpoint=``.

    Examples
    --------
    >>> display_label("ape"), display_label("", None)
    ('ape', '')
    """
    if checkpoint is not None:
        warnings.warn("checkpoint= is deprecated: pass label= (the name shown in results and plots)",
                      DeprecationWarning, stacklevel=3)
        if label and label != checkpoint:
            raise ValueError(f"pass label= only (got label={label!r} and checkpoint={checkpoint!r})")
        return str(checkpoint)
    return str(label or "")


class ImageBatches:
    """Re-iterable batches ``(float images (B, 3, H, W), image index (B,))`` for :func:`~asg_probe.extract.run_analyses`.

    Parameters
    ----------
    images : tensor (N, 3, H, W)
        uint8 (normalised with ``mean``/``std`` per batch) or float (taken as normalised).
    batch_size : int
    mean, std : sequence of float, optional
        Normalisation (default: ImageNet's).
    indices : sequence of int, optional
        Which images, as indices into ``images`` (default: all).
    size : int, optional
        Resize every batch to ``size × size`` (bicubic, antialiased; uint8 images are
        resized in [0, 1] and clipped before normalising).
    renumber : bool
        Yield positions ``0, 1, 2, ...`` within ``indices`` instead of indices into
        ``images`` (cross-validation folds, ``index % n_folds``, stay balanced).
    shard : bool or (int, int), default=True
        Under torchrun, keep only this process's share (see Notes); ``(rank, world_size)``
        names the share explicitly, ``False`` keeps every image.
    provenance : dict, optional
        See :meth:`provenance`.

    Notes
    -----
    Under torchrun each rank takes a strided share (``rank, rank + world, ...``) of
    ``indices``; the yielded indices stay global, so fold assignment and sampling are
    the same for any process count.

    Examples
    --------
    >>> data = ImageBatches(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), batch_size=2)
    >>> [idx.tolist() for _, idx in data], len(data)
    ([[0, 1], [2, 3], [4]], 3)
    >>> [idx.tolist() for _, idx in data.subset([1, 3], renumber=True)]
    [[0, 1]]
    """

    def __init__(self, images: torch.Tensor, batch_size: int = 32, mean=None, std=None, *, indices=None,
                 size=None, renumber=False, shard=True, provenance=None):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (N, 3, H, W) tensor, got {shape}")
        if int(batch_size) < 1:
            raise UsageError(f"batch_size must be positive, got {batch_size}")
        self.images = images
        self.batch_size = int(batch_size)
        self.mean = IMAGENET_MEAN if mean is None else tuple(mean)
        self.std = IMAGENET_STD if std is None else tuple(std)
        self.size = None if size is None else int(size)
        self.renumber = bool(renumber)
        self.selected = torch.arange(len(images)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        if shard is True:
            shard = rank_world()
        self.rank, self.world = shard if shard else (0, 1)
        self.positions = shard_indices(len(self.selected), self.rank, self.world)
        self._provenance = dict(provenance or {"source": "tensor"})

    @property
    def num_images(self) -> int:
        """Images in this set (all processes together)."""
        return len(self.selected)

    @property
    def img_size(self):
        """``[H, W]`` of the batches."""
        if self.size is not None:
            return [self.size, self.size]
        return [int(self.images.shape[-2]), int(self.images.shape[-1])]

    @property
    def skipped(self):
        """``(path, reason)`` of every file that could not be decoded."""
        return [(s["path"], s["reason"]) for s in self._provenance.get("skipped", [])]

    @property
    def source(self) -> str:
        return self._provenance.get("source", "")

    def provenance(self) -> dict:
        """Where the images came from, as a JSON-able dict.

        Keys: ``source`` (in words), ``split`` (``"val"`` for the procedural scenes,
        else ``None``), ``num_images_requested`` (``None`` when a tensor was given),
        ``num_images`` (used), ``skipped`` (``[{"path", "reason"}]``), ``seed``,
        ``img_size`` (``[H, W]``).
        """
        out = dict(self._provenance)
        out.setdefault("split", None)
        out.setdefault("num_images_requested", None)
        out.setdefault("skipped", [])
        out.setdefault("seed", None)
        out["num_images"] = self.num_images
        out["img_size"] = self.img_size
        return out

    def subset(self, indices, *, size=None, renumber=False, shard=True) -> "ImageBatches":
        """The same images, restricted to ``indices`` (into :attr:`images`) and optionally resized."""
        return ImageBatches(self.images, self.batch_size, self.mean, self.std, indices=indices, size=size,
                            renumber=renumber, shard=shard, provenance=self._provenance)

    def __len__(self):
        return (len(self.positions) + self.batch_size - 1) // self.batch_size

    def _normalise(self, x):
        from .data import preprocess

        raw = x.dtype == torch.uint8
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = x.float().div_(255.0) if raw else x.float()
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
            if raw:
                x = x.clamp_(0, 1)
            else:
                return x
        elif not raw:
            return x
        return preprocess(x, self.mean, self.std)

    def __iter__(self):
        for start in range(0, len(self.positions), self.batch_size):
            pos = self.positions[start:start + self.batch_size]
            idx = self.selected[pos]
            yield self._normalise(self.images[idx]), (pos if self.renumber else idx)

    def tensor(self) -> torch.Tensor:
        """Every selected image (this process's share), normalised, ``(n, 3, H, W)`` float32."""
        parts = [x for x, _ in self]
        return torch.cat(parts) if parts else torch.empty(0, 3, *self.img_size)

    def display(self) -> torch.Tensor:
        """Every selected image as RGB in [0, 1], ``(n, H, W, 3)``, for drawing.

        A float input was already normalised: the normalisation is undone.
        """
        if self.images.dtype == torch.uint8 and self.size is None:
            idx = self.selected[self.positions]
            return self.images[idx].permute(0, 2, 3, 1).float().div(255.0)
        x = self.tensor()
        m = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x * s + m).clamp(0, 1).permute(0, 2, 3, 1)

    @classmethod
    def prepare(cls, model, images=None, *, num_images=64, img_size=None, batch_size=32, seed=0,
                check_size=True) -> "ImageBatches":
        """Resolve ``images`` for ``model``.

        Parameters
        ----------
        model : nn.Module
            Its ``pretrained_cfg`` gives mean/std, its patch embedding the input size
            and patch size.
        images : None, str, Path, ImageSet or tensor
            ``None``: the embedded photographs; ``"scenes"``: the procedural scenes'
            validation split; a folder (searched recursively); an ``ImageSet``; a
            ``(N, 3, H, W)`` tensor, uint8 (normalised with the model's mean/std) or
            float (taken as normalised).
        num_images, img_size, seed
            How many images, at which (square) size (default: the model's), which
            deterministic crops/scenes; for photographs, scenes and folders.
        batch_size : int
        check_size : bool
            Require the images' size to be a multiple of the patch size (an analysis
            that resizes every batch passes ``False``).

        Examples
        --------
        >>> import asg_probe
        >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
        >>> data = ImageBatches.prepare(m, torch.zeros(3, 3, 32, 32, dtype=torch.uint8))
        >>> data.num_images, data.provenance()["source"]
        (3, 'tensor')
        """
        from .data import load_images

        geo = model_geometry(model)  # patch: the effective stride (a hybrid's backbone included)
        mean, std, native_size, patch = geo.mean, geo.std, geo.img_size, geo.patch_size
        size = img_size or native_size
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)

        def check(h, w):
            if check_size and (h % patch or w % patch):
                raise UsageError(f"image size {h}x{w} is not a multiple of the patch size {patch}")

        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be a (N, 3, H, W) tensor, got shape {tuple(images.shape)}")
            check(images.shape[-2], images.shape[-1])
            return cls(images, batch_size, mean, std, provenance={"source": "tensor"})
        check(*size)
        if hasattr(images, "images") and isinstance(images.images, torch.Tensor):
            imageset, requested = images, None
        else:
            if size[0] != size[1]:
                raise UsageError("embedded and folder images are square crops; pass a square img_size")
            imageset, requested = load_images(images, num_images=num_images, img_size=size[0], seed=seed), num_images
            check(*imageset.images.shape[-2:])
        scenes = isinstance(images, str) and images == "scenes" and not Path(images).exists()
        provenance = {"source": str(getattr(imageset, "source", images)), "split": "val" if scenes else None,
                      "num_images_requested": requested, "seed": None if requested is None else int(seed),
                      "skipped": [{"path": str(p), "reason": str(r)} for p, r in getattr(imageset, "skipped", ())]}
        return cls(imageset.images, batch_size, mean, std, provenance=provenance)
