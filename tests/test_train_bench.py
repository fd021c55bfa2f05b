"""train.bench on CPU with tiny settings: FLOP count known answers and one timed step."""
import math

import pytest
import torch

import asg_probe
from asg_train import bench


def test_matmul_flops_known_answer():
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", num_classes=10, depth=1)
    n_patch, n, d, h = 64, 65, 128, 512
    block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * h
    expected = block + 2 * n_patch * 48 * d + 2 * d * 10
    assert bench.vit_matmul_flops(model, 32) == expected
    with_head = bench.vit_matmul_flops(model, 32, guidance_hidden=256)
    assert with_head - expected == 4 * n_patch * (d * 256 + 256)


def test_step_benchmark_row_is_consistent_with_its_flop_count():
    peak = bench.matmul_peak(torch.device("cpu"), torch.float32, n=256, seconds=0.1)
    row = bench.bench_steps("vit_tiny_patch4_32", "sdt-decay", img_size=32, batch_size=4, steps=1, warmup=1,
                            device=torch.device("cpu"), precision="fp32", guidance=True, compile_model=False,
                            num_classes=10, peak=peak)
    step_s = row["step_ms"] / 1e3
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="sdt-decay", num_classes=10)
    flops = 3 * bench.vit_matmul_flops(model, 32, guidance_hidden=256) * 4   # forward + backward, 4 images
    assert row["images_per_s"] == pytest.approx(4 / step_s)
    assert row["tflops_per_s"] == pytest.approx(flops / step_s / 1e12)
    assert row["mfu"] == pytest.approx(flops / step_s / peak)
    assert row["peak_mem_mb"] > 0


def test_step_benchmark_trains_the_real_loss():
    # a fresh classifier predicts ~uniformly: cross-entropy ≈ ln 10 (a benchmark that timed
    # something else, or dropped the loss, would not report it)
    row = bench.bench_steps("vit_tiny_patch4_32", "none", img_size=32, batch_size=8, steps=1, warmup=0,
                            device=torch.device("cpu"), precision="fp32", guidance=False, compile_model=False,
                            num_classes=10)
    assert row["loss"] == pytest.approx(math.log(10), abs=0.3)
    guided = bench.bench_steps("vit_tiny_patch4_32", "none", img_size=32, batch_size=8, steps=1, warmup=0,
                               device=torch.device("cpu"), precision="fp32", guidance=True, compile_model=False,
                               num_classes=10)
    assert guided["loss"] > row["loss"] + 1                 # λ = 300 times a positive coordinate loss


def test_data_benchmark_decodes_jpegs(tmp_path):
    bench._write_jpegs(tmp_path, 4, size=(64, 48))
    rows = bench.bench_data([0, 1], images=4, img_size=32, batch_size=2, folder=str(tmp_path))
    assert [(r["workers"], r["images"]) for r in rows] == [(0, 4), (1, 4)]
    assert all(r["images_per_s"] == pytest.approx(r["images"] / r["seconds"]) for r in rows)


def test_cli_prints_a_table(capsys):
    assert bench.main(["steps", "--model", "vit_tiny_patch4_32", "--pos", "none", "--guidance", "--img-size", "16",
                       "--batch-size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "images_per_s" in out and out.count("\n") == 3
