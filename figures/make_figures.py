"""Regenerate every figure of the README and of a paper-style report from checkpoints.

    python figures/make_figures.py                               # the bundled reference models
    python figures/make_figures.py --runs runs/reference --out figures/paper   # trained run dirs (seeds)
    python figures/make_figures.py --runs runs/reference --out figures/readme --formats png   # the README's

Inputs are labelled checkpoints: bundled reference names, or run directories laid
out as ``<runs>/<label>/seed<k>/model.safetensors`` (what ``python -m asg_train.reference``
writes); several seeds of a label are drawn as mean ± std (a label with one seed is marked so). Images: held-out
procedural scenes (``--images scenes``, the data the reference models were trained
on) or the embedded photographs (``--images photos``) or any folder.

Each figure is written as vector PDF and PNG: layerwise R² curves for all
mechanisms on one plot, attention-distance scatter (head × layer), UMAP panels, PE
similarity grids, shuffle-test bars and resolution-transfer curves, with one
colour and one display name per model throughout (``asg_probe.plotting.model_color``, ``display_name``).
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import asg_probe  # noqa: E402
from asg_probe.plotting import display_name, integer_ticks, model_color  # noqa: E402


def discover(args):
    """``{label: [checkpoint paths (one per seed)]}``."""
    found = defaultdict(list)
    if args.runs:
        for model_file in sorted(Path(args.runs).glob("*/seed*/model.safetensors")):
            name = model_file.parent.parent.name
            found[display_name(name)].append(model_file)
    else:
        from asg_probe.reference import reference_path

        for name in asg_probe.list_reference_models():
            found[display_name(name)].append(reference_path(name))
    if not found:
        raise SystemExit("no checkpoints found: pass --runs DIR or install the reference models")
    return dict(found)


def images_for(kind, num, size, seed):
    if kind == "scenes":
        from asg_probe.scenes import SceneDataset

        return SceneDataset(num, img_size=size, split="test", seed=seed).images()
    if kind == "photos":
        return asg_probe.embedded_images(num_images=num, img_size=size, seed=seed).images
    return asg_probe.load_images(kind, num_images=num, img_size=size, seed=seed).images


def save(fig, out, formats, name):
    paths = [out / f"{name}.{ext}" for ext in formats]
    for path in paths:
        fig.savefig(path, dpi=160 if path.suffix == ".png" else None, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {', '.join(str(p) for p in paths)}")


def mean_std(curves):
    stack = np.array(curves, dtype=float)
    return stack.mean(0), (stack.std(0) if len(curves) > 1 else np.zeros(stack.shape[1]))


def seeds_note(runs_per_label) -> str:
    """'mean ± std over seeds' where some label has two or more runs, else 'one seed'."""
    counts = sorted(set(runs_per_label))
    if counts[-1] < 2:
        return "one seed"
    text = "mean ± std over seeds"
    return text + ("" if counts[0] > 1 else "; n = 1 where not marked")


def legend_outside(ax, **kw):
    """The legend right of the axes, never over a curve."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, **kw)


