"""Position in attention on the bundled reference models: offset R² per layer, scenes and the shuffle control.

For every bundled model (seed 0 of each recipe), :func:`asg_probe.attention_offsets` on
held-out scenes, twice: as they are, and with each scene's patches shuffled (offsets
between slots: content adjacency removed, what the mechanism itself puts into the scores
stays). Prints a markdown table per layer (pooled over heads) and writes the figure
``attention_offsets_reference.png`` and every result's JSON + npz.

Usage::

    python figures/attention_offsets_reference.py --out figures/offsets --num-images 128
"""
from __future__ import annotations

import argparse
from pathlib import Path


def fmt(value, ci=None):
    text = f"{value:.3f}"
    if ci and all(c == c for c in ci):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def main():
    import torch

    import asg_probe
    from asg_probe.plotting import display_name, model_color

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("figures/offsets"))
    p.add_argument("--num-images", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name in asg_probe.list_reference_models():
        model = asg_probe.load_reference_model(name)
        for shuffled in (False, True):
            res = asg_probe.attention_offsets(model, "scenes", num_images=args.num_images, seed=args.seed,
                                              progress=False, label=name, shuffle_patches=shuffled)
            results[name, shuffled] = res
            res.save(args.out / f"{name}{'-shuffled' if shuffled else ''}")
    print("| model | layer | offset R² (scenes) | held out [95% CI over 5 folds] | beyond self (held in) "
          "| shuffled: held out [CI] | shuffled: beyond self |")
    print("|---|---|---|---|---|---|---|")
    for name in asg_probe.list_reference_models():
        a, b = results[name, False], results[name, True]
        for layer in a.layers:
            nonself = lambda r: sum(r.r2_nonself[layer]) / len(r.r2_nonself[layer])  # noqa: E731 - mean over heads
            print(f"| {display_name(name)} | {layer} | {a.layer_r2[layer]:.3f} | "
                  f"{fmt(a.layer_r2_heldout[layer], a.layer_r2_heldout_ci[layer])} | {nonself(a):.3f} | "
                  f"{fmt(b.layer_r2_heldout[layer], b.layer_r2_heldout_ci[layer])} | {nonself(b):.3f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, shuffled in zip(axes, (False, True)):
        for name in asg_probe.list_reference_models():
            r = results[name, shuffled]
            layers = r.layers
            mean = [r.layer_r2_heldout[layer] for layer in layers]
            lo = [r.layer_r2_heldout_ci[layer][0] for layer in layers]
            hi = [r.layer_r2_heldout_ci[layer][1] for layer in layers]
            color = model_color(name)
            ax.plot(layers, mean, marker="o", ms=3, color=color, label=display_name(name))
            ax.fill_between(layers, lo, hi, color=color, alpha=0.15, lw=0)
        ax.set_xlabel("layer (block)")
        ax.set_xticks(layers)
        ax.set_title("scenes" if not shuffled else "patches shuffled (offsets between slots)", fontsize=9)
    axes[0].set_ylabel("held-out offset R² (heads pooled)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle(f"Position in attention scores: bundled models, {args.num_images} held-out scenes, "
                 "95% CI over 5 image folds", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "attention_offsets_reference.png", dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
