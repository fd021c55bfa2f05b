"""Benchmarks: training-step throughput per mechanism, and the image-loading pipeline.

    python -m asg_train.bench steps --model vit_base_patch16_dinov3 --pos none,ape,rope-mixed,alibi2d,relpos,rmt-decay,sdt-decay \
        --guidance --img-size 224 --batch-size 128 --device cuda --out bench_b16.json
    python -m asg_train.bench steps --model vit_tiny_patch4_32 --pos none,ape --img-size 32 --batch-size 64 --device cpu
    python -m asg_train.bench data --workers 0,1,2 --images 256

``steps`` times full training steps (forward, backward, AdamW, grad-clip) of the same
:class:`~asg_train.modules.ClassificationModule` that ``asg-train`` uses, on synthetic images held in
device memory (no data loading). MFU = analytic matmul FLOPs per step / step time /
the measured matmul peak of this device (bf16 on GPU, the run's dtype on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


# --------------------------------------------------------------------------- FLOPs

def vit_matmul_flops(model, img_size: int, guidance_hidden: int | None = None) -> float:
    """Forward matmul FLOPs of one image (multiply-add = 2 FLOPs).

    Per block: qkv ``2N·D·3D``, scores and weighted sum ``2·2N²D``, projection ``2N·D²``,
    MLP ``2·2N·D·H``; plus the patch embedding, the classifier and the guidance head.
    The decomposed decay's second attention pass is not counted (model FLOPs, not hardware).
    """
    p = model.patch_embed.patch_size[0]
    n_patch = (img_size // p) ** 2
    n = n_patch + model.num_prefix_tokens
    d = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features if hasattr(model.blocks[0].mlp, "fc1") else 4 * d
    if hasattr(model.blocks[0].mlp, "fc1_g"):  # SwiGLU: two input projections
        hidden = model.blocks[0].mlp.fc1_g.out_features * 2
    per_block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * hidden
    flops = len(model.blocks) * per_block + 2 * n_patch * 3 * p * p * d + 2 * d * model.num_classes
    if guidance_hidden:
        flops += 2 * 2 * n_patch * (d * guidance_hidden + guidance_hidden)
    return float(flops)


def matmul_peak(device, dtype, n: int | None = None, seconds: float = 1.0, repeats: int = 3) -> float:
    """Measured dense matmul FLOP/s of this device for ``dtype`` (the MFU denominator).

    The best of ``repeats`` windows, so that a moment of contention does not lower the peak.
    """
    return max(_matmul_rate(device, dtype, n, seconds / repeats) for _ in range(repeats))


def _matmul_rate(device, dtype, n, seconds) -> float:
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        if device.type == "cuda" and iters % 10:
            continue  # queue several kernels between host syncs
        _sync(device)
    _sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    # Linux reports ru_maxrss in KiB: the process's peak resident set so far (monotone over configs).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- step benchmark

def bench_steps(model_name: str, pos: str, *, img_size: int, batch_size: int, steps: int, warmup: int,
                device, precision: str, guidance: bool, compile_model: bool, num_classes: int = 1000,
                peak: float | None = None) -> dict:
    import asg_probe

    from .build import param_groups
    from .modules import ClassificationModule

    torch.manual_seed(0)
    model = asg_probe.create_model(model_name, pos=pos, num_classes=num_classes, img_size=img_size)
    head = asg_probe.GuidanceHead(model.embed_dim, hidden_dim=256) if guidance else None
    module = ClassificationModule(model, head).to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(param_groups(model, head, 0.01), lr=1e-4, fused=fused)
    step_module = torch.compile(module) if compile_model else module
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    lam = torch.tensor(300.0, device=device)

    def one_step():
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else _null()
        with ctx:
            loss = step_module(x, y, lam)[0]
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        one_step()
    _sync(device)
    # Median of individually timed steps: robust to other processes stealing the CPU/GPU for a moment.
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = one_step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = 3 * vit_matmul_flops(model, img_size, 256 if guidance else None) * batch_size  # fwd + 2×bwd
    row = {"model": model_name, "pos": pos, "guidance": guidance, "img_size": img_size, "batch_size": batch_size,
           "precision": precision, "compile": compile_model, "step_ms": step_s * 1e3,
           "images_per_s": batch_size / step_s, "peak_mem_mb": _peak_memory_mb(device),
           "tflops_per_s": flops / step_s / 1e12, "loss": float(loss)}
    if peak:
        row["mfu"] = flops / step_s / peak
    return row


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- data benchmark

def _write_jpegs(folder: Path, count: int, size=(500, 375), seed: int = 0):
    """Photo-like JPEGs (smooth colour fields + mild noise, quality 90) in two classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        d = folder / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.random((6, 8, 3)) * 255
        img = Image.fromarray(low.astype("uint8")).resize(size, Image.BICUBIC)
        arr = np.asarray(img).astype("float32") + rng.normal(0, 8, (size[1], size[0], 3))
        Image.fromarray(arr.clip(0, 255).astype("uint8")).save(d / f"{i}.jpg", quality=90)


