"""Cost of causal erasure (``asg_probe.erase_position``) relative to a bare forward pass.

Usage::

    python benchmarks/bench_erasure.py --model vit_small_patch16_224 --num-images 128
    python benchmarks/bench_erasure.py --device cuda --num-images 1024 --batch-size 128

Times (1) one bare ``forward_features`` pass over the same images, in the same batches, and
(2) ``erase_position`` at every layer (fit pass over half the images, then per erase layer one
forward of the blocks from that layer on over the clean, erased and control copies of the other
half, recovery probes at every later layer), and prints both and their ratio. Weights are random
(``pretrained=False``): the cost does not depend on them.
"""
from __future__ import annotations

import argparse
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

    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in data:
            model.forward_features(x.to(args.device))
    sync()
    bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = asg_probe.erase_position(model, None, num_images=args.num_images, batch_size=args.batch_size,
                                   n_control_seeds=args.control_seeds, device=args.device, progress=False)
    sync()
    erase = time.perf_counter() - t0
    print(f"{args.model}, {args.num_images} images, {len(model.blocks) + 1} erase layers, "
          f"{args.control_seeds} control seeds, device {args.device}, {torch.get_num_threads()} threads")
    print(f"bare forward: {bare:.1f} s; erase_position (all layers): {erase:.1f} s; ratio {erase / bare:.1f}x")
    print(f"recovery rows {len(res.recovery)}, effect rows {len(res.effect)}")


if __name__ == "__main__":
    main()