def layerwise_figure(results, labels):
    """Row and column R² per layer for every label, control dotted (``results[label]`` = seeds)."""
    # row and column apart: in scenes the row is given away by content, so the mean would hide
    # where mechanisms differ
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), sharey=True)
    for ax, (column, control, what) in zip(axes, [("r2_row", "r2_control_row", "row"),
                                                  ("r2_col", "r2_control_col", "column")]):
        all_layers = set()
        for label in labels:
            runs = results[label]
            layers = runs[0].r2()[0]
            all_layers.update(int(v) for v in layers)
            m, s = mean_std([r.r2(column)[1] for r in runs])
            color = model_color(label)
            ax.plot(layers, m, marker="o", ms=3, color=color,
                    label=display_name(label) + (f" (n={len(runs)})" if len(runs) > 1 else ""))
            ax.fill_between(layers, m - s, m + s, color=color, alpha=0.2, lw=0)
            if control in runs[0].rows[0]:
                mc, _ = mean_std([r.r2(control)[1] for r in runs])
                ax.plot(layers, mc, ls=":", lw=0.9, color=color)
        ax.set_xlabel("layer (0 = patch embedding)")
        integer_ticks(ax, all_layers)
        ax.set_title(f"patch {what}", fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out linear-probe R²\n(dotted: control task)")
    legend_outside(axes[1])
    note = seeds_note(len(results[label]) for label in labels)
    fig.suptitle(f"Where does each layer know its position? ({note})", fontsize=10)
    fig.tight_layout()
    return fig


def attention_figure(results, labels):
    """Head × layer scatter, one panel per label (first seed), one y scale that shows every head."""
    fig, axes = plt.subplots(1, len(labels), figsize=(2.3 * len(labels) + 0.6, 2.8), sharey=True, squeeze=False)
    top = 0.0
    for ax, label in zip(axes[0], labels):
        res = results[label][0]
        for layer, px in res.heads_px.items():
            ax.scatter([layer] * len(px), px, s=10, color=model_color(label))
            top = max(top, max(px), res.uniform_px)
        ax.axhline(res.uniform_px, ls="--", color="k", lw=0.7)
        ax.set_title(display_name(label), fontsize=9)
        ax.set_xlabel("layer")
        integer_ticks(ax, res.heads_px)
    axes[0][0].set_ylim(0, top * 1.08)  # shared: the highest head of any panel stays inside
    axes[0][0].set_ylabel("mean attention distance (px)")
    fig.suptitle("Attention distance per head (dashed: uniform attention)", fontsize=9)
    fig.tight_layout()
    return fig


def shuffle_figure(results, labels):
    """Last-layer R² unshuffled / shuffled → original position / shuffled → slot, per label."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    x = np.arange(len(labels))
    for j, (key, name, hatch) in enumerate([("r2_unshuffled", "unshuffled", ""),
                                            ("r2_original", "shuffled: original position", ""),
                                            ("r2_slot", "shuffled: slot", "//")]):
        vals = [[r.rows[-1][key] for r in results[lb]] for lb in labels]
        m = [np.mean(v) for v in vals]
        s = [np.std(v) if len(v) > 1 else 0 for v in vals]
        ax.bar(x + (j - 1) * 0.27, m, 0.27, yerr=s, label=name, hatch=hatch,
               color=[model_color(lb) for lb in labels], alpha=[0.35, 1.0, 0.7][j], edgecolor="k", lw=0.4)
    ax.set_xticks(x, [display_name(lb) for lb in labels], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("last-layer R²")
    ax.axhline(0, color="k", lw=0.5)
    legend_outside(ax)
    note = seeds_note(len(results[lb]) for lb in labels)
    ax.set_title(f"Content or injection? (patch-shuffle test; {note})", fontsize=10)
    fig.tight_layout()
    return fig


def resolution_figure(results, labels):
    """Last-layer R² against input size per label (left) and the fraction of the fit-size R² each
    size retains (right); legend outside the curves."""
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.4))
    for ax, column, ylabel in ((axes[0], "r2", "last-layer probe R²"),
                               (axes[1], "r2_retained", "fraction of the fit-size R² retained")):
        for label in labels:
            runs = results[label]
            last = max(r["layer"] for r in runs[0].to_dict()["layers"])
            sizes, _ = runs[0].curve(last, column)
            m, s = mean_std([r.curve(last, column)[1] for r in runs])
            color = model_color(label)
            ax.plot(sizes, m, marker="o", ms=3, color=color,
                    label=display_name(label) + (f" (n={len(runs)})" if len(runs) > 1 else ""))
            ax.fill_between(sizes, m - s, m + s, color=color, alpha=0.2, lw=0)
        ax.axvline(runs[0].train_size, color="k", ls="--", lw=0.7)
        ax.set_xlabel("input size (px); dashed: probe fit size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    legend_outside(axes[1])
    note = seeds_note(len(results[lb]) for lb in labels)
    how = results[labels[0]][0].to_dict().get("size_source")  # "rendered" or "resized"
    fig.suptitle(f"Resolution transfer of the position probe ({f'sizes {how}; ' if how else ''}{note}; "
                 "retained: missing where the fit-size R² < 0.05)", fontsize=10)
    fig.tight_layout()
    return fig


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each default, except where the help says what no value means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=_HelpWithDefaults)
    p.add_argument("--runs", help="folder of <label>/seed<k>/model.safetensors (default: the bundled reference models)")
    p.add_argument("--images", default="scenes", help="scenes | photos | a folder")
    p.add_argument("--num-images", type=int, default=128, help="images per analysis")
    p.add_argument("--seed", type=int, default=0, help="image sampling seed")
    p.add_argument("--out", type=Path, default=Path("figures/out"), help="output folder")
    p.add_argument("--formats", nargs="+", default=None, choices=["pdf", "png", "svg"],
                   help="file types to write (default: pdf png)")
    args = p.parse_args()
    args.formats = args.formats or ["pdf", "png"]
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    found = discover(args)
    results = defaultdict(lambda: defaultdict(list))
    for label, paths in found.items():
        for path in paths:
            model = asg_probe.load_checkpoint(path)
            size = int(model.patch_embed.img_size[0])
            imgs = images_for(args.images, args.num_images, size, args.seed)
            kw = dict(progress=False, label=label)
            results[label]["layerwise"].append(asg_probe.layerwise_probes(model, imgs, **kw))
            results[label]["attention"].append(asg_probe.attention_distance(model, imgs, **kw))
            results[label]["shuffle"].append(asg_probe.shuffle_test(model, imgs, **kw))
            # scenes are rendered at each size (same seeds), other sources resized from one image set
            source = dict(images="scenes", num_images=args.num_images, seed=args.seed) if args.images == "scenes" \
                else dict(images=imgs)
            results[label]["resolution"].append(asg_probe.resolution_transfer(model, **source, **kw))
            if len(results[label]["embeddings"]) == 0:
                results[label]["embeddings"].append(asg_probe.token_embeddings(model, imgs[:64], **kw))
            if len(results[label]["pe"]) == 0:
                try:
                    results[label]["pe"].append(asg_probe.pos_similarity(model, label=label))
                except ValueError:
                    pass
            print(f"analysed {label}: {path}")
    labels = list(results)

    def per_label(kind):
        return {label: results[label][kind] for label in labels}

    save(layerwise_figure(per_label("layerwise"), labels), args.out, args.formats, "layerwise_r2")
    save(attention_figure(per_label("attention"), labels), args.out, args.formats, "attention_distance")
    from asg_probe.analysis.embeddings import compare_embeddings

    save(compare_embeddings([results[lb]["embeddings"][0] for lb in labels], labels=labels, layer=-1),
         args.out, args.formats, "umap_last_layer")
    for label in labels:  # PE similarity grids, where a model has a position table
        if results[label]["pe"]:
            save(results[label]["pe"][0].plot(), args.out, args.formats, f"pe_similarity_{label}")
    save(shuffle_figure(per_label("shuffle"), labels), args.out, args.formats, "shuffle_test")
    save(resolution_figure(per_label("resolution"), labels), args.out, args.formats, "resolution_transfer")


if __name__ == "__main__":
    main()
