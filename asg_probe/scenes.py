"""Procedural outdoor scenes in which content correlates with position.

Random crops of photographs leave little relation between what a patch shows and
where it sits, so a guidance loss has little to learn from. These scenes put
position into content on purpose, on both axes, without making it trivial
(every cue is relative to something that varies per scene):

- **rows**: a sky that lightens towards a horizon whose height varies (30–55% of
  the image), above a ground plane seen in perspective: its cross-stripes bunch up
  and fade into haze towards the horizon, so texture frequency rises with height;
- **columns**: furrows on the ground converge on a vanishing point whose column
  varies (20–80%), so their slant tells a patch how far left or right of it it is;
  a sun near the left or right edge lights the scene, so brightness falls off
  across the columns, objects are lit on the sun's side and cast shadows away from it;
- **objects**: rocks and posts stand on the ground, drawn at a size proportional to
  their foot's distance below the horizon (times a per-object scale); balloons
  float in the sky. Objects never overlap.

Tasks (``TASKS`` maps name → number of classes):

``"count"``
    number of objects, 0–4 (5 classes, uniform).
``"quadrant"``
    which quadrant holds the centre of the largest object (by area): 0 top-left,
    1 top-right, 2 bottom-left, 3 bottom-right (4 classes, uniform by construction;
    1–3 other objects, each at most 80% of its area).
``"nearest_side"`` (alias ``"left_right"``)
    is the nearest ground object (lowest foot) in the left (0) or right (1) half.
    With per-object scales the nearest object is not always the largest, so the
    model has to read depth from row position.

Examples
--------
>>> ds = SceneDataset(4, img_size=32, task="quadrant")
>>> image, label = ds[0]
>>> image.shape, ds.num_classes
(torch.Size([3, 32, 32]), 4)
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .errors import UsageError

TASKS = {"count": 5, "quadrant": 4, "nearest_side": 2}
_ALIASES = {"left_right": "nearest_side"}
_SPLITS = {"train": 0, "val": 1, "test": 2}
# Per-channel mean/std of the [0, 1] pixels (1500 training scenes per task at 32 px; they move
# by < 0.01 across tasks and between 32 and 64 px); a test checks that they stay current.
SCENE_MEAN = (0.38, 0.44, 0.46)
SCENE_STD = (0.16, 0.17, 0.31)

_SKY_TOP = np.array([0.16, 0.32, 0.72], np.float32)
_SKY_HORIZON = np.array([0.68, 0.78, 0.90], np.float32)
_SUN = np.array([1.0, 0.96, 0.75], np.float32)
_GLOW = np.array([0.35, 0.28, 0.12], np.float32)
_GROUNDS = np.array([[0.30, 0.50, 0.18],    # grass
                     [0.52, 0.46, 0.28],    # dry field
                     [0.38, 0.42, 0.20]],   # olive
                    np.float32)
_OBJECT_COLOURS = np.array([[0.80, 0.20, 0.15], [0.20, 0.25, 0.70], [0.85, 0.85, 0.82], [0.18, 0.16, 0.18],
                            [0.60, 0.25, 0.60], [0.90, 0.55, 0.10]], np.float32)
# kind: (aspect width/height, smallest and largest scale of height per unit of depth below the horizon)
_ROCK = (1.4, 0.35, 0.55)
_POST = (0.45, 0.8, 1.2)
_MAX_OBJECTS = 4
_NOISE = 0.02 * math.sqrt(3)  # half-width of uniform noise with std 0.02
_BIG_SHARE = 0.8  # quadrant task: every other object has at most this share of the largest one's area


def _task_name(task: str) -> str:
    task = _ALIASES.get(task, task)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS) + sorted(_ALIASES)}")
    return task


@functools.lru_cache(maxsize=8)
def _grid(size: int):
    """Pixel-centre coordinates in [0, 1]: rows ``(S, 1)`` and columns ``(1, S)``, float32."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    c.setflags(write=False)
    return c[:, None], c[None, :]


def _ellipse_alpha(yy, xx, cy, cx, ry, rx, size):
    """Antialiased coverage of an ellipse, from the approximate signed distance to its edge in pixels."""
    q = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    # minimum/maximum: np.clip's Python-level dispatch costs more than the arithmetic at this size
    return np.minimum(np.maximum((0.5 + min(ry, rx) * size) - np.sqrt(q) * (min(ry, rx) * size), 0.0), 1.0)


