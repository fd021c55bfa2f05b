"""Layerwise probes: streamed statistics versus the hand-written way, side by side.

The hand-written way collects every layer's patch tokens, then fits scikit-learn
``GridSearchCV(StandardScaler + Ridge)`` on the same image folds (``image % 5``).
asg_probe streams per-fold sufficient statistics during the forward pass. Each measurement runs in a fresh
process so that peak RSS is its own. Images are random tensors generated batch by
batch (same for every mode), so image storage does not blur the memory figures.

Usage::

    python benchmarks/bench_layerwise.py                       # ViT-S/16 @224, N = 128 256 512 1024
    python benchmarks/bench_layerwise.py --num-images 128 256 --naive-max 0 --repeats 3
    python benchmarks/bench_layerwise.py --num-images 128 --naive-max 0 --repeats 3 --fast  # float32 Gram
    python benchmarks/bench_layerwise.py --model vit_tiny_patch4_32 --img-size 32 --num-images 256 1024
    python benchmarks/bench_layerwise.py --device cuda --naive-max 0 --repeats 2   # on a GPU
    python benchmarks/bench_layerwise.py --whole-process --num-images 128 1024 --repeats 3

``--whole-process`` times what a user waits for: the command ``asg-probe layerwise CKPT --arch MODEL
--no-init-baseline`` (start-up, model loading, the built-in photographs decoded, probes, files
written) against a script that loads the same checkpoint through ``asg_probe.load_checkpoint``,
prepares the same photographs (``ImageBatches``) and runs one bare forward over them, in
alternating pairs: wall clock of the whole process, and its CPU time (user + sys of the child, steadier on a
shared machine; with 2 threads it counts their spinning too); ``OMP_NUM_THREADS`` as set by the caller.

On a GPU both modes keep the model and the statistics on the device and wait for it
(``torch.cuda.synchronize``) before the clock stops; peak GPU memory is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def batches(n, batch_size, img_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        yield torch.randn(b, 3, img_size, img_size, generator=gen), torch.arange(start, start + b)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode, model_name, n, batch_size, img_size, device="cpu", fast=False, single_control=False):
    import asg_probe
    from asg_probe.analysis.layerwise import LayerwiseAccumulator, LayerwiseResult
    from asg_probe.extract import forward_tokens, run_analyses

    device = torch.device(device)
    torch.manual_seed(0)  # the same random weights in every worker, so the R² of the modes can be compared
    model = asg_probe.create_model(model_name, pos="ape", num_classes=0, img_size=img_size).eval().to(device)
    if device.type == "cuda":  # CUDA context, kernels and allocator warmed outside the clock, for both modes
        with torch.no_grad():
            model.forward_features(torch.randn(batch_size, 3, img_size, img_size, device=device))
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "forward":
        with torch.no_grad():  # the bare model: no hooks, no tokens kept
            for x, _ in batches(n, batch_size, img_size):
                model.forward_features(x.to(device, non_blocking=True))
        r2 = None
    elif mode == "layerwise":
        # --single-control: the probe workload before the content control and the 5 control seeds
        # (4 target columns instead of 22), to separate the cost of the controls from the rest
        controls = dict(n_control_seeds=1) if single_control else {}
        acc = LayerwiseAccumulator(n_folds=5, exact=not fast, **controls)
        (acc,) = run_analyses(model, batches(n, batch_size, img_size), [acc], progress=False, device=device)
        res = LayerwiseResult.from_accumulator(acc)
        r2 = [round(r["r2"], 4) for r in res.rows]
    else:  # the hand-written way
        import numpy as np
        from sklearn.linear_model import Ridge
        from sklearn.model_selection import GridSearchCV, PredefinedSplit
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from asg_probe.probes import DEFAULT_ALPHAS, coordinate_targets

        tokens, groups = {}, []
        for x, idx in batches(n, batch_size, img_size):
            for layer, t in forward_tokens(model, x.to(device)).items():
                tokens.setdefault(layer, []).append(t.reshape(-1, t.shape[-1]).cpu().numpy())
            groups.append(np.repeat(idx.numpy(), t.shape[1]))
        groups = np.concatenate(groups)
        grid = img_size // model.patch_embed.patch_size[0]
        y = np.tile(coordinate_targets((grid, grid)).numpy(), (n, 1))
        r2 = []
        for layer in sorted(tokens):
            X = np.concatenate(tokens.pop(layer))
            # alpha chosen by 5-fold CV split by image (the streamed folds, image % 5, so the R² can be
            # compared), scored by held-out R²; no refit (generous)
            search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": DEFAULT_ALPHAS},
                                  cv=PredefinedSplit(groups % 5), scoring="r2", refit=False)
            search.fit(X, y)
            r2.append(round(float(search.best_score_), 4))
    _sync(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    # cpu_seconds: CPU time of all the worker's threads, a steadier measure of work than wall time on a shared
    # machine (with OMP_NUM_THREADS=1; with more threads it counts their spinning too)
    print(json.dumps({"mode": mode, "n": n, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mb": peak_mb,
                      "peak_gpu_mb": gpu_mb, "r2": r2}))


BARE_FORWARD = """
import sys, torch
import asg_probe
from asg_probe.inputs import ImageBatches
model = asg_probe.load_checkpoint(sys.argv[1], arch=sys.argv[2]).eval()
data = ImageBatches.prepare(model, None, num_images=int(sys.argv[3]), batch_size=32)
with torch.no_grad():
    for x, _ in data:
        model.forward_features(x)
