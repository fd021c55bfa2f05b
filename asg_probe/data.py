"""Images for the probes: built-in photographs (no download) and image folders.

The embedded default takes deterministic random crops of the photographs that
ship inside scikit-image and scikit-learn, so ``asg-probe layerwise`` works on a
machine with no network. :func:`load_images` walks any folder tree, skips and
counts unreadable files, and returns square crops;
:class:`asg_probe.inputs.ImageBatches` feeds them to a model, sharded across
``torchrun`` ranks.

All resizing goes through Pillow's 8-bit bicubic resampler, which is antialiased
and uses fixed-point arithmetic, so the same arguments give the same bytes on
any machine with the same Pillow (float SIMD kernels can differ in the last bit
between CPUs, which would flip the odd uint8 value).

Examples
--------
>>> from asg_probe.data import load_images
>>> imgs = load_images(num_images=4, img_size=32)
>>> tuple(imgs.images.shape), imgs.images.dtype
((4, 3, 32, 32), torch.uint8)
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, UsageError
from .geometry import DEFAULT_IMG_SIZE, IMAGENET_MEAN, IMAGENET_STD, input_config  # noqa: F401 (re-exported)

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

# Colour photographs first; a few greyscale photographs/textures widen the variety and are
# replicated to RGB. ``cat`` is left out: it is the same picture as ``chelsea``.
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                   "retina", "stereo_motorcycle", "camera", "coins", "moon", "grass", "gravel", "brick")


@dataclass
class ImageSet:
    """Images as uint8 ``(N, 3, H, W)`` with where they came from.

    Attributes
    ----------
    images : torch.Tensor
        uint8 ``(N, 3, H, W)``.
    names : list of str
        One per image: the file path for folders, ``"source:photo[top:bottom,left:right]"`` for
        the embedded crops.
    source : str
        What was loaded, in words.
    skipped : list of (str, str)
        ``(path, reason)`` for every file that was tried and could not be decoded.
    """

    images: torch.Tensor
    names: list
    source: str
    skipped: list = field(default_factory=list)

    def __len__(self):
        return len(self.images)

    @property
    def paths(self) -> list:
        """Alias of :attr:`names` (file paths when loaded from a folder)."""
        return self.names

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


# --------------------------------------------------------------------------- embedded photographs

def _to_rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3].astype(np.uint8))


@functools.lru_cache(maxsize=1)
def _source_photos() -> tuple:
    """Decoded offline photographs, ``((name, uint8 HxWx3), ...)``; cached because decoding takes ~2 s."""
    import warnings

    photos = []
    try:
        import skimage.data as skdata
    except ImportError:
        skdata = None
    for name in _SKIMAGE_PHOTOS if skdata is not None else ():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = getattr(skdata, name)()
        except Exception:  # a photo this install can only fetch from the network: do without it
            continue
        if isinstance(img, tuple):  # stereo pairs: the left view
            img = img[0]
        photos.append((f"skimage:{name}", _to_rgb(np.asarray(img))))
    try:
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        for fname, img in zip(sample.filenames, sample.images):
            photos.append((f"sklearn:{Path(fname).stem}", _to_rgb(np.asarray(img))))
    except Exception:
        pass
    if not photos:
        raise RuntimeError("no built-in photographs could be loaded (scikit-image/scikit-learn missing?); "
                           "pass a folder of images instead")
    return tuple(photos)


def _pil_resize(im, size: int, box) -> torch.Tensor:
    from PIL import Image

    out = im.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def embedded_images(num_images: int = 64, img_size: int = DEFAULT_IMG_SIZE, seed: int = 0) -> ImageSet:
    """Deterministic random crops of the built-in photographs, uint8 ``(N, 3, S, S)``.

    Photographs come from ``skimage.data`` (astronaut, coffee, chelsea, rocket,
    immunohistochemistry, hubble_deep_field, retina, motorcycle, and greyscale camera,
    coins, moon, grass, gravel, brick replicated to RGB) and scikit-learn's sample
    images (china, flower); any that this install cannot load offline is left out.
    Crop ``i`` uses photograph ``perm[i % P]`` (a seeded permutation, so every photo is
    used equally often), a square side uniform in 35–100% of the photo's shorter side and
    a uniform location, all from ``numpy.random.default_rng(seed)``; the crop is resized
    to ``img_size`` with Pillow's antialiased bicubic filter. Same arguments, same bytes.

    Parameters
    ----------
    num_images : int
    img_size : int
    seed : int

    Returns
    -------
    ImageSet
        ``names`` record each crop as ``"skimage:astronaut[top:bottom,left:right]"``.

    Examples
    --------
    >>> imgs = embedded_images(num_images=4, img_size=32)
    >>> imgs.images.shape, imgs.images.dtype
    (torch.Size([4, 3, 32, 32]), torch.uint8)
    """
    from PIL import Image

    num_images, img_size = int(num_images), int(img_size)
    if num_images < 1 or img_size < 1:
        raise UsageError(f"num_images and img_size must be positive, got {num_images} and {img_size}")
    photos = _source_photos()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(photos))
    pil = {}
    out, names = [], []
    for i in range(num_images):
        k = int(order[i % len(photos)])
        name, photo = photos[k]
        h, w, _ = photo.shape
        side = int(rng.uniform(0.35, 1.0) * min(h, w))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        if k not in pil:
            pil[k] = Image.fromarray(photo)
        out.append(_pil_resize(pil[k], img_size, (left, top, left + side, top + side)))
        names.append(f"{name}[{top}:{top + side},{left}:{left + side}]")
    return ImageSet(torch.stack(out), names, source=f"embedded photographs (seed {seed})")


# --------------------------------------------------------------------------- image folders

def _image_files(root: Path) -> list:
    """Image files under ``root``, sorted by relative path so the order is the same on every filesystem."""
    found = []
    # os.walk does not follow directory symlinks, so a link loop cannot trap the walk.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in filenames:
            if fname.lower().endswith(IMAGE_SUFFIXES):
                path = Path(dirpath) / fname
                found.append((path.relative_to(root).as_posix(), path))
    return [p for _, p in sorted(found)]


class UnfaithfulImage(ValueError):
    """A file that decodes, but whose pixels have no faithful 8-bit RGB reading (the reason says why)."""


# 32-bit and float images carry values, not display levels: only the ranges with one obvious
# 8-bit reading are accepted (integers 0..255 or 0..65535, floats in [0, 1]); anything else
# would be a silent guess (a float image in [0, 1] cast to bytes is all black, an int32 one wraps).
_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_CONVERTIBLE = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


def _to_8bit(im):
    """``im`` as an 8-bit image Pillow can convert to RGB faithfully, or :class:`UnfaithfulImage`."""
    from PIL import Image

    if im.mode in _CONVERTIBLE:
        return im
    if im.mode in _INTEGER_MODES:
        arr = np.asarray(im, dtype=np.int64)
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high > 65535:
            raise UnfaithfulImage(f"{im.mode} pixel values {low}..{high} are outside 0..65535: no faithful 8-bit "
                                  "reading; convert it to 8- or 16-bit first")
        arr = arr >> 8 if high > 255 else arr  # 16-bit greyscale: keep the top 8 bits
        return Image.fromarray(arr.astype(np.uint8))
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise UnfaithfulImage("float pixel values outside [0, 1] (or not finite): no faithful 8-bit reading; "
                                  "convert it to an 8-bit image first")
        return Image.fromarray(np.round(arr * 255).astype(np.uint8))
    raise UnfaithfulImage(f"pixel mode {im.mode!r} has no faithful RGB reading; convert it to RGB first")


def _read_square(path: Path, size: int) -> torch.Tensor:
    """Decode ``path`` and return the centre ``size``×``size`` crop after resizing its shorter side to ``size``.

    Raises (and the caller skips and counts the file) for anything but a regular file, for
    images over Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``: a decompression bomb is
    refused before it is decoded, also in the range where Pillow would only warn), and for
    pixels without a faithful 8-bit reading (:func:`_to_8bit`).
    """
    import warnings

    from PIL import Image, ImageOps

    if not path.is_file():  # a pipe would block the read forever; a socket or device is no image
        raise UnfaithfulImage("not a regular file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="PIL")  # e.g. palette transparency
        with Image.open(path) as im:
            if im.format == "JPEG":
                # decode at 1/2, 1/4 or 1/8 scale when the image is much larger than needed
                # (never below ``size`` on either side): big photo folders load several times faster
                im.draft("RGB", (size, size))
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos: store upright pixels as the viewer sees them
            im = _to_8bit(im).convert("RGB")  # greyscale, palette, CMYK; alpha is dropped
        w, h = im.size
        scale = size / min(w, h)
        # Resizing the shorter side to ``size`` and taking the centre crop equals resampling
        # this centred square box (in source pixels) straight to size×size; doing it in one
        # step avoids a second resampling of the already-resized image.
        half = size / scale / 2.0
        cx, cy = w / 2.0, h / 2.0
        return _pil_resize(im, size, (cx - half, cy - half, cx + half, cy + half))


def _describe(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_images(source=None, num_images: int | None = 64, img_size: int = DEFAULT_IMG_SIZE,
                seed: int = 0) -> ImageSet:
    """Images for analysis: ``None`` → :func:`embedded_images`; a folder (or one file) → its images.

    A folder is walked recursively for files ending in .jpg, .jpeg, .png, .bmp, .webp,
    .tif, .tiff or .gif (any case), sorted by relative path. If it holds more than
    ``num_images`` files, they are tried in a seeded random order until ``num_images``
    decode; otherwise all are tried in sorted order. The chosen images are returned in
    sorted path order. Each image is decoded with Pillow (EXIF rotation applied, converted
    to RGB), its shorter side resized to ``img_size`` and the centre ``img_size`` square
    kept (bicubic, antialiased). Files that fail to decode (corrupt, truncated, not an
    image) are skipped and listed in ``ImageSet.skipped`` with the reason; files never
    tried because enough images were already read are not listed.

    Parameters
    ----------
    source : None, str or path-like
        ``None`` for the embedded photographs, ``"scenes"`` for held-out procedural scenes
        (:mod:`asg_probe.scenes`, the reference models' data), else a folder or a single image file.
    num_images : int or None
        How many images to return at most (``None``: every image in the folder).
    img_size : int
        Side of the square output.
    seed : int
        Seeds the embedded crops or the choice among a folder's files.

    Returns
    -------
    ImageSet

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    UsageError
        (a ValueError) A size or count below 1, or a folder that holds no image file.
    InputError
        (a ValueError) None of the folder's image files can be decoded.

    Examples
    --------
    >>> imgs = load_images(None, num_images=2, img_size=32)
    >>> len(imgs), imgs.skipped
    (2, [])
    """
    img_size = int(img_size)
    if img_size < 1:
        raise UsageError(f"img_size must be positive, got {img_size}")
    if num_images is not None and int(num_images) < 1:
        raise UsageError(f"num_images must be positive, got {num_images}")
    generated = 64 if num_images is None else int(num_images)  # the built-in sources have no "every image"
    if source is None:
        return embedded_images(num_images=generated, img_size=img_size, seed=seed)
    if source == "scenes" and not Path(source).exists():
        # the procedural scenes the bundled reference models were trained on (held-out split)
        from .scenes import SceneDataset

        scenes = SceneDataset(generated, img_size=img_size, split="val", seed=seed).images()
        return ImageSet(scenes, [f"scenes:val[{i}]" for i in range(generated)],
                        source=f"procedural scenes (validation split, seed {seed})")
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    files = [root] if root.is_file() else _image_files(root)
    if not files:
        raise UsageError(f"{root}: no image files found (looked recursively for "
                         f"{', '.join(IMAGE_SUFFIXES)}, any case)")
    want = len(files) if num_images is None else int(num_images)
    order = np.arange(len(files))
    if len(files) > want:
        order = np.random.default_rng(seed).permutation(len(files))
    chosen, skipped = {}, []
    for k in order:
        if len(chosen) >= want:
            break
        try:
            chosen[int(k)] = _read_square(files[k], img_size)
        except Exception as exc:  # corrupt, truncated, not an image at all, or too large to decode safely
            skipped.append((str(files[k]), _describe(exc)))
    if not chosen:
        raise InputError(f"{root}: none of the {len(files)} image files could be read "
                         f"(first error: {skipped[0][0]}: {skipped[0][1]})")
    keep = sorted(chosen)
    return ImageSet(torch.stack([chosen[k] for k in keep]), [str(files[k]) for k in keep],
                    source=str(root), skipped=skipped)


# --------------------------------------------------------------------------- feeding a model

def data_config_for(model):
    """``(mean, std, img_size, patch_size)`` for a timm-style model.

    ``mean``/``std`` come from ``model.pretrained_cfg`` (ImageNet's
    ``(0.485, 0.456, 0.406)``/``(0.229, 0.224, 0.225)`` when absent). ``img_size`` is
    ``model.patch_embed.img_size`` when set, because a model built with an ``img_size``
    override keeps its original ``pretrained_cfg['input_size']`` yet accepts only the
    new size; otherwise ``pretrained_cfg['input_size']``, else 224. ``patch_size`` is
    ``model.patch_embed.patch_size``.

    Raises
    ------
    ValueError
        The model has no ``patch_embed.patch_size`` (the probes need the token grid).

    Examples
    --------
    >>> import timm
    >>> data_config_for(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224, 16)
    """
    return input_config(model)


def preprocess(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` → ``(x / 255 - mean) / std`` as float32.

    uint8 input is scaled by 1/255; floating input is taken to be in [0, 1] already.

    Examples
    --------
    >>> preprocess(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), (0.5,) * 3, (0.5,) * 3).unique()
    tensor([1.])
    """
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
