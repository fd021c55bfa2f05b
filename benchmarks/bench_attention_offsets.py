"""Attention offsets: cost against a bare forward pass and against the attention-distance analysis.

Three modes on the same model and the same random images, each in a fresh process (so
that peak RSS is its own): ``forward`` (the bare model, no hooks), ``distance`` (the
attention-distance analysis: probabilities recomputed from q, k at every block) and
``offsets`` (logits kept as well, per-offset sums per image and fold, kernels fitted at
the end). Images are random tensors made batch by batch (the same in every mode).

Usage::

    python benchmarks/bench_attention_offsets.py                    # ViT-S/16 @224, sdt-decay, N = 128
    python benchmarks/bench_attention_offsets.py --num-images 32 64 --repeats 2
    python benchmarks/bench_attention_offsets.py --pos none --device cuda
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


def run_mode(mode, model_name, pos, n, batch_size, img_size, device="cpu"):
    import asg_probe
    from asg_probe.analysis.attention_distance import AttentionDistanceAccumulator
    from asg_probe.analysis.attention_offsets import AttentionOffsetsAccumulator
    from asg_probe.extract import run_analyses
    from asg_probe.geometry import model_geometry

    device = torch.device(device)
    torch.manual_seed(0)
    model = asg_probe.create_model(model_name, pos=pos, num_classes=0, img_size=img_size).eval().to(device)
    geo = model_geometry(model)  # measured once (one blank image), outside the clock for every mode
    t0, c0 = time.perf_counter(), time.process_time()
    summary = None
    if mode == "forward":
        with torch.no_grad():
            for x, _ in batches(n, batch_size, img_size):
                model.forward_features(x.to(device))
    elif mode == "distance":
        acc = AttentionDistanceAccumulator(geo.patch_size, geo.num_prefix_tokens)
        run_analyses(model, batches(n, batch_size, img_size), [acc], layers=[0], progress=False, device=device)
        res = acc.result()
        summary = round(sum(res.heads_px[max(res.heads_px)]) / len(res.heads_px[max(res.heads_px)]), 3)
    else:
        acc = AttentionOffsetsAccumulator(geo.num_prefix_tokens, n_folds=5)
        run_analyses(model, batches(n, batch_size, img_size), [acc], layers=[0], progress=False, device=device)
        summary = round(acc.result().layer_r2[geo.depth], 4)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "n": n, "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "peak_rss_mb": peak_mb, "last_layer": summary}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_dinov3")
    p.add_argument("--pos", default="sdt-decay")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-images", type=int, nargs="+", default=[128])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1, help="run every mode this many times, keep each one's fastest")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_mode(args.worker[0], args.model, args.pos, int(args.worker[1]), args.batch_size, args.img_size,
                 args.device)
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print(f"model {args.model} pos={args.pos} @ {args.img_size}px, batch {args.batch_size}, device {args.device}, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    for n in args.num_images:
        best = {}
        for _ in range(args.repeats):
            for mode in ("forward", "distance", "offsets"):  # interleaved: load changes hit every mode alike
                cmd = [sys.executable, __file__, "--model", args.model, "--pos", args.pos, "--img-size",
                       str(args.img_size), "--batch-size", str(args.batch_size), "--device", args.device,
                       "--worker", mode, str(n)]
                out = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                                 .stdout.strip().splitlines()[-1])
                if mode not in best or out["seconds"] < best[mode]["seconds"]:
                    best[mode] = out
        f, d, o = best["forward"], best["distance"], best["offsets"]
        print(f"N={n}: forward {f['seconds']:.1f} s ({f['peak_rss_mb']:.0f} MB), distance {d['seconds']:.1f} s "
              f"({d['seconds'] / f['seconds']:.2f}x forward, {d['peak_rss_mb']:.0f} MB), offsets {o['seconds']:.1f} s "
              f"({o['seconds'] / f['seconds']:.2f}x forward, {o['seconds'] / d['seconds']:.2f}x distance, "
              f"{o['peak_rss_mb']:.0f} MB); cpu s {f['cpu_seconds']:.1f} / {d['cpu_seconds']:.1f} / "
              f"{o['cpu_seconds']:.1f}; last-layer offset R² {o['last_layer']}")


if __name__ == "__main__":
    main()
