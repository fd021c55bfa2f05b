"""Procedural outdoor scenes in which content correlates with position.

Random crops of photographs leave little relation between what a patch shows
and where it sits, so a guidance loss has little to learn from. These scenes put
position into content on purpose, on both axes, without making it trivial:

- **rows**: sky (blue, lighter towards a horizon whose height varies) above
  textured ground whose stripes get wider towards the viewer (perspective);
- **columns**: a sun on the left or right lights the scene, so brightness
  falls off across the columns (direction varies per scene);
- **objects** stand on the ground and are drawn larger the nearer (lower) they are.

Tasks: ``"count"`` (0–4 objects, 5 classes) and ``"nearest_side"`` (is the
nearest object in the left or right half, 2 classes) — both need the model to
combine what it sees with where it sees it.
"""
from __future__ import annotations

import numpy as np
import torch

TASKS = {"count": 5, "nearest_side": 2}
_SPLITS = {"train": 0, "val": 1, "test": 2}
# Per-channel statistics of the scenes (measured on 4096 training scenes at 32 px).
SCENE_MEAN = (0.32, 0.44, 0.39)
SCENE_STD = (0.16, 0.14, 0.30)


def render_scene(rng: np.random.Generator, img_size: int = 32, task: str = "count"):
    """Draw one scene.

    Returns
    -------
    image : uint8 ndarray (H, W, 3)
    meta : dict
        ``horizon`` (row), ``sun`` ("left"/"right"), ``objects`` (list of (row, col, radius)
        in pixels), ``label``.

    Examples
    --------
    >>> img, meta = render_scene(np.random.default_rng(0), 32)
    >>> img.shape, img.dtype, meta["label"] == len(meta["objects"])
    ((32, 32, 3), dtype('uint8'), True)
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    S = int(img_size)
    rows = np.arange(S, dtype=np.float32)[:, None] / (S - 1)   # (S, 1) 0 top .. 1 bottom
    cols = np.arange(S, dtype=np.float32)[None, :] / (S - 1)   # (1, S)
    horizon = rng.uniform(0.3, 0.55)
    sun_left = rng.random() < 0.5
    light = (1.0 - cols) if sun_left else cols                  # 1 next to the sun
    light = 0.65 + 0.35 * light

    sky_t = np.clip(rows / horizon, 0, 1)                       # 0 at the top, 1 at the horizon
    sky = np.stack([0.25 + 0.45 * sky_t, 0.45 + 0.35 * sky_t, 0.85 + 0.1 * sky_t], -1)
    ground_t = np.clip((rows - horizon) / (1 - horizon), 0, 1)  # 0 at the horizon, 1 at the bottom
    # perspective stripes: phase grows like 1/depth, so stripes widen towards the viewer
    phase = rng.uniform(0, 2 * np.pi) + 9.0 * np.log1p(6.0 * ground_t)
    stripes = 0.5 + 0.5 * np.sin(phase)
    grass = np.stack([0.25 + 0.2 * stripes, 0.45 + 0.25 * stripes, 0.15 + 0.1 * stripes], -1)
    ground = grass * (0.6 + 0.4 * ground_t[..., None])          # nearer ground is brighter
    is_sky = (rows < horizon)[..., None]
    image = np.where(is_sky, sky, ground) * light[..., None]
    image = np.broadcast_to(image, (S, S, 3)).copy()

    # sun disc in the upper corner on its side
    sun_c = (0.08 + 0.1 * rng.random()) * S, (0.12 if sun_left else 0.88) * S
    rr, cc = np.mgrid[0:S, 0:S].astype(np.float32)
    sun = (rr - sun_c[0]) ** 2 + (cc - sun_c[1]) ** 2 < (0.07 * S) ** 2
    image[sun & is_sky[..., 0]] = (1.0, 0.95, 0.6)

    count = int(rng.integers(0, 5)) if task == "count" else int(rng.integers(1, 5))
    objects = []
    for _ in range(count):
        depth = rng.uniform(0.05, 1.0)                          # 0 far (horizon) .. 1 near
        row = (horizon + depth * (1 - horizon) * 0.92) * (S - 1)
        radius = S * (0.025 + 0.085 * depth)
        col = rng.uniform(radius, S - 1 - radius)
        colour = np.array([rng.uniform(0.5, 0.95), rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.5)])
        body = ((rr - (row - radius)) / radius) ** 2 + ((cc - col) / (0.8 * radius)) ** 2 < 1.0
        image[body] = colour * (0.75 + 0.25 * (light[0, np.clip(np.round(cc[body]).astype(int), 0, S - 1)]))[:, None]
        objects.append((float(row), float(col), float(radius)))
    image += rng.normal(0, 0.02, size=image.shape)              # sensor noise
    image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    if task == "count":
        label = count
    else:
        nearest = max(objects, key=lambda o: o[0])
        label = int(nearest[1] >= S / 2)
    return image, {"horizon": horizon * (S - 1), "sun": "left" if sun_left else "right", "objects": objects,
                   "label": label}


class SceneDataset(torch.utils.data.Dataset):
    """A deterministic set of procedural scenes: item ``i`` is the same on every machine.

    Items are ``(image, label)`` with ``image`` a float tensor ``(3, S, S)`` in [0, 1];
    normalise with ``mean``/``std``. Splits draw from disjoint random streams.

    Parameters
    ----------
    num_samples : int
    img_size : int, default 32
    task : {"count", "nearest_side"}
    seed : int
    split : {"train", "val", "test"}

    Examples
    --------
    >>> ds = SceneDataset(8, img_size=32, task="count")
    >>> x, y = ds[0]
    >>> x.shape, ds.num_classes, 0 <= y < 5
    (torch.Size([3, 32, 32]), 5, True)
    """

    def __init__(self, num_samples: int, img_size: int = 32, task: str = "count", seed: int = 0,
                 split: str = "train"):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {sorted(_SPLITS)}")
        self.num_samples = int(num_samples)
        self.img_size = int(img_size)
        self.task = task
        self.seed = int(seed)
        self.split = split
        self.num_classes = TASKS[task]
        self.mean, self.std = SCENE_MEAN, SCENE_STD

    def __len__(self):
        return self.num_samples

    def render(self, index: int):
        """``(uint8 image (H, W, 3), metadata)`` of item ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} scenes")
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], int(index)])
        return render_scene(rng, self.img_size, self.task)

    def __getitem__(self, index):
        image, meta = self.render(int(index))
        return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0), meta["label"]

    def images(self, count=None) -> torch.Tensor:
        """The first ``count`` scenes as uint8 ``(N, 3, S, S)`` (for probes and notebooks)."""
        n = self.num_samples if count is None else min(int(count), self.num_samples)
        return torch.stack([torch.from_numpy(self.render(i)[0]).permute(2, 0, 1) for i in range(n)])
