"""Token-position embeddings: the position score's known answers, sampling invariance, the result object."""
import sys
import warnings

import numpy as np
import pytest
import torch

import asg_probe
from asg_probe.analysis.embeddings import EmbeddingsAccumulator, EmbeddingsResult, compare_embeddings, token_embeddings
from asg_probe.analysis.layout import _nearest, embed_2d, position_score
from asg_probe.extract import ForwardBatch
from asg_probe.layers.grid import grid_coords

GRID = (8, 8)


def _batch(tokens, index):
    B = tokens.shape[0]
    return ForwardBatch(tokens={0: tokens}, grid=GRID, image_index=torch.as_tensor(index),
                        images=torch.zeros(B, 3, 32, 32), num_prefix_tokens=1, patch_size=4)


def _planted(n_images, noise, seed=0, dim=32):
    """Tokens that are a smooth function of (row, col), the same in every image, plus noise."""
    g = torch.Generator().manual_seed(seed)
    c = grid_coords(GRID) / 7.0                                          # (64, 2) in [0, 1]
    basis = torch.cat([c, torch.sin(3 * c), torch.cos(2 * c)], 1)        # (64, 6) smooth in (row, col)
    clean = basis @ torch.randn(6, dim, generator=g)
    return clean + noise * torch.randn(n_images, 64, dim, generator=g)


def _fill(acc, tokens, batch_size):
    for s in range(0, tokens.shape[0], batch_size):
        idx = torch.arange(s, min(s + batch_size, tokens.shape[0]))
        acc.update(_batch(tokens[idx], idx))
    return acc


def test_position_score_known_answers_without_umap():
    rng = np.random.default_rng(0)
    rows, cols = np.divmod(np.tile(np.arange(64), 12), 8)
    image = np.repeat(np.arange(12), 64)
    exact = position_score(np.stack([rows, cols], 1).astype(float), rows, cols, image, GRID)
    assert exact["score"] == pytest.approx(1.0, abs=1e-9)
    noise = [position_score(rng.normal(size=(768, 2)), rows, cols, image, GRID) for _ in range(5)]
    assert abs(np.mean([s["score"] for s in noise])) < 0.05
    assert np.mean([s["r2_knn_row"] for s in noise]) < -0.05  # the raw kNN R² sits below 0 (about -1/k)
    # Neighbours never come from the token's own image (adjacent patches of one photo look alike)
    pts = rng.normal(size=(768, 2))
    idx, _ = _nearest(pts, 10, image=image)
    assert (image[idx] != image[:, None]).all()
    idx, dist = _nearest(pts, 3)  # UMAP's graph: the point itself first
    assert (idx[:, 0] == np.arange(768)).all() and (dist[:, 0] == 0).all()


def test_position_score_is_zero_for_per_image_clusters_without_shared_layout():
    # Each image is its own cluster, laid out smoothly by position (content is smooth inside a photo)
    # but rotated/flipped at random: nothing about absolute position is shared between images.
    # Cross-image neighbours are then a contiguous strip of another image, so the kNN R² is far
    # below 0; the correlation score stays near 0.
    rng = np.random.default_rng(0)
    n = 40
    rows, cols = np.divmod(np.tile(np.arange(64), n), 8)
    image = np.repeat(np.arange(n), 64)
    pts = np.empty((64 * n, 2))
    for i in range(n):
        th, flip = rng.uniform(0, 2 * np.pi), rng.choice([-1, 1])
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) @ np.diag([1, flip])
        pts[image == i] = np.stack([rows[:64], cols[:64]], 1) @ rot.T + rng.uniform(0, 100, 2)
    res = position_score(pts, rows, cols, image, GRID)
    assert abs(res["score"]) < 0.15 and res["r2_knn_row"] < -0.3
    with pytest.raises(ValueError, match="two images"):
        position_score(np.zeros((64, 2)), rows[:64], cols[:64], image[:64], GRID)


def test_planted_position_scores_high_and_noise_scores_zero():
    planted = _fill(EmbeddingsAccumulator(layers=[0], max_tokens=768, seed=0), _planted(12, 0.01), 5).result()
    noise_tokens = torch.randn(12, 64, 32, generator=torch.Generator().manual_seed(3))
    noise = _fill(EmbeddingsAccumulator(layers=[0], max_tokens=768, seed=0), noise_tokens, 5).result()
    p, q = planted.to_frame().iloc[0], noise.to_frame().iloc[0]
    assert planted.method == "umap" and p["n_tokens"] == 768
    assert p["position_score"] > 0.9 and p["position_score_features"] > 0.9
    assert abs(q["position_score"]) < 0.1 and abs(q["position_score_features"]) < 0.1


