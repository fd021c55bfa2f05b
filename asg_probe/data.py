"""Images for the probes: built-in photographs (no download) and image folders.

The embedded default takes deterministic random crops of the photographs that
ship inside scikit-image and scikit-learn, so ``asg-probe layerwise`` works on a
machine with no network. ``load_images(folder)`` walks any folder tree, skips
and counts unreadable files, and returns square crops (resize the shorter side,
then centre-crop).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Colour photographs first; greyscale textures widen the variety and are replicated to RGB.
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                   "retina", "cat", "camera", "coins", "moon", "grass", "gravel", "brick")


@dataclass
class ImageSet:
    """Images as uint8 ``(N, 3, H, W)`` with where they came from."""

    images: torch.Tensor
    names: list
    source: str
    skipped: list = field(default_factory=list)  # (path, reason)

    def __len__(self):
        return len(self.images)


@functools.lru_cache(maxsize=1)
def _source_photos():
    """Decoded offline photographs, ``[(name, uint8 HxWx3)]`` (cached: decoding costs time)."""
    import warnings

    photos = []
    import skimage.data as skdata

    for name in _SKIMAGE_PHOTOS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = np.asarray(getattr(skdata, name)())
        except Exception:  # an image that needs a download on this install: skip it
            continue
        photos.append((f"skimage:{name}", _to_rgb(img)))
    try:
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        for fname, img in zip(sample.filenames, sample.images):
            photos.append((f"sklearn:{Path(fname).stem}", _to_rgb(np.asarray(img))))
    except Exception:
        pass
    if not photos:
        raise RuntimeError("no built-in photographs could be loaded (scikit-image/scikit-learn missing?); "
                           "pass --images DIR")
    return photos


def _to_rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3].astype(np.uint8))


def _resize(chw_uint8: torch.Tensor, size: int) -> torch.Tensor:
    x = chw_uint8[None].float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def embedded_images(num_images: int = 64, img_size: int = 224, seed: int = 0) -> ImageSet:
    """Deterministic random crops of the built-in photographs, uint8 ``(N, 3, S, S)``.

    Each crop picks a photograph (cycling through them), a side between 35% and 100%
    of the photo's shorter side and a location, from a seeded generator; then resizes
    to ``img_size`` (bicubic, antialiased). Same arguments, same bytes.

    Examples
    --------
    >>> imgs = embedded_images(num_images=4, img_size=32)
    >>> imgs.images.shape, imgs.images.dtype
    (torch.Size([4, 3, 32, 32]), torch.uint8)
    """
    if num_images < 1 or img_size < 1:
        raise ValueError(f"num_images and img_size must be positive, got {num_images} and {img_size}")
    photos = _source_photos()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(photos))
    out, names = [], []
    for i in range(num_images):
        name, photo = photos[order[i % len(photos)]]
        h, w, _ = photo.shape
        side = int(rng.uniform(0.35, 1.0) * min(h, w))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = torch.from_numpy(photo[top:top + side, left:left + side]).permute(2, 0, 1)
        out.append(_resize(crop, img_size))
        names.append(f"{name}[{top}:{top + side},{left}:{left + side}]")
    return ImageSet(torch.stack(out), names, source=f"embedded photographs (seed {seed})")


def _read_square(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        im = im.convert("RGB")
        arr = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    h, w = arr.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2  # centre crop of the shorter side
    return _resize(arr[:, top:top + side, left:left + side], size)


def load_images(source=None, num_images: int = 64, img_size: int = 224, seed: int = 0) -> ImageSet:
    """Images for analysis: ``None`` → :func:`embedded_images`; a folder → its images.

    A folder is searched recursively for image files (sorted, so the selection is
    deterministic; a seeded choice when it holds more than ``num_images``). Each is
    centre-cropped to a square and resized to ``img_size``. Unreadable files are
    skipped and listed in ``ImageSet.skipped``.

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ValueError
        The folder holds no readable image.
    """
    if source is None:
        return embedded_images(num_images=num_images, img_size=img_size, seed=seed)
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*")
                                                 if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{root}: no image files found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(files) > num_images:
        rng = np.random.default_rng(seed)
        files = [files[i] for i in sorted(rng.permutation(len(files)))]
    images, names, skipped = [], [], []
    for path in files:
        if len(images) >= num_images:
            break
        try:
            images.append(_read_square(path, img_size))
            names.append(str(path))
        except Exception as exc:  # corrupt, truncated or not an image at all
            skipped.append((str(path), f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    if not images:
        raise ValueError(f"{root}: none of the {len(files)} image files could be read")
    return ImageSet(torch.stack(images), names, source=str(root), skipped=skipped)


def data_config_for(model):
    """``(mean, std, img_size, patch_size)`` from a timm-style model's ``pretrained_cfg``.

    Falls back to ImageNet mean/std, the model's ``patch_embed.img_size`` and 224.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    patch = model.patch_embed.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    size = getattr(model.patch_embed, "img_size", None) or cfg.get("input_size", (3, 224, 224))[1:]
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return mean, std, size, patch


def preprocess(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` → normalised float32."""
    x = images.float().div(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
