"""Procedural scenes: deterministic, labelled right, and carrying position in content."""
import numpy as np
import pytest
import torch

from asg_probe.scenes import SceneDataset, render_scene


def test_deterministic_and_splits_differ():
    a = SceneDataset(6, seed=3).images()
    b = SceneDataset(6, seed=3).images()
    assert torch.equal(a, b)
    assert not torch.equal(a, SceneDataset(6, seed=3, split="val").images())
    assert not torch.equal(a, SceneDataset(6, seed=4).images())


@pytest.mark.parametrize("task", ["count", "nearest_side"])
def test_labels_match_metadata_and_are_balanced(task):
    ds = SceneDataset(1500, task=task)
    labels = []
    for i in range(len(ds)):
        _, meta = ds.render(i)
        objects = meta["objects"]
        expected = len(objects) if task == "count" else int(max(objects, key=lambda o: o[0])[1] >= 16)
        assert meta["label"] == expected
        labels.append(meta["label"])
    freq = np.bincount(labels) / len(labels)
    assert len(freq) == ds.num_classes and freq.min() > 0.6 / ds.num_classes


def test_content_correlates_with_position():
    x = SceneDataset(200).images().float() / 255  # (N, 3, 32, 32)
    blue_minus_green = x[:, 2] - x[:, 1]
    # sky above, ground below, in every scene
    assert (blue_minus_green[:, :4].mean((1, 2)) > blue_minus_green[:, -4:].mean((1, 2)) + 0.2).all()
    # the sun's side is brighter than the other side
    for i in range(20):
        img, meta = render_scene(np.random.default_rng(i), 32)
        bright = img[20:].astype(float).mean(axis=(0, 2))
        left, right = bright[:10].mean(), bright[-10:].mean()
        assert (left > right) == (meta["sun"] == "left")


def test_count_task_is_learnable_but_not_trivial():
    from sklearn.linear_model import LogisticRegression

    def pooled(split, n):
        ds = SceneDataset(n, split=split)
        x = ds.images().float() / 255
        feats = torch.nn.functional.avg_pool2d(x, 8).flatten(1).numpy()  # 4×4 cells × 3 colours
        return feats, np.array([ds.render(i)[1]["label"] for i in range(n)])

    xtr, ytr = pooled("train", 1200)
    xva, yva = pooled("val", 400)
    acc = LogisticRegression(max_iter=2000).fit(xtr, ytr).score(xva, yva)
    assert 0.3 < acc < 0.8, acc  # chance is 0.2


def test_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        SceneDataset(3, task="colour")
    with pytest.raises(ValueError, match="split"):
        SceneDataset(3, split="holdout")
    with pytest.raises(IndexError):
        SceneDataset(3)[5]