def _window(cy, cx, ry, rx, size):
    r0, r1 = max(int(math.floor((cy - ry) * size)) - 1, 0), min(int(math.ceil((cy + ry) * size)) + 1, size)
    c0, c1 = max(int(math.floor((cx - rx) * size)) - 1, 0), min(int(math.ceil((cx + rx) * size)) + 1, size)
    return slice(r0, r1), slice(c0, c1)


class _Layout:
    """Objects as bounding boxes in [0, 1] image coordinates, placed without overlap.

    Candidates are drawn a dozen at a time as arrays (one generator call per round), and
    the first that fits is kept: a Python loop per candidate would dominate rendering time.
    """

    def __init__(self, rng, size, horizon):
        self.rng, self.size, self.h = rng, size, horizon
        self.min_h = 2.5 / size  # smaller than ~2.5 px tall (or 1.5 px wide) would not be countable
        self.min_w = 1.5 / size
        self.boxes = []      # (top, bottom, left, right) of placed objects
        self._grown = None   # the same boxes grown by the one-pixel gap, (4, m, 1) for broadcasting
        self.objects = []

    def _ground(self, u, max_area=None, centre=None):
        """Candidate rocks and posts from uniforms ``u`` (4, n): kind, scale, foot row, column."""
        h = self.h
        post = u[0] < 0.5
        aspect = np.where(post, _POST[0], _ROCK[0])
        k = np.where(post, _POST[1] + u[1] * (_POST[2] - _POST[1]), _ROCK[1] + u[1] * (_ROCK[2] - _ROCK[1]))
        lo = h + np.maximum(self.min_h, self.min_w / aspect) / k
        hi = 0.97
        if max_area is not None:  # keeps the ellipse area pi/4 * aspect * height**2 under max_area
            hi = np.minimum(hi, h + np.sqrt(max_area / (math.pi / 4 * aspect)) / k)
        if centre is not None:  # quadrant: box centre below the middle row, foot - height / 2 > 0.52
            lo = np.maximum(lo, (0.52 - k * h / 2) / (1 - k / 2))
        foot = lo + u[2] * np.maximum(hi - lo, 0)
        height = k * (foot - h)
        return post, height, aspect * height, foot, hi >= lo

    def _balloon(self, u, max_area=None, big=False):
        """Candidate balloons from uniforms ``u`` (4, n): diameter, centre row wholly in the sky."""
        h = self.h
        dmin, dmax = (0.16, 0.26) if big else (max(self.min_h, 0.05), 0.16)
        if max_area is not None:
            dmax = min(dmax, math.sqrt(max_area / (math.pi / 4)))
        d = dmin + u[1] * max(dmax - dmin, 0)
        top = 0.02 + u[2] * np.maximum(h - 0.03 - d, 0)
        return None, d, d, top + d, (dmax >= dmin) & (top + d <= h - 0.01)

    def place(self, kind, tries=12, rounds=3, max_area=None, centre=None, big=False):
        """Place one object of ``kind`` ("ground", "balloon"); False when no candidate fits.

        ``centre`` ("left"/"right") keeps the box centre in that half; ``max_area`` caps the
        ellipse area (fractions of the image); ``big`` draws a large balloon.
        """
        m = 1.0 / self.size
        for _ in range(rounds):
            u = self.rng.random((4, tries))
            if kind == "ground":
                post, height, width, bottom, ok = self._ground(u, max_area, centre)
            else:
                post, height, width, bottom, ok = self._balloon(u, max_area, big)
            lo, hi = width / 2, 1 - width / 2
            if centre == "left":
                hi = np.minimum(hi, 0.48)
            elif centre == "right":
                lo = np.maximum(lo, 0.52)
            col = lo + u[3] * np.maximum(hi - lo, 0)
            top, left, right = bottom - height, col - width / 2, col + width / 2
            ok = ok & (hi >= lo)
            if self.boxes:  # clear every placed box by a pixel
                t, b, l, r = self._grown
                ok &= ((bottom <= t) | (top >= b) | (right <= l) | (left >= r)).all(axis=0)
            if ok.any():
                i = int(np.argmax(ok))
                self.boxes.append((top[i] - m, bottom[i] + m, left[i] - m, right[i] + m))
                self._grown = np.array(self.boxes).T[..., None]
                self.objects.append({"kind": "balloon" if post is None else ("post" if post[i] else "rock"),
                                     "top": float(top[i]), "bottom": float(bottom[i]), "col": float(col[i]),
                                     "height": float(height[i]), "width": float(width[i])})
                return True
        return False


