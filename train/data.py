"""Data for training and evaluation: image folders, in-memory scenes, and a resumable batch plan.

Two ideas keep runs reproducible and resumable:

* :class:`BatchPlan` turns ``(seed, epoch)`` into the full list of batches of an epoch
  (sizes and indices, for every process). It is a pure function, so all processes
  agree without talking, and a resumed run only needs "epoch, batches done".
* Augmentation randomness comes from ``(seed, epoch, index)`` of each sample, not from
  a global RNG, so it is the same with 0 or 8 loader workers and before or after a resume.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------- batch plan

@dataclass
class BatchPlan:
    """Every process's batches for an epoch, from ``(seed, epoch)`` alone.

    Parameters
    ----------
    num_samples : int
    batch_size : int
        Per process, at ``base_size`` (or for every batch without multi-resolution).
    seed : int
    rank, world_size : int
        Rank ``r`` takes the ``r``-th slice of each global batch, so every process sees the
        same number of batches of the same image size (DDP steps stay in lock-step).
    sizes : list of int or None
        Multi-resolution: each batch draws its size from this list.
    base_size : int
        Training size; with ``pixel_budget`` None the budget is ``batch_size · base_size²``.
    pixel_budget : int or None
        Pixels per process per batch; batch size at size ``s`` is ``round(budget / s²)``.
    shuffle : bool
        False for evaluation: sequential order, the last partial batch kept.
    """

    num_samples: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    sizes: list | None = None
    base_size: int = 224
    pixel_budget: int | None = None
    shuffle: bool = True

    def batch_size_for(self, size: int) -> int:
        if not self.sizes:
            return self.batch_size
        budget = self.pixel_budget or self.batch_size * self.base_size ** 2
        return max(1, int(round(budget / size ** 2)))

    def _global_plan(self, epoch: int):
        """[(size, start, per_process_batch)] for the epoch, and the index order."""
        if not self.shuffle:
            order = np.arange(self.num_samples)
            step = self.batch_size * self.world_size
            plan = [(self.base_size, s, self.batch_size) for s in range(0, self.num_samples, step)]
            return plan, order
        rng = np.random.default_rng([int(self.seed), int(epoch), 0x5A5A])
        order = rng.permutation(self.num_samples)
        plan, start = [], 0
        while True:
            size = int(self.sizes[rng.integers(len(self.sizes))]) if self.sizes else self.base_size
            b = self.batch_size_for(size)
            if start + b * self.world_size > self.num_samples:  # drop the last partial global batch
                break
            plan.append((size, start, b))
            start += b * self.world_size
        return plan, order

    def num_batches(self, epoch: int) -> int:
        return len(self._global_plan(epoch)[0])

    def batches(self, epoch: int, start_batch: int = 0):
        """This process's batches, each a list of ``(index, size, epoch)``, from ``start_batch`` on."""
        plan, order = self._global_plan(epoch)
        out = []
        for size, start, b in plan[start_batch:]:
            lo = start + self.rank * b
            if self.shuffle:
                idx = order[lo:lo + b]
            else:  # evaluation: strided shard of a sequential chunk, possibly short or empty
                chunk = order[start:start + b * self.world_size]
                idx = chunk[self.rank::self.world_size]
            out.append([(int(i), int(size), int(epoch)) for i in idx])
        return out


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """Per-sample augmentation RNG; independent of workers, processes and resumes."""
    return random.Random(f"{seed}/{epoch}/{index}")


# --------------------------------------------------------------------------- transforms

