"""Segmentation / depth heads and metrics: shapes on a tiny ViT, known answers on planted tensors."""
import json
import math

import pytest
import torch

import asg_probe
from asg_train.dense import (DPTDepthHead, UPerNetHead, confusion_matrix, depth_loss, depth_metrics,
                             depth_task_loss, mean_iou, segmentation_loss, token_maps)


@pytest.fixture(scope="module")
def maps():
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="rope-mixed", num_classes=0).eval()
    x = torch.randn(2, 3, 32, 48)
    return token_maps(model, x, layers=(0, 1, 2, 3))


def test_token_maps_are_grids(maps):
    assert [tuple(m.shape) for m in maps] == [(2, 128, 8, 12)] * 4


def test_upernet_head_shape_and_gradient(maps):
    head = UPerNetHead(128, num_classes=5, channels=32)
    logits = head([m.detach().requires_grad_() for m in maps], out_size=(32, 48))
    assert logits.shape == (2, 5, 32, 48)
    logits.mean().backward()
    assert head.classifier.weight.grad is not None


def test_dpt_head_positive_depth(maps):
    head = DPTDepthHead(128, features=32, reassemble_dims=(16, 32, 64, 128))
    depth = head(maps, out_size=(32, 48))
    assert depth.shape == (2, 32, 48) and (depth > 0).all()


def test_dpt_head_known_answers(maps):
    head = DPTDepthHead(128, features=32, reassemble_dims=(16, 32, 64, 128))
    # every one of the four token maps reaches the depth map (a head that dropped a level fails)
    inputs = [m.detach().clone().requires_grad_() for m in maps]
    head(inputs, out_size=(32, 48)).sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in inputs)
    # planted: a last convolution with zero weights and bias softplus⁻¹(2.5) gives exactly 2.5
    # everywhere, at the requested size (the head ends in a softplus, then resizes)
    last = head.head[-2]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(math.log(math.expm1(2.5)))
    depth = head(maps, out_size=(20, 28))
    assert depth.shape == (2, 20, 28)
    assert torch.allclose(depth, torch.full_like(depth, 2.5), atol=1e-5)


def test_segmentation_loss_known_answers():
    target = torch.tensor([[[0, 1], [255, 1]], [[255, 255], [255, 255]]])
    right = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [0, 1]]] * 2), 3).permute(0, 3, 1, 2) * 50.0
    loss, acc, has = segmentation_loss(right.float(), target)
    assert loss[0] == pytest.approx(0, abs=1e-6) and acc.tolist() == [1.0, 0.0] and has.tolist() == [1.0, 0.0]
    wrong = torch.zeros(2, 3, 2, 2)                        # uniform logits: CE = ln 3 on every labelled pixel
    loss, acc, _ = segmentation_loss(wrong, target)
    assert loss[0] == pytest.approx(math.log(3)) and loss[1] == 0


def test_dense_module_with_a_perfect_head_has_zero_depth_loss():
    from asg_train.modules import DenseModule

    model = asg_probe.create_model("vit_tiny_patch4_32", num_classes=0, depth=2)
    target = 1 + torch.arange(32.0).view(1, 1, 32).expand(2, 32, 32).clone()
    target[1] = 0                                          # second image: no valid pixel

    class Oracle(torch.nn.Module):                         # predicts 3·target + 1 whatever it sees
        def forward(self, maps, out_size):
            return 3 * target + 1 + 0 * maps[0].mean()

    module = DenseModule(model, Oracle(), [0, 1], depth_task_loss)
    loss, loss_task, loss_coord, correct, n = module(torch.randn(2, 3, 32, 32), target, torch.tensor(1.0))
    assert n == 1 and loss_coord == 0                      # only the first image counts
    assert loss_task == pytest.approx(0, abs=1e-5)         # scale and shift are forgiven