def _draw_object(image, obj, colour, sun_dir, light, size):
    """Paint a rock, post or balloon as a shaded ellipse filling its box."""
    yy, xx = _grid(size)
    cy, cx = obj["bottom"] - obj["height"] / 2, obj["col"]
    ry, rx = obj["height"] / 2, obj["width"] / 2
    rows, cols = _window(cy, cx, ry, rx, size)
    y, x = yy[rows], xx[:, cols]
    alpha = _ellipse_alpha(y, x, cy, cx, ry, rx, size)[..., None]
    # lit on the sun's side: brightness rises towards the sun across the body
    shade = 0.78 + np.minimum(np.maximum((x - cx) * (-0.22 * sun_dir / rx), -0.22), 0.22)
    body = colour * (shade * light[:, cols])[..., None]
    image[rows, cols] = image[rows, cols] * (1 - alpha) + body * alpha


def _draw_shadow(image, obj, sun_dir, size):
    yy, xx = _grid(size)
    w = obj["width"]
    cy, cx = obj["bottom"], obj["col"] + sun_dir * 0.55 * max(w, 0.5 * obj["height"])  # falls away from the sun
    ry, rx = max(0.08 * obj["height"], 0.6 / size), 0.5 * w + 0.35 * obj["height"]
    rows, cols = _window(cy, cx, ry, rx, size)
    alpha = _ellipse_alpha(yy[rows], xx[:, cols], cy, cx, ry, rx, size)[..., None]
    image[rows, cols] *= 1 - 0.45 * alpha


