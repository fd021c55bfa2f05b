"""Cost of causal erasure (``asg_probe.erase_position``) relative to a bare forward pass.

Usage::

    python benchmarks/bench_erasure.py --model vit_small_patch16_224 --num-images 128
    python benchmarks/bench_erasure.py --device cuda --num-images 1024 --batch-size 128

Times a bare ``forward_features`` pass over the same images in the same batches, then
``erase_position`` at every layer (for each ``--matched-seeds`` value given), with a bare pass
after each, so that the ratio is taken against bare passes on either side of it (the machine
may be shared). Each timing is wall-clock and CPU time of this process (``time.process_time``:
less sensitive to other jobs on the machine than wall time); the load average is printed before
and after. What ``erase_position`` runs: one pass over the fit half (LEACE statistics of every
layer), one clean forward of the held-out half, and per erase layer L the blocks L..end over the
LEACE, control and matched-control copies of the held-out half stacked as one batch, with the
recovery probes streamed at every later layer. Weights are random (``pretrained=False``): the
cost does not depend on them.
"""
from __future__ import annotations

import argparse
import os
import time

import timm
import torch

import asg_probe
from asg_probe.inputs import ImageBatches


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--num-images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--control-seeds", type=int, default=3)
    p.add_argument("--matched-seeds", type=int, nargs="+", default=[1],
                   help="one erase_position run per value (0: no matched control)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, pretrained=False).eval().to(args.device)
    data = ImageBatches.prepare(model, None, num_images=args.num_images, batch_size=args.batch_size)

    def sync():
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        return time.perf_counter() - w, time.process_time() - c, out

    def bare():
        with torch.no_grad():
            for x, _ in data:
                model.forward_features(x.to(args.device))

    print(f"{args.model}, {args.num_images} images, {len(model.blocks) + 1} erase layers, "
          f"{args.control_seeds} control seeds, device {args.device}, {torch.get_num_threads()} threads; "
          f"load average before {os.getloadavg()}", flush=True)
    bares = [timed(bare)[:2]]
    print(f"bare forward: wall {bares[-1][0]:.1f} s, cpu {bares[-1][1]:.1f} s", flush=True)
    for m in args.matched_seeds:
        wall, cpu, res = timed(lambda m=m: asg_probe.erase_position(
            model, None, num_images=args.num_images, batch_size=args.batch_size, n_control_seeds=args.control_seeds,
            n_matched_seeds=m, device=args.device, progress=False))
        bares.append(timed(bare)[:2])
        before, after = bares[-2], bares[-1]
        ref_wall, ref_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        print(f"erase_position (all layers, {m} matched seeds): wall {wall:.1f} s ({wall / ref_wall:.1f}x the bare "
              f"passes around it), cpu {cpu:.1f} s ({cpu / ref_cpu:.1f}x); recovery rows {len(res.recovery)}, "
              f"effect rows {len(res.effect)}", flush=True)
        print(f"bare forward: wall {after[0]:.1f} s, cpu {after[1]:.1f} s; load average {os.getloadavg()}",
              flush=True)


if __name__ == "__main__":
    main()
