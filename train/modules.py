"""The trainable modules: backbone + task head (+ optional ASG guidance head) as one ``nn.Module``.

One module per run, so that one DDP wrapper (and one ``torch.compile``) covers every trained
parameter. Every module has the same contract, which is all the training loop knows:

``forward(x, target, lam) -> (loss, loss_task, loss_coord, correct, n)``
    the total loss to back-propagate and four detached statistics: the task loss and the
    guidance loss (means over the ``n`` images that have a target), the summed per-image
    accuracy ``correct`` and ``n``. ``lam`` is a tensor so that a changing λ does not
    recompile under ``torch.compile``.

Examples
--------
>>> import torch, asg_probe
>>> model = asg_probe.create_model("vit_tiny_patch4_32", num_classes=3, depth=1)
>>> loss, task, coord, correct, n = ClassificationModule(model)(
...     torch.zeros(2, 3, 32, 32), torch.tensor([0, -1]), torch.tensor(1.0))
>>> float(n), float(coord)          # label -1 (an unreadable image) is left out
(1.0, 0.0)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def guidance_loss(head, model, final_tokens, x, n_valid):
    """ASG's coordinate loss on the final-norm patch tokens (0 without a head or a target)."""
    if head is None:
        return torch.zeros((), device=x.device)
    p = model.patch_embed.patch_size[0]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    return head(final_tokens[:, model.num_prefix_tokens:], grid) * (n_valid > 0).float()


class ClassificationModule(nn.Module):
    """Image classification: the backbone's own classifier, cross-entropy, top-1 as ``correct``.

    Label ``-1`` marks an unreadable-image placeholder; it counts in no statistic.
    """

    def __init__(self, model, head=None):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x, y, lam):
        feats = self.model.forward_features(x)                     # (B, P+N, D), after the final norm
        logits = self.model.forward_head(feats)                    # (B, classes)
        valid = (y >= 0).float()
        ce = F.cross_entropy(logits.float(), y.clamp(min=0), reduction="none")
        n_valid = valid.sum()
        loss_cls = (ce * valid).sum() / n_valid.clamp(min=1)
        correct = ((logits.argmax(-1) == y).float() * valid).sum()
        loss_coord = guidance_loss(self.head, self.model, feats, x, n_valid)
        loss = loss_cls + lam * loss_coord
        return loss, loss_cls.detach(), loss_coord.detach(), correct.detach(), n_valid.detach()


class DenseModule(nn.Module):
    """Backbone + dense head (+ optional guidance head) for segmentation or depth.

    One backbone pass gives the final-norm tokens (for guidance) and the token maps of
    ``layers`` (for the dense head), via timm's ``forward_intermediates``. ``task_loss(out,
    target) -> (loss, accuracy, has_target)``, each ``(B,)``, is the task's per-image loss
    (:func:`asg_train.dense.segmentation_loss`, :func:`asg_train.dense.depth_task_loss`).
    """

    def __init__(self, model, dense_head, layers, task_loss, guidance_head=None):
        super().__init__()
        self.model = model
        self.dense_head = dense_head
        self.head = guidance_head
        self.layers = list(layers)
        self.task_loss = task_loss

    def predict(self, x):
        """``(dense output at the input size, final-norm tokens)``."""
        final, maps = self.model.forward_intermediates(x, indices=self.layers, norm=False, output_fmt="NCHW")
        return self.dense_head(maps, out_size=x.shape[-2:]), final

    def forward(self, x, target, lam):
        out, final = self.predict(x)
        loss_task, correct, has = self.task_loss(out, target)
        n_valid = has.sum()
        loss_task = (loss_task * has).sum() / n_valid.clamp(min=1)
        loss_coord = guidance_loss(self.head, self.model, final, x, n_valid)
        return (loss_task + lam * loss_coord, loss_task.detach(), loss_coord.detach(),
                (correct * has).sum().detach(), n_valid.detach())