def test_sample_does_not_depend_on_batching_and_is_shared_across_layers():
    tokens = _planted(10, 0.5, seed=1)
    a = _fill(EmbeddingsAccumulator(layers=[0], max_tokens=150, seed=4), tokens, 10).reservoirs[0]
    b = EmbeddingsAccumulator(layers=[0], max_tokens=150, seed=4)
    for idx in ([7, 8, 9], [4, 5, 6], [0, 1, 2, 3]):  # other batch sizes, reverse order
        b.update(_batch(tokens[idx], idx))
    b = b.reservoirs[0]
    key = lambda r: sorted(zip(r.image_index.tolist(), r.targets[:, 0].tolist(), r.targets[:, 1].tolist()))
    assert key(a) == key(b)
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2)
    from asg_probe.extract import run_analyses

    acc = EmbeddingsAccumulator(layers=[0, 2], max_tokens=60, seed=0)
    run_analyses(model, [(torch.randn(4, 3, 32, 32), torch.arange(4))], [acc], layers=[0, 2], progress=False)
    assert key(acc.reservoirs[0]) == key(acc.reservoirs[2])


@pytest.fixture(scope="module")
def sincos_result():
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="sincos", depth=2)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return token_embeddings(model, images, max_tokens=200, progress=False, label="sincos")


def test_token_embeddings_end_to_end(sincos_result, tmp_path):
    res = sincos_result
    frame = res.to_frame()
    assert frame["layer"].tolist() == [0, 1, 2]  # first, middle, last
    assert frame["position_score"].iloc[0] > 0.5  # sin-cos at the input: tokens group by position
    d = res.to_dict()
    assert d["checkpoint"] == "sincos" and d["grid"] == [8, 8] and d["num_images"] == 8
    entry = d["layers"][0]
    assert {"layer", "x", "y", "row", "col", "position_score"} <= set(entry)
    assert len(entry["x"]) == len(entry["row"]) == 200 and max(entry["row"]) <= 7
    paths = res.save(tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert "<img" in res._repr_html_()
    fig = compare_embeddings([res, res], labels=["sincos", "again"], layer=0)
    assert len([a for a in fig.axes if a.get_title().startswith(("sincos", "again"))]) == 2
    with pytest.raises(ValueError, match="has layers"):
        compare_embeddings([res], layer=5)


def test_bad_arguments_are_one_line_errors():
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2)
    with pytest.raises(ValueError, match="layers 0..2"):
        token_embeddings(model, torch.randn(4, 3, 32, 32), layers=[5], progress=False)
    with pytest.raises(ValueError, match="at least 2 images"):
        token_embeddings(model, torch.randn(1, 3, 32, 32), progress=False)


def test_pca_fallback_when_umap_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    acc = _fill(EmbeddingsAccumulator(layers=[0], max_tokens=300), _planted(6, 0.01), 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = acc.result()
    assert res.method == "pca" and any("umap-learn" in str(w.message) for w in caught)
    assert isinstance(res, EmbeddingsResult) and res.to_frame()["position_score"].iloc[0] > 0.9


def _merge_on_two_ranks(rank, out):
    acc = EmbeddingsAccumulator(layers=[0], max_tokens=100, seed=2)
    tokens = _planted(10, 0.5, seed=1)
    idx = torch.arange(rank, 10, 2)  # this rank's share of the images
    acc.update(_batch(tokens[idx], idx))
    acc.all_reduce()
    if rank == 0:
        r = acc.reservoirs[0]
        torch.save((r.image_index, r.targets, r.features, sorted(acc.image_ids)), out)


def test_two_processes_merge_to_the_single_process_sample(tmp_path, two_ranks):
    two_ranks(_merge_on_two_ranks, str(tmp_path / "out.pt"))
    image, targets, features, ids = torch.load(tmp_path / "out.pt")
    whole = _fill(EmbeddingsAccumulator(layers=[0], max_tokens=100, seed=2), _planted(10, 0.5, seed=1), 10)
    r = whole.reservoirs[0]
    key = lambda i, t, f: sorted(zip(i.tolist(), t[:, 0].tolist(), t[:, 1].tolist(), f[:, 0].tolist()))
    assert key(image, targets, features) == key(r.image_index, r.targets, r.features)
    assert ids == list(range(10))


def test_pca_layout_recovers_a_planted_plane_and_rejects_unknown_methods():
    # points on a 2-D plane, rotated into 80 dimensions: the first two principal
    # components are that plane, so every pairwise distance is kept exactly
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(30, 2)) * [3.0, 1.0]
    basis, _ = np.linalg.qr(rng.normal(size=(80, 80)))
    xy, reduced, method = embed_2d(plane @ basis[:2] + 5.0, method="pca")
    assert method == "pca" and xy.shape == (30, 2) and reduced.shape == (30, 29)  # at most n - 1 components
    dist = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)
    np.testing.assert_allclose(dist(xy), dist(plane), atol=1e-4)
    with pytest.raises(ValueError, match="method must be one of"):
        embed_2d(plane, method="tsne")