def random_resized_crop_box(rng: random.Random, width: int, height: int, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop parameters, drawn from ``rng``: (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback as torchvision: the central crop with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageTransform:
    """SPEC §1 transforms. Train: RandomResizedCrop + flip; eval: resize ×ratio then center-crop."""

    def __init__(self, mean, std, train: bool, crop_scale=(0.08, 1.0), hflip=True,
                 eval_crop_ratio=1.143, interpolation="bicubic"):
        from torchvision.transforms import InterpolationMode

        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.train = train
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.eval_crop_ratio = eval_crop_ratio
        self.interpolation = InterpolationMode(interpolation)

    def __call__(self, img, size: int, rng: random.Random | None):
        import torchvision.transforms.functional as TF

        if self.train:
            top, left, h, w = random_resized_crop_box(rng, img.width, img.height, self.crop_scale)
            img = TF.resized_crop(img, top, left, h, w, [size, size], self.interpolation, antialias=True)
            if self.hflip and rng.random() < 0.5:
                img = TF.hflip(img)
        else:
            img = TF.resize(img, int(round(size * self.eval_crop_ratio)), self.interpolation, antialias=True)
            img = TF.center_crop(img, [size, size])
        x = TF.pil_to_tensor(img).float().div_(255.0)
        return (x - self.mean) / self.std


# --------------------------------------------------------------------------- image folders

def _list_images(folder: Path, class_to_idx: dict):
    items = []
    for cls in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        if cls not in class_to_idx:
            continue
        for path in sorted((folder / cls).rglob("*")):
            if path.suffix.lower() in IMG_EXTENSIONS and path.is_file():
                items.append((str(path), class_to_idx[cls]))
    return items


def find_split_dirs(root) -> tuple[list[Path], Path]:
    """ImageNet-100 layout (``train.X1..X4``, ``val.X``) or a plain ``train/``, ``val/``.

    Raises a one-line :class:`ConfigError` when the folder or a split is missing.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data folder not found: {root} (set data.root=...)")
    train_dirs = sorted(p for p in root.glob("train.X*") if p.is_dir())
    if not train_dirs and (root / "train").is_dir():
        train_dirs = [root / "train"]
    val_dir = next((root / v for v in ("val.X", "val") if (root / v).is_dir()), None)
    if not train_dirs or val_dir is None:
        raise ConfigError(f"{root} must hold train.X1..X4 and val.X (ImageNet-100 layout) "
                          "or train/ and val/, each with one sub-folder per class")
    return train_dirs, val_dir


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images from class sub-folders; an unreadable file is skipped and counted, never fatal.

    ``dataset[(index, size, epoch)]`` returns ``(tensor, label)``, or ``(None, size)`` for a
    file that cannot be decoded (the size lets the collate build a placeholder).
    """

    def __init__(self, folders, class_to_idx: dict, transform: ImageTransform, seed: int = 0):
        self.samples = [s for folder in folders for s in _list_images(Path(folder), class_to_idx)]
        self.classes = sorted(class_to_idx, key=class_to_idx.get)
        self.transform = transform
        self.seed = seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, size, epoch = item
        path, label = self.samples[index]
        try:
            from PIL import Image

            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception:  # truncated, corrupt, not an image: skip, never stop the run
            return None, size
        rng = sample_rng(self.seed, epoch, index) if self.transform.train else None
        return self.transform(img, size, rng), label


class SkipCollate:
    """Stack the readable samples; returns ``(images, targets, n_unreadable)``.

    Targets are class labels (stacked into a vector) or per-pixel maps (stacked). A batch
    whose every image is unreadable becomes one zero image whose target the loss ignores
    (label -1, or the dataset's ``placeholder(size)``), so every process still takes the step.
    """

    def __init__(self, placeholder=None):
        self.placeholder = placeholder

    def __call__(self, items):
        good = [it for it in items if it[0] is not None]
        skipped = len(items) - len(good)
        if not good:
            size = items[0][1]
            target = (self.placeholder(size)[None] if self.placeholder is not None
                      else torch.full((1,), -1, dtype=torch.long))
            return torch.zeros(1, 3, size, size), target, skipped
        x = torch.stack([g[0] for g in good])
        if torch.is_tensor(good[0][1]):
            y = torch.stack([g[1] for g in good])
        else:
            y = torch.tensor([g[1] for g in good], dtype=torch.long)
        return x, y, skipped


collate_skipping = SkipCollate()


# --------------------------------------------------------------------------- in-memory data

class TensorImages:
    """Images already in memory ``(N, 3, H, W)`` (normalised) with labels; resized per batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        self.images = images
        self.labels = labels
        self.num_classes = num_classes
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __len__(self):
        return len(self.labels)

    def batch(self, items):
        idx = torch.tensor([i for i, _, _ in items], dtype=torch.long)
        size = items[0][1]
        x = self.images[idx]
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return x, self.labels[idx], 0


def synthetic_images(num: int, size: int, num_classes: int, seed: int, split: str) -> TensorImages:
    """Class = a fixed smooth random pattern, plus noise: learnable in a few steps (tests, bench)."""
    g = torch.Generator().manual_seed(1234)  # the class patterns are shared by both splits
    low = torch.randn(num_classes, 3, 4, 4, generator=g)
    patterns = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(int(seed) * 2 + (split == "val"))
    labels = torch.randint(0, num_classes, (num,), generator=g)
    images = patterns[labels] + 0.5 * torch.randn(num, 3, size, size, generator=g)
    return TensorImages(images, labels, num_classes)


def scene_images(num: int, size: int, task: str, split: str) -> TensorImages:
    """Procedural scenes from ``asg_probe.scenes`` (content correlates with position), in memory."""
    try:
        from asg_probe.scenes import SceneDataset
    except ImportError as exc:
        raise ConfigError(f"data.kind=scenes needs asg_probe.scenes ({exc})") from None
    # The scene content is fixed (data seed 0) so that run seeds vary only init and order.
    ds = SceneDataset(num, img_size=size, task=task, seed=0, split=split)
    xs, ys = [], []
    for i in range(len(ds)):
        x, y = ds[i]
        xs.append(torch.as_tensor(x, dtype=torch.float32))
        ys.append(int(y))
    images = torch.stack(xs)
    if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:  # HWC → CHW
        images = images.permute(0, 3, 1, 2)
    mean = torch.as_tensor(ds.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(ds.std, dtype=torch.float32).view(1, -1, 1, 1)
    return TensorImages((images - mean) / std, torch.tensor(ys), int(ds.num_classes),
                        mean.flatten().tolist(), std.flatten().tolist())


def photo_images(num: int, size: int, split: str, class_names=None) -> TensorImages:
    """Random crops of the photographs bundled with scikit-image/scikit-learn; label = source photo.

    Train and validation crops come from different seeds of ``asg_probe.data.embedded_images``.
    Random crops leave little correlation between content and position (a useful contrast to scenes).
    """
    from asg_probe.data import IMAGENET_MEAN, IMAGENET_STD, embedded_images

    crops = embedded_images(num_images=num, img_size=size, seed=0 if split == "train" else 1)
    names = [n.split("[")[0] for n in crops.names]
    class_names = class_names or sorted(set(names))
    index = {c: i for i, c in enumerate(class_names)}
    labels = torch.tensor([index[n] for n in names])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = (crops.images.float() / 255.0 - mean) / std
    out = TensorImages(images, labels, len(class_names), IMAGENET_MEAN, IMAGENET_STD)
    out.class_names = class_names
    return out


# --------------------------------------------------------------------------- building

@dataclass
class Splits:
    train: object
    val: object
    num_classes: int
    mean: tuple = (0.485, 0.456, 0.406)   # the normalisation the model is trained with,
    std: tuple = (0.229, 0.224, 0.225)    # recorded in the exported checkpoint


def build_image_splits(cfg: dict) -> Splits:
    """Train and validation sets of a classification config; raises one-line errors on bad data.

    ``data.kind``: ``synthetic``, ``photos``, ``scenes`` (in memory) or ``imagefolder``. The dense
    tasks' data is in :mod:`asg_train.dense_data`; :meth:`asg_train.tasks.Task.build_splits`
    picks the right one.
    """
    d = cfg["data"]
    size = cfg["model"]["img_size"]
    if d["kind"] == "synthetic":
        n_cls = d["num_classes"] or 10
        return Splits(synthetic_images(d["num_train"], size, n_cls, 0, "train"),
                      synthetic_images(d["num_val"], size, n_cls, 0, "val"), n_cls, (0.0,) * 3, (1.0,) * 3)
    if d["kind"] == "photos":
        train = photo_images(d["num_train"], size, "train")
        val = photo_images(d["num_val"], size, "val", class_names=train.class_names)
        return Splits(train, val, train.num_classes, train.mean, train.std)
    if d["kind"] == "scenes":
        train = scene_images(d["num_train"], size, d["task"], "train")
        val = scene_images(d["num_val"], size, d["task"], "val")
        return Splits(train, val, train.num_classes, train.mean, train.std)
    train_dirs, val_dir = find_split_dirs(d["root"])
    classes = sorted({p.name for t in train_dirs for p in t.iterdir() if p.is_dir()})
    if not classes:
        raise ConfigError(f"no class sub-folders in {', '.join(map(str, train_dirs))}")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    common = dict(mean=d["mean"], std=d["std"], interpolation=d["interpolation"])
    train = ImageFolderDataset(train_dirs, class_to_idx, seed=cfg["seed"], transform=ImageTransform(
        train=True, crop_scale=d["crop_scale"], hflip=d["hflip"], **common))
    val = ImageFolderDataset([val_dir], class_to_idx, transform=ImageTransform(
        train=False, eval_crop_ratio=d["eval_crop_ratio"], **common))
    if len(train) == 0:
        raise ConfigError(f"no images found under {', '.join(map(str, train_dirs))}")
    n_cls = d["num_classes"] or len(classes)
    return Splits(train, val, n_cls, tuple(d["mean"]), tuple(d["std"]))


def iterate_batches(dataset, batches, num_workers: int = 0, seed: int = 0, pin_memory: bool = False):
    """Yield ``(images, labels, n_unreadable)`` for a list of planned batches."""
    if isinstance(dataset, TensorImages):
        for items in batches:
            yield dataset.batch(items)
        return
    if not batches:
        return
    # A private generator: creating the loader must not draw from the global torch RNG,
    # or a resumed run would see different dropout/drop-path noise than an uninterrupted one.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers,
        collate_fn=SkipCollate(getattr(dataset, "placeholder", None)),
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(int(seed)),
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)
    yield from loader
