"""Forward+backward time of every positional mechanism relative to ``pos=none``.

Usage::

    python benchmarks/bench_mechanisms.py --model vit_small_patch16_dinov3 --img-size 224 --batch-size 8
    python benchmarks/bench_mechanisms.py --device cuda --batch-size 64 --amp

Prints one row per mechanism: median step time (ms), images/s and the ratio to ``none``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import asg_probe


def time_step(model, x, steps, warmup, amp):
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    device_type = x.device.type
    times = []
    for i in range(warmup + steps):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_dinov3")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--positions", nargs="+", default=asg_probe.list_positions())
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    rows = []
    for pos in args.positions:
        model = asg_probe.create_model(args.model, pos=pos, num_classes=100, img_size=args.img_size).to(args.device)
        rows.append((pos, time_step(model.train(), x, args.steps, args.warmup, args.amp)))
        del model
    base = dict(rows).get("none", rows[0][1])
    print(f"# {args.model} @ {args.img_size}px, batch {args.batch_size}, device {args.device}, "
          f"threads {torch.get_num_threads()}, amp {args.amp}")
    print(f"{'pos':<12} {'step ms':>9} {'img/s':>8} {'vs none':>8}")
    for pos, t in rows:
        print(f"{pos:<12} {t * 1e3:9.1f} {args.batch_size / t:8.1f} {t / base:8.2f}")


if __name__ == "__main__":
    main()