def render_scene(rng: np.random.Generator, img_size: int = 32, task: str = "count", target: int | None = None):
    """Draw one scene.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness: the same generator state gives the same scene.
    img_size : int
        Side in pixels (the scene is resolution-independent; 32 and 64 are the intended sizes).
    task : {"count", "quadrant", "nearest_side", "left_right"}
        Decides how objects are laid out and what ``meta["label"]`` is.
    target : int, optional
        Label to draw a scene for (default: uniform over the task's classes). For
        ``"nearest_side"`` the label follows from the layout and ``target`` is ignored.

    Returns
    -------
    image : uint8 ndarray (H, W, 3)
    meta : dict
        ``horizon`` (row, pixels), ``vanishing_col`` (column, pixels), ``sun`` ("left" or
        "right"), ``sun_pos`` ((row, col), pixels), ``objects`` (list of dicts with ``kind``
        ("rock", "post", "balloon"), ``row``/``col`` (box centre), ``height``, ``width``,
        ``area`` (ellipse area), ``foot`` (ground row of rocks and posts, else None), all in
        pixels, pixel ``i`` spanning ``[i, i + 1)``), ``label`` and ``task``.

    Examples
    --------
    >>> img, meta = render_scene(np.random.default_rng(0), 32)
    >>> img.shape, img.dtype, meta["label"] == len(meta["objects"])
    ((32, 32, 3), dtype('uint8'), True)
    """
    task = _task_name(task)
    S = int(img_size)
    if S < 8:
        raise UsageError(f"img_size must be at least 8, got {S}")
    yy, xx = _grid(S)
    # one generator call for all scene parameters: per-call overhead dominates at this size
    u = rng.random(12)
    h = 0.30 + 0.25 * u[0]                       # horizon row, as a fraction of the height
    vx = 0.2 + 0.6 * u[1]                        # vanishing-point column
    sun_left = bool(u[2] < 0.5)
    sun_dir = 1.0 if sun_left else -1.0          # +1: shadows fall to the right
    sun_x = 0.06 + 0.16 * u[3]
    sun_x = sun_x if sun_left else 1 - sun_x
    sun_y = 0.05 + 0.15 * u[4]
    exposure = 0.85 + 0.25 * u[5]
    ground_colour = _GROUNDS[int(u[6] * len(_GROUNDS))] * (0.9 + 0.2 * u[7:10]).astype(np.float32)
    phase = 2 * np.pi * u[10:12]

    light = (1.0 - 0.4 * np.abs(xx - sun_x)).astype(np.float32)      # (1, S): falls off away from the sun
    image = np.empty((S, S, 3), np.float32)
    r_h = int(np.searchsorted(yy[:, 0], h, side="right"))                 # first ground row

    # sky: darker overhead, pale at the horizon, glowing around the sun (a separable Gaussian)
    ys = yy[:r_h]
    t = np.minimum(ys / h, 1)[..., None]
    glow = (np.exp(-(ys - sun_y) ** 2 / 0.045) * np.exp(-(xx - sun_x) ** 2 / 0.045))[..., None]
    image[:r_h] = _SKY_TOP + (_SKY_HORIZON - _SKY_TOP) * t + _GLOW * glow

    # ground plane in perspective: depth ~ 1/d, lateral offset ~ (x - vx)/d
    d = yy[r_h:] - h                                                      # (G, 1), > 0
    furrow = np.sin((xx - vx) * (4 * np.pi / d) + phase[0])              # lines converging on (h, vx)
    cross = np.sin((2 * np.pi / 1.5) / d + phase[1])                      # bands bunching up at the horizon
    # fade each pattern once its period nears two pixels, instead of aliasing into noise
    fade_f = np.minimum(np.maximum((0.5 * S) * d - 2.0, 0), 2.0) * (0.14 / 2)
    fade_c = np.minimum(np.maximum((1.5 * S) * d * d - 2.0, 0), 2.0) * (0.10 / 2)
    near = 0.7 + 0.3 * (d / (1 - h))                                      # nearer ground is brighter
    shade = (fade_f * furrow + (near + fade_c * cross)) * light
    haze = 0.6 * np.exp(-d / 0.06)[..., None]                             # the far ground fades into the sky
    image[r_h:] = (ground_colour * (1 - haze)) * shade[..., None] + _SKY_HORIZON * haze

    layout = _Layout(rng, S, h)
    if task == "quadrant":
        q = int(rng.integers(4)) if target is None else int(target)
        if not 0 <= q < 4:
            raise ValueError(f"quadrant target must be 0..3, got {target}")
        side = "right" if q % 2 else "left"
        # on an empty layout some candidate fits within a round or two; the bound only guards the loop
        placed = (layout.place("balloon", centre=side, big=True, rounds=50) if q < 2
                  else layout.place("ground", centre=side, rounds=50))
        if not placed:
            raise RuntimeError(f"could not place the largest object (quadrant {q}, horizon {h:.3f})")
        big = layout.objects[0]
        cap = _BIG_SHARE * math.pi / 4 * big["width"] * big["height"]
        for _ in range(int(rng.integers(1, _MAX_OBJECTS))):
            layout.place("ground" if rng.random() < 0.5 else "balloon", max_area=cap)
    else:
        if task == "count":
            n = int(rng.integers(0, _MAX_OBJECTS + 1)) if target is None else int(target)
            if not 0 <= n <= _MAX_OBJECTS:
                raise ValueError(f"count target must be 0..{_MAX_OBJECTS}, got {target}")
        else:
            n = int(rng.integers(1, _MAX_OBJECTS + 1))
        kinds = ["ground" if (i == 0 and task == "nearest_side") or rng.random() < 0.75 else "balloon"
                 for i in range(n)]
        for _ in range(100):
            # a crowded scene can leave no room for a big object: try smaller ones, and in the
            # rare scene with no room at all, lay all objects out afresh
            if all(any(layout.place(kind, max_area=cap) for cap in (None, 0.02, 0.008)) for kind in kinds):
                break
            layout = _Layout(rng, S, h)
        else:
            raise RuntimeError(f"could not lay out {n} objects (horizon {h:.3f})")

    objects = layout.objects
    colours = _OBJECT_COLOURS[rng.integers(len(_OBJECT_COLOURS), size=max(len(objects), 1))]
    colours = colours * rng.uniform(0.85, 1.1, (len(colours), 1)).astype(np.float32)
    ground_objs = sorted((i for i, o in enumerate(objects) if o["kind"] != "balloon"),
                         key=lambda i: objects[i]["bottom"])  # far to near: nearer ones are drawn on top
    for i in ground_objs:
        _draw_shadow(image, objects[i], sun_dir, S)
    for i in ground_objs + [i for i, o in enumerate(objects) if o["kind"] == "balloon"]:
        _draw_object(image, objects[i], colours[i], sun_dir, light, S)

    image *= 255 * exposure
    # sensor noise, std 0.02: uniform, because numpy's float32 normals cost six times as much
    noise = rng.random(image.shape, dtype=np.float32)
    image += noise * (2 * _NOISE * 255) + (0.5 - _NOISE * 255)           # + 0.5 rounds on the cast
    np.maximum(image, 0, out=image)
    image = np.minimum(image, 255, out=image).astype(np.uint8)

    meta_objects = []
    for o in objects:
        meta_objects.append({"kind": str(o["kind"]), "row": (o["top"] + o["height"] / 2) * S, "col": o["col"] * S,
                             "height": o["height"] * S, "width": o["width"] * S,
                             "area": math.pi / 4 * o["height"] * o["width"] * S * S,
                             "foot": None if o["kind"] == "balloon" else o["bottom"] * S})
    meta = {"horizon": h * S, "vanishing_col": vx * S, "sun": "left" if sun_left else "right",
            "sun_pos": (sun_y * S, sun_x * S), "objects": meta_objects, "task": task}
    meta["label"] = scene_label(meta, S)
    return image, meta


