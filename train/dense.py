"""Dense-prediction heads and metrics for the segmentation and depth protocols (SPEC §1).

Heads read token maps ``(B, D, gh, gw)`` from chosen blocks (default [2, 5, 8, 11]) via
timm's ``forward_intermediates`` - no hooks. A plain ViT has one scale, so both heads
first "reassemble" the four maps at 4×, 2×, 1× and ½× of the patch grid (as BEiT's
UPerNet and DPT do), then fuse top-down.

The training modules here share :class:`train.trainer.TrainModule`'s contract
(``forward(x, target, lam) -> loss, loss_task, loss_coord, correct, n``) so that one loop
trains every task; ASG guidance applies to the final-norm tokens exactly as in classification.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_LAYERS = (2, 5, 8, 11)


def token_maps(model, x, layers=DEFAULT_LAYERS) -> list[torch.Tensor]:
    """Patch-token maps ``[(B, D, gh, gw)]`` of the given blocks (prefix tokens dropped)."""
    return model.forward_intermediates(x, indices=list(layers), norm=False, output_fmt="NCHW",
                                       intermediates_only=True)


def _conv_bn_relu(cin, cout, k=3):
    # GroupNorm where UPerNet has (Sync)BatchNorm: independent of the per-process batch size,
    # which is small for dense tasks (16 in total) and can be 1 after skipping unreadable images.
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.GroupNorm(max(1, math.gcd(32, cout // 8)), cout), nn.ReLU(True))


class Reassemble(nn.Module):
    """Four single-scale maps → a pyramid at 4×, 2×, 1×, ½× the patch grid."""

    def __init__(self, dim: int, out_dims):
        super().__init__()
        c = out_dims
        self.ops = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dim, c[0], 1), nn.ConvTranspose2d(c[0], c[0], 4, stride=4)),
            nn.Sequential(nn.Conv2d(dim, c[1], 1), nn.ConvTranspose2d(c[1], c[1], 2, stride=2)),
            nn.Conv2d(dim, c[2], 1),
            nn.Sequential(nn.Conv2d(dim, c[3], 1), nn.Conv2d(c[3], c[3], 3, stride=2, padding=1)),
        ])

    def forward(self, maps):
        return [op(m) for op, m in zip(self.ops, maps)]


class UPerNetHead(nn.Module):
    """UPerNet-style decoder (pyramid pooling on the coarsest level + FPN) for a plain ViT.

    ``forward(maps, out_size)`` → logits ``(B, num_classes, *out_size)``.
    """

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 256, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.reassemble = Reassemble(embed_dim, [embed_dim] * 4)
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_bn_relu(embed_dim, channels, 1))
                                  for s in pool_scales])
        self.ppm_out = _conv_bn_relu(embed_dim + len(pool_scales) * channels, channels)
        self.lateral = nn.ModuleList([_conv_bn_relu(embed_dim, channels, 1) for _ in range(3)])
        self.fpn = nn.ModuleList([_conv_bn_relu(channels, channels) for _ in range(3)])
        self.fuse = _conv_bn_relu(4 * channels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps, out_size):
        feats = self.reassemble(maps)                                   # fine → coarse
        top = feats[-1]
        pooled = [F.interpolate(p(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for p in self.ppm]
        laterals = [lat(f) for lat, f in zip(self.lateral, feats[:-1])] + [self.ppm_out(torch.cat([top] + pooled, 1))]
        for i in range(len(laterals) - 1, 0, -1):                       # top-down pathway
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="bilinear", align_corners=False)
        outs = [conv(l) for conv, l in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([F.interpolate(o, size=size, mode="bilinear", align_corners=False)
                                     for o in outs], 1))
        return F.interpolate(self.classifier(fused), size=out_size, mode="bilinear", align_corners=False)


class _ResidualConvUnit(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _Fusion(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.skip = _ResidualConvUnit(c)
        self.refine = _ResidualConvUnit(c)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x, skip=None):
        if skip is not None:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False) + self.skip(skip)
        x = self.refine(x)
        return self.out(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


class DPTDepthHead(nn.Module):
    """DPT-style depth decoder: reassemble, project, fuse coarse → fine, positive depth out."""

    def __init__(self, embed_dim: int, features: int = 128, reassemble_dims=(96, 192, 384, 768)):
        super().__init__()
        self.reassemble = Reassemble(embed_dim, list(reassemble_dims))
        self.project = nn.ModuleList([nn.Conv2d(c, features, 3, padding=1, bias=False) for c in reassemble_dims])
        self.fusion = nn.ModuleList([_Fusion(features) for _ in reassemble_dims])
        self.head = nn.Sequential(nn.Conv2d(features, features // 2, 3, padding=1), nn.ReLU(True),
                                  nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(True),
                                  nn.Conv2d(32, 1, 1), nn.Softplus())

    def forward(self, maps, out_size):
        feats = [p(f) for p, f in zip(self.project, self.reassemble(maps))]
        x = self.fusion[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            x = self.fusion[i](x, feats[i])
        depth = self.head(x)
        return F.interpolate(depth, size=out_size, mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)


# --------------------------------------------------------------------------- metrics

def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255):
    """``(C, C)`` counts, rows = true class, columns = predicted; ``ignore_index`` pixels left out."""
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean over classes that occur (in truth or prediction) of TP / (TP + FP + FN)."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else float("nan")


def align_mean_std(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image, give ``pred`` the mean and std of ``target`` over the valid pixels."""
    out = torch.empty_like(pred)
    for i in range(pred.shape[0]):
        p, t = pred[i][mask[i]], target[i][mask[i]]
        scale = t.std(unbiased=False) / p.std(unbiased=False).clamp(min=1e-12)
        out[i] = (pred[i] - p.mean()) * scale + t.mean()
    return out