"""


def whole_process(model_name, sizes, repeats, tmp):
    """Alternating pairs (bare forward script, ``asg-probe layerwise``): wall seconds of each whole process."""
    import tempfile
    from pathlib import Path

    import asg_probe

    tmp = Path(tempfile.mkdtemp() if tmp is None else tmp)
    ckpt = tmp / f"{model_name}.safetensors"
    torch.manual_seed(0)
    import timm

    asg_probe.save_checkpoint(ckpt, timm.create_model(model_name, num_classes=0))
    # the CLI module run by this interpreter (what the asg-probe script runs): the asg_probe on its path is timed
    cli = [sys.executable, "-m", "asg_probe.cli"]
    print(f"# whole process, {model_name}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"# load before: {os.getloadavg()[0]:.2f} (1-min load average; the machine has {os.cpu_count()} cores)")
    print(f"{'N':>6} {'pair':>4} {'forward s':>10} {'layerwise s':>12} {'ratio':>6} {'fwd cpu s':>10} "
          f"{'lw cpu s':>9} {'cpu ratio':>9} {'load':>5}")
    for n in sizes:
        for r in range(repeats):
            times, cpu = {}, {}
            for mode in ("forward", "layerwise"):
                cmd = ([sys.executable, "-c", BARE_FORWARD, str(ckpt), model_name, str(n)] if mode == "forward" else
                       [*cli, "layerwise", str(ckpt), "--arch", model_name, "--num-images", str(n), "--no-progress",
                        "--no-init-baseline", "--out", str(tmp / "out")])
                t0, u0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                times[mode] = time.perf_counter() - t0
                u1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                # user + sys CPU of the child: the work done, steadier than wall time on a shared machine
                cpu[mode] = (u1.ru_utime - u0.ru_utime) + (u1.ru_stime - u0.ru_stime)
            print(f"{n:6d} {r:4d} {times['forward']:10.2f} {times['layerwise']:12.2f} "
                  f"{times['layerwise'] / times['forward']:6.2f} {cpu['forward']:10.2f} {cpu['layerwise']:9.2f} "
                  f"{cpu['layerwise'] / cpu['forward']:9.2f} {os.getloadavg()[0]:5.2f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_dinov3")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-images", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--device", default="cpu", help="cpu or cuda (the hand-written way fits on the CPU either way)")
    p.add_argument("--fast", action="store_true", help="float32 Gram matrices (layerwise --fast); default float64")
    p.add_argument("--naive-max", type=int, default=128, help="largest N for the hand-written way")
    p.add_argument("--single-control", action="store_true",
                   help="one slot-control seed (4 target columns instead of 12)")
    p.add_argument("--repeats", type=int, default=1,
                   help="alternate forward/layerwise this many times per N and keep each one's fastest "
                        "(shared or virtual machines vary by ~±7%% from run to run)")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    p.add_argument("--whole-process", action="store_true",
                   help="time the asg-probe layerwise command against a bare-forward script (see the module doc)")
    p.add_argument("--tmp", default=None, help="folder for the checkpoint and outputs of --whole-process")
    args = p.parse_args()
    if args.whole_process:
        name = "vit_small_patch16_224" if args.model == "vit_small_patch16_dinov3" else args.model
        whole_process(name, args.num_images, args.repeats, args.tmp)
        return
    if args.worker:
        run_mode(args.worker[0], args.model, int(args.worker[1]), args.batch_size, args.img_size, args.device,
                 args.fast, args.single_control)
        return
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# {args.model} @ {args.img_size}px, batch {args.batch_size}, device {where}, "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, best of {args.repeats}")
    print(f"{'N':>6} {'forward s':>10} {'layerwise s':>12} {'ratio':>6} {'RSS fwd MB':>11} {'RSS lw MB':>10} "
          f"{'naive s':>8} {'RSS naive MB':>13}")
    results = {}
    for n in args.num_images:
        row = {}
        modes = ("forward", "layerwise") * args.repeats + (("naive",) if n <= args.naive_max else ())
        for mode in modes:
            cmd = [sys.executable, __file__, "--model", args.model, "--img-size", str(args.img_size),
                   "--batch-size", str(args.batch_size), "--device", args.device, "--worker", mode, str(n)]
            cmd += ["--fast"] if args.fast else []
            cmd += ["--single-control"] if args.single_control else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            if mode not in row or res["seconds"] < row[mode]["seconds"]:
                row[mode] = res
        results[n] = row
        f, lw, nv = row["forward"], row["layerwise"], row.get("naive")
        naive = f"{nv['seconds']:8.1f} {nv['peak_rss_mb']:13.0f}" if nv else f"{'-':>8} {'-':>13}"
        gpu = (f"   GPU MB fwd {f['peak_gpu_mb']:.0f} lw {lw['peak_gpu_mb']:.0f}"
               if f.get("peak_gpu_mb") is not None else "")
        print(f"{n:6d} {f['seconds']:10.2f} {lw['seconds']:12.2f} {lw['seconds'] / f['seconds']:6.2f} "
              f"{f['peak_rss_mb']:11.0f} {lw['peak_rss_mb']:10.0f} {naive}{gpu}", flush=True)
        if nv:
            print(f"       last-layer R²: streamed {lw['r2'][-1]:.4f}  hand-written {nv['r2'][-1]:.4f}")


if __name__ == "__main__":
    main()
