"""Dense-prediction heads and metrics for the segmentation and depth protocols (SPEC §1).

Heads read token maps ``(B, D, gh, gw)`` from chosen blocks (default [2, 5, 8, 11]) via
timm's ``forward_intermediates`` - no hooks. A plain ViT has one scale, so both heads
first "reassemble" the four maps at 4×, 2×, 1× and ½× of the patch grid (as BEiT's
UPerNet and DPT do), then fuse top-down.

The per-image losses here plug into :class:`asg_train.modules.DenseModule`; the data
(:mod:`asg_train.dense_data`) and the evaluation (:mod:`asg_train.evaluate`) live elsewhere,
and this module imports nothing else from the training package.
"""
from __future__ import annotations

import math

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


# --------------------------------------------------------------------------- per-image task losses

def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255):
    """Per image: mean cross-entropy over labelled pixels, pixel accuracy, and whether any pixel is labelled.

    Returns three ``(B,)`` tensors ``(loss, accuracy, has_target)``; images without a labelled
    pixel have loss and accuracy 0 (the caller averages over ``has_target``).

    Examples
    --------
    >>> logits = torch.zeros(1, 2, 1, 2); logits[0, 1] = 10.0       # predicts class 1 everywhere
    >>> loss, acc, has = segmentation_loss(logits, torch.tensor([[[1, 255]]]))
    >>> round(float(loss), 4), float(acc), float(has)
    (0.0, 1.0, 1.0)
    """
    valid = target != ignore_index                                              # (B, H, W)
    ce = F.cross_entropy(logits.float(), target.clamp(max=logits.shape[1] - 1) * valid, reduction="none")
    per_image = valid.sum((1, 2)).clamp(min=1)
    loss = (ce * valid).sum((1, 2)) / per_image
    accuracy = ((logits.argmax(1) == target) & valid).sum((1, 2)) / per_image
    return loss, accuracy, valid.flatten(1).any(1).float()


def depth_task_loss(pred: torch.Tensor, target: torch.Tensor):
    """Per image: :func:`depth_loss` over valid pixels (target > 0), no accuracy (zeros), has_target.

    Same return contract as :func:`segmentation_loss`.
    """
    valid = target > 0
    loss = torch.stack([depth_loss(pred[i:i + 1].float(), target[i:i + 1], valid[i:i + 1])
                        for i in range(pred.shape[0])])
    return loss, torch.zeros_like(loss), valid.flatten(1).any(1).float()


def build_dense_head(cfg, model) -> nn.Module:
    """The UPerNet head (segmentation) or the DPT head (depth) for ``model``'s width."""
    d = cfg["dense"]
    if cfg["task"] == "segmentation":
        return UPerNetHead(model.embed_dim, num_classes=d["num_classes"], channels=d["channels"])
    return DPTDepthHead(model.embed_dim, features=d["channels"] // 2,
                        reassemble_dims=[max(d["channels"] // 4 * 2 ** i, 16) for i in range(4)])