def test_miou_known_answers():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    assert mean_iou(confusion_matrix(target.clamp(max=2) * (target != 255), target, 3)) == 1.0
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    # class 0: TP 1, FP 1 (pos [1,1]), FN 1 → 1/3; class 1: TP 2, FP 1, FN 0 → 2/3; class 2: TP 1, FN 1 → 1/2
    assert mean_iou(confusion_matrix(pred, target, 3)) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    cm = confusion_matrix(pred, target, 4)                 # class 3 never occurs: left out of the mean
    assert mean_iou(cm) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_depth_metrics_known_answers():
    g = torch.Generator().manual_seed(0)
    target = 1 + 9 * torch.rand(2, 8, 8, generator=g)
    exact = depth_metrics(target.clone(), target, align=None)
    assert exact["abs_rel"] == 0 and exact["rmse"] == 0 and exact["delta1"] == 1
    affine = depth_metrics(3 * target + 5, target)         # mean/std alignment removes scale and shift
    assert affine["abs_rel"] == pytest.approx(0, abs=1e-6) and affine["delta1"] == 1
    scaled = depth_metrics(1.5 * target, target, align=None)  # ratio 1.5: fails 1.25, passes 1.25²
    assert scaled["abs_rel"] == pytest.approx(0.5) and scaled["delta1"] == 0
    assert scaled["delta2"] == 1 and scaled["delta3"] == 1
    assert scaled["rmse"] == pytest.approx(0.5 * math.sqrt((target.double() ** 2).mean().item()))
    holes = target.clone()
    holes[:, 0] = 0                                        # invalid pixels (depth 0) are ignored
    assert depth_metrics(target, holes, align=None)["abs_rel"] == 0


def test_depth_loss_is_scale_shift_invariant_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    target = 1 + torch.rand(2, 16, 16, generator=g)
    mask = torch.ones_like(target, dtype=torch.bool)
    assert depth_loss(4 * target + 2, target, mask) == pytest.approx(0, abs=1e-5)
    assert depth_loss(torch.rand(2, 16, 16, generator=g), target, mask) > 0.1


# --------------------------------------------------------------------------- end to end on tiny trees

def _ade20k_tree(root):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("training", 6), ("validation", 3)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            img = (torch.rand(40, 52, 3, generator=g) * 255).to(torch.uint8).numpy()
            lab = torch.zeros(40, 52, dtype=torch.uint8)
            lab[:20] = 1 + i % 3                          # top half: a class; bottom: "other" (ignored)
            lab[20:, :10] = 4
            Image.fromarray(img).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(lab.numpy()).save(root / "annotations" / split / f"{i}.png")
    (root / "images" / "training" / "bad.jpg").write_bytes(b"broken")
    Image.fromarray(lab.numpy()).save(root / "annotations" / "training" / "bad.png")


def _hypersim_tree(root):
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 3)):
        d = root / split / "scene_000"
        d.mkdir(parents=True)
        for i in range(n):
            img = (torch.rand(36, 44, 3, generator=g) * 255).to(torch.uint8).numpy()
            depth = (1 + torch.linspace(0, 5, 36)[:, None].expand(36, 44)).numpy().copy()
            depth[0, 0] = np.nan                                # invalid pixels are masked
            Image.fromarray(img).save(d / f"frame{i}_rgb.png")
            np.save(d / f"frame{i}_depth.npy", depth)


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_dense_training_end_to_end(tmp_path, task):
    from asg_train import trainer
    from asg_train.config import resolve

    root = tmp_path / "data"
    (_ade20k_tree if task == "segmentation" else _hypersim_tree)(root)
    cfg = resolve(overrides=[
        f"task={task}", f"data.kind={'ade20k' if task == 'segmentation' else 'hypersim'}", f"data.root={root}",
        "model.name=vit_tiny_patch4_32", "model.img_size=32", "dense.layers=[0,1,2,3]", "dense.channels=32",
        "dense.num_classes=5", "batch_size=2", "max_steps=3", "num_workers=0", "progress=false",
        "guidance.enabled=true", "guidance.hidden_dim=16", "guidance.rc_lambda=30.0", "optim.warmup_steps=1",
        f"out={tmp_path / 'run'}", "eval.batch_size=2"])
    summary = trainer.run(cfg)
    run = tmp_path / "run"
    doc = json.loads((run / "eval.json").read_text())
    assert doc["n"] == 3
    if task == "segmentation":
        assert 0 <= summary["miou"] <= 1 and summary["unreadable"] == 1
    else:
        assert summary["abs_rel"] >= 0 and 0 <= summary["delta1"] <= 1
    assert (run / "dense_head.safetensors").is_file() and (run / "model.safetensors").is_file()
    assert asg_probe.load_checkpoint(run).num_classes == 0


def test_dense_task_needs_its_data_kind():
    from asg_train.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="task=segmentation takes data.kind"):
        resolve(overrides=["task=segmentation", "data.kind=synthetic"])