def bench_data(workers: list[int], images: int, img_size: int, batch_size: int, folder: str | None = None) -> list[dict]:
    """Images/s of JPEG decode + RandomResizedCrop + flip + normalise through ``asg-train``'s loader."""
    from .data import BatchPlan, ImageFolderDataset, ImageTransform, iterate_batches

    tmp = None
    if folder is None:
        tmp = tempfile.TemporaryDirectory()
        folder = tmp.name
        _write_jpegs(Path(folder), images)
    classes = sorted(p.name for p in Path(folder).iterdir() if p.is_dir())
    transform = ImageTransform(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], train=True)
    ds = ImageFolderDataset([folder], {c: i for i, c in enumerate(classes)}, transform)
    # Untimed warm-up in this process: lazy imports, decoder initialisation, the page cache.
    for _ in iterate_batches(ds, BatchPlan(len(ds), batch_size, seed=1, base_size=img_size).batches(0)[:2]):
        pass
    rows = []
    for n in workers:
        plan = BatchPlan(len(ds), batch_size, seed=0, base_size=img_size)
        t0 = time.perf_counter()
        seen = 0
        for x, _, _ in iterate_batches(ds, plan.batches(0), num_workers=n):
            seen += x.shape[0]
        dt = time.perf_counter() - t0
        rows.append({"workers": n, "images": seen, "seconds": dt, "images_per_s": seen / dt,
                     "img_size": img_size, "cpu_count": os.cpu_count()})
    if tmp is not None:
        tmp.cleanup()
    return rows


# --------------------------------------------------------------------------- CLI

def _print_table(rows: list[dict], keys: list[str]):
    keys = [k for k in keys if any(k in r for r in rows)]
    print(" | ".join(keys))
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        print(" | ".join(cells))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m asg_train.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("steps", help="training-step throughput, memory and MFU per mechanism")
    s.add_argument("--model", default="vit_small_patch16_dinov3")
    s.add_argument("--pos", default="none,ape,rope-mixed,alibi2d,relpos,rmt-decay,sdt-decay")
    s.add_argument("--guidance", action="store_true", help="also time pos=none with the guidance head")
    s.add_argument("--img-size", type=int, default=224)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--precision", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    s.add_argument("--compile", action="store_true")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--out", help="write the rows as JSON here")
    d = sub.add_parser("data", help="JPEG decode + augmentation images/s with N loader workers")
    d.add_argument("--workers", default="0,1,2")
    d.add_argument("--images", type=int, default=256)
    d.add_argument("--img-size", type=int, default=224)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--folder", help="an existing class-folder tree instead of generated JPEGs")
    d.add_argument("--out")
    args = p.parse_args(argv)

    if args.what == "data":
        rows = bench_data([int(w) for w in args.workers.split(",")], args.images, args.img_size,
                          args.batch_size, args.folder)
        _print_table(rows, ["workers", "images", "seconds", "images_per_s", "cpu_count"])
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        peak_dtype = torch.bfloat16 if device.type == "cuda" else {"bf16": torch.bfloat16}.get(precision, torch.float32)
        peak = matmul_peak(device, peak_dtype)
        print(f"# measured matmul peak ({peak_dtype}, {device}): {peak / 1e12:.2f} TFLOP/s", file=sys.stderr)
        configs = [(pos, False) for pos in args.pos.split(",") if pos]
        if args.guidance:
            configs.insert(1 if configs and configs[0][0] == "none" else 0, ("none", True))
        rows = []
        for pos, guided in configs:
            row = bench_steps(args.model, pos, img_size=args.img_size, batch_size=args.batch_size,
                              steps=args.steps, warmup=args.warmup, device=device, precision=precision,
                              guidance=guided, compile_model=args.compile, peak=peak)
            row["peak_tflops"] = peak / 1e12
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base = next((r for r in rows if r["pos"] == "none" and not r["guidance"]), None)
        for r in rows:
            if base:
                r["vs_none"] = r["step_ms"] / base["step_ms"]
        _print_table(rows, ["pos", "guidance", "img_size", "batch_size", "step_ms", "images_per_s",
                            "peak_mem_mb", "tflops_per_s", "mfu", "vs_none"])
    if args.out:
        from asg_probe.files import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