def depth_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                  align: str | None = "meanstd", eps: float = 1e-6) -> dict:
    """AbsRel, RMSE and δ1–δ3 (``max(p/t, t/p) < 1.25^k``) over valid pixels (target > 0).

    ``align="meanstd"`` first matches each prediction's mean and std to the target's (SPEC).
    """
    pred, target = pred.double(), target.double()
    mask = (target > eps) if mask is None else (mask & (target > eps))
    if align == "meanstd":
        pred = align_mean_std(pred, target, mask)
    p, t = pred[mask].clamp(min=eps), target[mask]
    ratio = torch.maximum(p / t, t / p)
    return {"abs_rel": float(((p - t).abs() / t).mean()), "rmse": float(((p - t) ** 2).mean().sqrt()),
            **{f"delta{k}": float((ratio < 1.25 ** k).double().mean()) for k in (1, 2, 3)}}


def depth_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, grad_weight: float = 0.5):
    """Hybrid depth loss (our reading of "hybrid"): L1 after mean/std normalisation of each image
    (scale- and shift-invariant) plus a multi-scale gradient-matching term (MiDaS)."""
    def normalise(d):
        m = mask.float()
        n = m.sum((1, 2), keepdim=True).clamp(min=1)
        mean = (d * m).sum((1, 2), keepdim=True) / n
        std = (((d - mean) ** 2 * m).sum((1, 2), keepdim=True) / n).sqrt().clamp(min=1e-6)
        return (d - mean) / std

    p, t, m = normalise(pred), normalise(target), mask.float()
    loss = ((p - t).abs() * m).sum() / m.sum().clamp(min=1)
    diff = (p - t) * m
    for scale in range(4):
        step = 2 ** scale
        d, mm = diff[:, ::step, ::step], m[:, ::step, ::step]
        gx = (d[:, :, 1:] - d[:, :, :-1]).abs() * mm[:, :, 1:] * mm[:, :, :-1]
        gy = (d[:, 1:] - d[:, :-1]).abs() * mm[:, 1:] * mm[:, :-1]
        loss = loss + grad_weight * (gx.sum() + gy.sum()) / mm.sum().clamp(min=1) / 4
    return loss


# --------------------------------------------------------------------------- training modules

def _guidance(head, model, final, x, n_valid):
    if head is None:
        return torch.zeros((), device=x.device)
    p = model.patch_embed.patch_size[0]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    return head(final[:, model.num_prefix_tokens:], grid) * (n_valid > 0).float()


