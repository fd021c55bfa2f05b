"""Checks that need a CUDA device: results on the GPU equal the CPU's, fused kernels included.

Marked ``gpu``; without a CUDA device they are reported as skipped (CI has none). Run them
on a GPU machine with ``python -m pytest -m gpu tests/test_gpu.py``.
"""
import numpy as np
import pytest
import timm
import torch

import asg_probe
from asg_probe.analysis.attention_distance import attention_distance
from asg_probe.probes import RidgeStats, probe_targets, solve_ridge_cv

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN convolutions default to TF32 (~1e-3): keep the patch embedding in full float32 for comparisons."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _offset_tokens(n_images=40, grid=(6, 7), d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = probe_targets(grid)[:, :2]
    W = torch.randn(2, d, generator=g)
    noise = torch.randn(n_images, grid[0] * grid[1], d, generator=g)
    return coords @ W + 0.3 * noise + 40.0  # a large common offset, like ViT activations


def test_ridge_statistics_and_cv_on_cuda_equal_the_cpu():
    X, Y = _offset_tokens(), probe_targets((6, 7))
    index = torch.arange(X.shape[0])
    cpu, gpu = RidgeStats(n_folds=5), RidgeStats(n_folds=5)
    for start in range(0, X.shape[0], 16):  # batches of 16, consecutive indices
        cpu.update(X[start:start + 16], Y, index[start:start + 16])
        gpu.update(X[start:start + 16].to(CUDA), Y.to(CUDA), index[start:start + 16].to(CUDA))
    assert gpu.device.type == "cuda"
    for name in ("n", "sum_x", "xtx", "xty", "sum_y2"):
        a, b = getattr(cpu, name), getattr(gpu, name).cpu()
        assert float((a - b).abs().max() / a.abs().max()) < 1e-6, name
    res_cpu, res_gpu = solve_ridge_cv(cpu), solve_ridge_cv(gpu)
    np.testing.assert_allclose(res_gpu.cv_r2_, res_cpu.cv_r2_, atol=1e-5)
    assert res_gpu.cv_r2_[:2].min() > 0.9  # the planted coordinates are found
    np.testing.assert_array_equal(res_gpu.alpha_, res_cpu.alpha_)


def test_tf32_matmul_setting_does_not_leak_into_the_statistics():
    X, Y = _offset_tokens(seed=1), probe_targets((6, 7))
    index = torch.arange(X.shape[0])
    exact = RidgeStats(n_folds=5, exact=True)
    exact.update(X.double(), Y, index)
    torch.backends.cuda.matmul.allow_tf32 = True  # what torch.set_float32_matmul_precision("high") does
    fast = RidgeStats(n_folds=5)
    fast.update(X.to(CUDA), Y.to(CUDA), index.to(CUDA))
    rel = (fast.xtx.cpu() - exact.xtx).abs().max() / exact.xtx.abs().max()
    assert float(rel) < 1e-6  # TF32 would be ~1e-3


def test_layerwise_on_cuda_matches_the_cpu():
    torch.manual_seed(0)
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=3)
    images = torch.randn(20, 3, 32, 32)
    cpu = asg_probe.layerwise_probes(model, images, progress=False, device="cpu", exact=True)
    gpu = asg_probe.layerwise_probes(model, images, progress=False, device="cuda", exact=True)
    fast = asg_probe.layerwise_probes(model, images, progress=False, device="cuda")
    assert cpu.rows[0]["r2_row"] > 0.999  # layer 0 holds the learned table: a near-perfect, ill-conditioned fit
    for a, b, c in zip(cpu.rows, gpu.rows, fast.rows):
        assert a["layer"] == b["layer"] == c["layer"]
        for key in ("r2_row", "r2_col", "r2_control"):
            assert abs(a[key] - b[key]) < 1e-6, (a["layer"], key)
            assert abs(a[key] - c[key]) < 1e-3, (a["layer"], key)  # float32 Gram: see RidgeStats(exact=)


@pytest.mark.parametrize("kind", ["timm-vit", "timm-eva-rope", "none", "alibi2d", "rope-mixed", "sdt-decay"])
def test_attention_distance_fused_cuda_kernels_equal_unfused(kind):
    """On CUDA, SDPA runs flash / memory-efficient kernels that never form the probabilities."""
    torch.manual_seed(0)
    if kind == "timm-vit":
        model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=2)
    elif kind == "timm-eva-rope":
        model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=64, depth=2,
                                  embed_dim=96, num_heads=3, use_rot_pos_emb=True)
    else:
        model = asg_probe.create_model("vit_tiny_patch4_32", pos=kind, depth=2)
    size = 64 if kind.startswith("timm") else 32
    x = torch.randn(4, 3, size, size)
    fused = attention_distance(model, x, device="cuda", progress=False).to_dict()
    attn_modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attn_modules and all(m.fused_attn for m in attn_modules)
    for m in attn_modules:
        m.fused_attn = False
    unfused = attention_distance(model, x, device="cuda", progress=False).to_dict()
    on_cpu = attention_distance(model.cpu(), x, device="cpu", progress=False).to_dict()
    for a, b, c in zip(fused["layers"], unfused["layers"], on_cpu["layers"]):
        np.testing.assert_allclose(a["heads_px"], b["heads_px"], atol=1e-4)
        np.testing.assert_allclose(a["heads_px"], c["heads_px"], atol=1e-3)


@pytest.mark.parametrize("pos", ["none", "ape", "rope-mixed", "alibi2d", "relpos", "rmt-decay", "sdt-decay"])
def test_every_mechanism_trains_in_bf16_on_cuda(pos):
    from asg_train.bench import bench_steps

    row = bench_steps("vit_tiny_patch4_32", pos, img_size=32, batch_size=16, steps=3, warmup=1, device=CUDA,
                      precision="bf16", guidance=(pos == "none"), compile_model=False, num_classes=10)
    assert np.isfinite(row["loss"]) and row["step_ms"] > 0