def scene_label(meta: dict, img_size: int) -> int:
    """The label of a scene, recomputed from its metadata (the single definition of every task).

    Examples
    --------
    >>> scene_label({"task": "quadrant", "objects": [{"row": 30.0, "col": 5.0, "area": 40.0, "foot": 33.0},
    ...                                              {"row": 8.0, "col": 20.0, "area": 9.0, "foot": None}]}, 64)
    0
    """
    objects, half = meta["objects"], img_size / 2
    if meta["task"] == "count":
        return len(objects)
    if meta["task"] == "quadrant":
        big = max(objects, key=lambda o: o["area"])
        return 2 * int(big["row"] >= half) + int(big["col"] >= half)
    ground = [o for o in objects if o["foot"] is not None]
    return int(max(ground, key=lambda o: o["foot"])["col"] >= half)


class SceneDataset(torch.utils.data.Dataset):
    """A deterministic set of procedural scenes: item ``i`` is the same on every run.

    Items are ``(image, label)``: ``image`` a float32 tensor ``(3, S, S)`` in [0, 1]
    (normalise with ``mean``/``std``, or pass ``normalize=True``), ``label`` an int.
    Item ``i`` is drawn from ``numpy.random.default_rng([seed, split, i])``, so any item can
    be rendered alone (resumable runs, workers) and the splits come from separate streams.
    Layouts, metadata and labels are the same on every machine; pixels are byte-identical
    on one machine and numpy build, but numpy's SIMD float32 ``sin``/``exp`` may differ in
    the last bit between CPUs, which can move a rare pixel by one grey level.

    Parameters
    ----------
    num_samples : int
    img_size : int, default 32
    task : {"count", "quadrant", "nearest_side", "left_right"}
    seed : int
    split : {"train", "val", "test"}
    normalize : bool, default False
        Return ``(x - mean) / std`` instead of [0, 1] pixels.

    Attributes
    ----------
    num_classes : int
    mean, std : tuple of float
        Per-channel statistics of the [0, 1] pixels (``SCENE_MEAN``, ``SCENE_STD``).

    Examples
    --------
    >>> ds = SceneDataset(8, img_size=32, task="count")
    >>> x, y = ds[0]
    >>> x.shape, ds.num_classes, 0 <= y < 5
    (torch.Size([3, 32, 32]), 5, True)
    """

    def __init__(self, num_samples: int, img_size: int = 32, task: str = "count", seed: int = 0,
                 split: str = "train", normalize: bool = False):
        task = _task_name(task)
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {sorted(_SPLITS)}")
        self.num_samples = int(num_samples)
        self.img_size = int(img_size)
        self.task = task
        self.seed = int(seed)
        self.split = split
        self.normalize = bool(normalize)
        self.num_classes = TASKS[task]
        self.mean, self.std = SCENE_MEAN, SCENE_STD

    def __len__(self):
        return self.num_samples

    def render(self, index: int):
        """``(uint8 image (H, W, 3), metadata)`` of item ``index`` (see :func:`render_scene`)."""
        index = int(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} scenes")
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        return render_scene(rng, self.img_size, self.task)

    def __getitem__(self, index):
        image, meta = self.render(index)
        x = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
        if self.normalize:
            x = (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)
        return x, meta["label"]

    def arrays(self, count: int | None = None):
        """The first ``count`` scenes as uint8 ``(N, 3, S, S)`` and their labels ``(N,)`` int64.

        Examples
        --------
        >>> x, y = SceneDataset(3).arrays()
        >>> x.dtype, tuple(x.shape), y.shape
        (torch.uint8, (3, 3, 32, 32), torch.Size([3]))
        """
        n = self.num_samples if count is None else min(int(count), self.num_samples)
        images = np.empty((n, self.img_size, self.img_size, 3), np.uint8)
        labels = np.empty(n, np.int64)
        for i in range(n):
            images[i], meta = self.render(i)
            labels[i] = meta["label"]
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)

    def images(self, count: int | None = None) -> torch.Tensor:
        """The first ``count`` scenes as uint8 ``(N, 3, S, S)`` (for probes and notebooks)."""
        return self.arrays(count)[0]
