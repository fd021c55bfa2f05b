"""Data for the dense tasks: ADE20K (segmentation) and Hypersim (depth) image/target pairs.

Training crops are drawn jointly for the image and its target from the per-sample RNG of
:func:`asg_train.data.sample_rng` (reproducible with any number of loader workers and across
resumes); evaluation resizes the short side and center-crops.

Examples
--------
>>> from asg_train.config import resolve
>>> cfg = resolve(overrides=["task=depth", "data.kind=hypersim", "data.root=/nowhere"])
>>> build_dense_splits(cfg)
Traceback (most recent call last):
...
asg_train.config.ConfigError: data folder not found: /nowhere (set data.root=...)
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError
from .data import Splits, sample_rng


def _joint_random_crop(rng: random.Random, img, target, size: int, scale_range, fill_target):
    """Random rescale (short side = size·s), random crop size×size (padding if needed), flip."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    s = rng.uniform(*scale_range)
    short = max(1, int(round(size * s)))
    img = TF.resize(img, short, InterpolationMode.BICUBIC, antialias=True)
    target = TF.resize(target, short, InterpolationMode.NEAREST)
    h, w = img.shape[-2:]
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h or pad_w:
        img = F.pad(img, (0, pad_w, 0, pad_h))
        target = F.pad(target, (0, pad_w, 0, pad_h), value=fill_target)
        h, w = img.shape[-2:]
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    img, target = img[..., top:top + size, left:left + size], target[..., top:top + size, left:left + size]
    if rng.random() < 0.5:
        img, target = img.flip(-1), target.flip(-1)
    return img, target


def _center(img, target, size: int):
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    img = TF.center_crop(TF.resize(img, size, InterpolationMode.BICUBIC, antialias=True), [size, size])
    target = TF.center_crop(TF.resize(target, size, InterpolationMode.NEAREST), [size, size])
    return img, target


class DenseFolder(torch.utils.data.Dataset):
    """(image, target) pairs for ADE20K or Hypersim; unreadable pairs are skipped and counted.

    ADE20K: ``images/{training,validation}/*.jpg`` with ``annotations/.../*.png``
    (0 = "other" → ignored, classes 1..150 → 0..149). Hypersim: ``{train,val}/**/*_rgb.png``
    with ``*_depth.npy`` beside it (non-finite or ≤0 depth → invalid).
    Evaluation: resize the short side to the size and center-crop (our simplification of
    sliding-window evaluation).
    """

    def __init__(self, pairs, kind: str, train: bool, mean, std, scale_range=(0.5, 2.0), seed: int = 0,
                 ignore_index: int = 255):
        self.pairs, self.kind, self.train = pairs, kind, train
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.scale_range = tuple(scale_range)
        self.seed, self.ignore_index = seed, ignore_index

    def __len__(self):
        return len(self.pairs)

    def placeholder(self, size):
        fill = self.ignore_index if self.kind == "ade20k" else 0
        dtype = torch.long if self.kind == "ade20k" else torch.float32
        return torch.full((size, size), fill, dtype=dtype)

    def _read(self, index):
        from PIL import Image

        img_path, tgt_path = self.pairs[index]
        with Image.open(img_path) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        if self.kind == "ade20k":
            with Image.open(tgt_path) as t:
                lab = torch.from_numpy(np.asarray(t).astype(np.int64).copy())
            target = torch.where(lab == 0, torch.full_like(lab, self.ignore_index), lab - 1)[None]
        else:
            depth = torch.from_numpy(np.load(tgt_path).astype(np.float32))
            target = torch.where(torch.isfinite(depth) & (depth > 0), depth, torch.zeros_like(depth))[None]
        if img.shape[-2:] != target.shape[-2:]:
            raise ValueError("image and target sizes differ")
        return img, target

    def __getitem__(self, item):
        index, size, epoch = item
        try:
            img, target = self._read(index)
        except Exception:  # unreadable image or target: skipped and counted, never fatal
            return None, size
        if self.train:
            fill = self.ignore_index if self.kind == "ade20k" else 0
            img, target = _joint_random_crop(sample_rng(self.seed, epoch, index), img, target, size,
                                             self.scale_range, fill)
        else:
            img, target = _center(img, target, size)
        x = (img.float() / 255.0 - self.mean) / self.std
        return x, target[0]


def _pairs(root: Path, kind: str, split: str):
    if kind == "ade20k":
        folder = root / "images" / split
        return [(str(p), str(root / "annotations" / split / (p.stem + ".png")))
                for p in sorted(folder.glob("*.jpg")) if (root / "annotations" / split / (p.stem + ".png")).exists()]
    return [(str(p), str(p.with_name(p.name[: -len("_rgb.png")] + "_depth.npy")))
            for p in sorted((root / split).rglob("*_rgb.png"))
            if p.with_name(p.name[: -len("_rgb.png")] + "_depth.npy").exists()]


def build_dense_splits(cfg) -> Splits:
    """Train and validation :class:`DenseFolder` sets for ``data.kind`` ade20k or hypersim.

    Raises a one-line :class:`ConfigError` when the folder or its layout is missing.
    """
    d = cfg["data"]
    kind = d["kind"]
    root = Path(d["root"] or "").expanduser()
    if not d["root"] or not root.is_dir():
        raise ConfigError(f"data folder not found: {root} (set data.root=...)")
    splits = ("training", "validation") if kind == "ade20k" else ("train", "val")
    pairs = {s: _pairs(root, kind, s) for s in splits}
    if not pairs[splits[0]] or not pairs[splits[1]]:
        layout = ("images/{training,validation}/*.jpg + annotations/{training,validation}/*.png"
                  if kind == "ade20k" else "{train,val}/**/*_rgb.png + *_depth.npy")
        raise ConfigError(f"{root} must hold {layout}")
    common = dict(kind=kind, mean=d["mean"], std=d["std"], ignore_index=cfg["dense"]["ignore_index"])
    train = DenseFolder(pairs[splits[0]], train=True, scale_range=cfg["dense"]["scale_range"], seed=cfg["seed"],
                        **common)
    val = DenseFolder(pairs[splits[1]], train=False, **common)
    return Splits(train, val, cfg["dense"]["num_classes"] if kind == "ade20k" else 0, tuple(d["mean"]), tuple(d["std"]))