class DenseModule(nn.Module):
    """Backbone + dense head (+ optional guidance head) for segmentation or depth.

    One backbone pass gives the final-norm tokens (for guidance) and the token maps of
    ``layers`` (for the head), via timm's ``forward_intermediates``.
    """

    def __init__(self, model, dense_head, task: str, layers, guidance_head=None, ignore_index: int = 255):
        super().__init__()
        if task not in ("segmentation", "depth"):
            raise ValueError(f"task must be segmentation or depth, got {task!r}")
        self.model = model
        self.dense_head = dense_head
        self.head = guidance_head
        self.task = task
        self.layers = list(layers)
        self.ignore_index = ignore_index

    def predict(self, x):
        final, maps = self.model.forward_intermediates(x, indices=self.layers, norm=False, output_fmt="NCHW")
        return self.dense_head(maps, out_size=x.shape[-2:]), final

    def forward(self, x, target, lam):
        out, final = self.predict(x)
        if self.task == "segmentation":
            valid = target != self.ignore_index                                    # (B, H, W)
            ce = F.cross_entropy(out.float(), target.clamp(max=out.shape[1] - 1) * valid, reduction="none")
            per_image = valid.sum((1, 2)).clamp(min=1)
            loss_task = ((ce * valid).sum((1, 2)) / per_image)
            correct = (((out.argmax(1) == target) & valid).sum((1, 2)) / per_image)  # pixel accuracy
            has = (valid.flatten(1).any(1)).float()
        else:
            valid = target > 0
            loss_task = torch.stack([depth_loss(out[i:i + 1].float(), target[i:i + 1], valid[i:i + 1])
                                     for i in range(x.shape[0])])
            correct = torch.zeros_like(loss_task)
            has = (valid.flatten(1).any(1)).float()
        n_valid = has.sum()
        loss_task = (loss_task * has).sum() / n_valid.clamp(min=1)
        loss_coord = _guidance(self.head, self.model, final, x, n_valid)
        return (loss_task + lam * loss_coord, loss_task.detach(), loss_coord.detach(),
                (correct * has).sum().detach(), n_valid.detach())


def build_dense_head(cfg, model):
    d = cfg["dense"]
    if cfg["task"] == "segmentation":
        return UPerNetHead(model.embed_dim, num_classes=d["num_classes"], channels=d["channels"])
    return DPTDepthHead(model.embed_dim, features=d["channels"] // 2,
                        reassemble_dims=[max(d["channels"] // 4 * 2 ** i, 16) for i in range(4)])


@torch.no_grad()
def evaluate_dense(module, dataset, size: int, *, base_batch: int, device, ctx, amp=None, num_workers=0) -> dict:
    """mIoU + pixel accuracy (segmentation) or AbsRel/RMSE/δ1–3 (depth) over the validation set."""
    import contextlib

    from .data import BatchPlan, iterate_batches
    from .dist import all_reduce_sum

    module.eval()
    plan = BatchPlan(len(dataset), base_batch, shuffle=False, rank=ctx.rank, world_size=ctx.world_size, base_size=size)
    n_cls = getattr(module.dense_head.classifier, "out_channels", 0) if module.task == "segmentation" else 0
    confusion = torch.zeros(n_cls, n_cls, dtype=torch.long)
    depth_sums = {k: 0.0 for k in ("abs_rel", "rmse", "delta1", "delta2", "delta3")}
    images = skipped = 0
    for x, target, n_bad in iterate_batches(dataset, plan.batches(0), num_workers=num_workers):
        skipped += n_bad
        with amp() if amp is not None else contextlib.nullcontext():
            out, _ = module.predict(x.to(device))
        out = out.float().cpu()
        if module.task == "segmentation":
            confusion += confusion_matrix(out.argmax(1), target, n_cls, module.ignore_index)
            images += int((target != module.ignore_index).flatten(1).any(1).sum())
        else:
            for i in range(x.shape[0]):
                if (target[i] > 0).any():
                    m = depth_metrics(out[i:i + 1], target[i:i + 1])
                    for k in depth_sums:
                        depth_sums[k] += m[k]
                    images += 1
    module.train()
    if module.task == "segmentation":
        flat = all_reduce_sum(confusion.flatten().double().tolist() + [images, skipped], device)
        confusion = torch.tensor(flat[:-2]).reshape(n_cls, n_cls)
        acc = float(confusion.diag().sum() / confusion.sum().clamp(min=1))
        return {"size": size, "miou": mean_iou(confusion), "pixel_acc": acc, "n": int(flat[-2]),
                "unreadable": int(flat[-1])}
    keys = list(depth_sums)
    flat = all_reduce_sum([depth_sums[k] for k in keys] + [images, skipped], device)
    n = max(flat[-2], 1)
    return {"size": size, **{k: v / n for k, v in zip(keys, flat)}, "n": int(flat[-2]), "unreadable": int(flat[-1])}


# --------------------------------------------------------------------------- data

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
        from .data import sample_rng

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


def build_dense_splits(cfg):
    from .config import ConfigError
    from .data import Splits

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
