"""figures/make_figures.py regenerates every figure from a folder of runs (seeds as mean ± std)."""
import subprocess
import sys
from pathlib import Path

import pytest

import asg_probe

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ["layerwise_r2", "attention_distance", "umap_last_layer", "pe_similarity_ape", "shuffle_test",
           "resolution_transfer"]


@pytest.mark.slow
def test_make_figures_from_run_folders(tmp_path):
    runs = tmp_path / "runs"
    for label, pos, seeds in [("none", "none", (0, 1)), ("ape", "ape", (0,))]:
        for seed in seeds:
            model = asg_probe.create_model("vit_tiny_patch4_32", pos=pos, num_classes=5)
            asg_probe.save_checkpoint(runs / label / f"seed{seed}" / "model.safetensors", model)
    out = tmp_path / "figs"
    done = subprocess.run([sys.executable, str(ROOT / "figures" / "make_figures.py"), "--runs", str(runs),
                           "--num-images", "12", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in FIGURES:
        assert (out / f"{name}.pdf").read_bytes()[:4] == b"%PDF", name
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (out / "pe_similarity_none.png").exists()  # no position table, no grid
    assert "analysed none" in done.stdout and done.stdout.count("analysed none") == 2  # both seeds
    assert f"wrote {out / 'layerwise_r2.pdf'}, {out / 'layerwise_r2.png'}" in done.stdout


def test_make_figures_png_only_and_clear_error_without_runs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "figures" / "make_figures.py"), "--runs", str(tmp_path),
                           "--out", str(tmp_path / "o"), "--formats", "png"], capture_output=True, text=True)
    assert done.returncode != 0 and "no checkpoints found" in done.stderr


# --------------------------------------------------------------------------- what the figures show
# Built from results written by hand (known numbers), so every check is fast and exact.

import importlib.util  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from asg_probe.analysis.attention_distance import AttentionDistanceResult  # noqa: E402
from asg_probe.analysis.layerwise import LayerwiseResult, compare_layerwise  # noqa: E402
from asg_probe.analysis.resolution import ResolutionResult  # noqa: E402
from asg_probe.plotting import COL_COLOR, ROW_COLOR, model_color  # noqa: E402


def _make_figures():
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "figures" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _layerwise(label, shift=0.0, depth=3):
    rows = [{"layer": k, "r2_row": 0.2 * k + shift, "r2_col": 0.1 * k + shift, "r2": 0.15 * k + shift,
             "r2_control": -0.01, "r2_control_row": -0.01, "r2_control_col": -0.01, "selectivity": 0.15 * k}
            for k in range(depth + 1)]
    return LayerwiseResult(rows, (8, 8), 10, checkpoint=label)


def _attention(label, heads):
    return AttentionDistanceResult(heads, patch_size=4, grid=(8, 8), checkpoint=label, num_images=10)


def _resolution(label, top):
    sizes = [16, 24, 32, 48]
    rows = [{"layer": 2, "size": s, "r2": top - abs(s - 32) / 64, "r2_row": top, "r2_col": top} for s in sizes]
    return ResolutionResult(rows, 32, sizes, 4, checkpoint=label, size_source="rendered")


GUIDANCE_HEADS = {1: [3.0, 21.2, 5.0], 2: [4.0, 4.5, 5.0]}  # one far head, as guidance's layer-1 head 0
APE_HEADS = {1: [2.0, 3.0, 4.0], 2: [5.0, 6.0, 7.0]}


def _points_inside(ax):
    """Every scatter point and line vertex of ``ax`` within its x and y limits."""
    (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
    points = [c.get_offsets() for c in ax.collections if len(c.get_offsets())]
    points += [line.get_xydata() for line in ax.lines  # data lines; axhline/axvline span the axes
               if len(line.get_xdata()) > 1 and line.get_transform().contains_branch(ax.transData)]
    points = np.concatenate(points)
    return bool(((points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)).all())


def _integer_ticks(ax):
    ticks = ax.get_xticks()
    return len(ticks) > 0 and all(float(t).is_integer() for t in ticks)


def test_attention_distance_grid_with_a_shared_y_axis_clips_no_head():
    # notebook 03's six-panel grid: the far head is drawn first, the later panels must not shrink the axis
    fig, axes = plt.subplots(1, 3, sharey=True)
    for ax, heads in zip(axes, (GUIDANCE_HEADS, APE_HEADS, {1: [1.0, 1.0, 1.0], 2: [1.5, 1.5, 1.5]})):
        _attention("x", heads).plot(ax=ax)
    assert all(_points_inside(ax) for ax in axes) and axes[0].get_ylim()[1] >= 21.2
    assert all(_integer_ticks(ax) for ax in axes)
    plt.close(fig)


def test_make_figures_attention_panels_share_one_scale_that_shows_every_head():
    module = _make_figures()
    fig = module.attention_figure({"guidance": [_attention("guidance", GUIDANCE_HEADS)],
                                   "ape": [_attention("ape", APE_HEADS)]}, ["guidance", "ape"])
    axes = fig.axes
    assert all(_points_inside(ax) and _integer_ticks(ax) for ax in axes)
    # each model in its own colour, the one it has in every figure
    assert tuple(axes[0].collections[0].get_facecolor()[0][:3]) == matplotlib.colors.to_rgb(model_color("guidance"))
    plt.close(fig)


def test_layerwise_figures_integer_layer_ticks_model_colours_and_one_seed_title():
    module = _make_figures()
    results = {"none+guidance": [_layerwise("g")], "ape": [_layerwise("a", 0.1)]}
    fig = module.layerwise_figure(results, list(results))
    assert all(_integer_ticks(ax) for ax in fig.axes[:2])
    assert "one seed" in fig._suptitle.get_text() and "±" not in fig._suptitle.get_text()
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert labels == ["guidance", "ape"]  # display names
    plt.close(fig)
    two = module.layerwise_figure({"ape": [_layerwise("a"), _layerwise("a", 0.05)]}, ["ape"])
    assert "mean ± std over seeds" in two._suptitle.get_text()
    plt.close(two)
    fig = compare_layerwise([_layerwise("g"), _layerwise("a")], labels=["none+guidance", "ape"])
    ax = fig.axes[0]
    assert _integer_ticks(ax) and list(ax.get_xticks()) == [0, 1, 2, 3]
    assert ax.lines[0].get_color() == model_color("guidance") and ax.lines[2].get_color() == model_color("ape")
    plt.close(fig)


def test_per_model_layerwise_plot_draws_row_and_column_in_their_own_colours():
    fig = _layerwise("ape").plot()
    colours = {line.get_label(): line.get_color() for line in fig.axes[0].lines}
    assert colours["row"] == ROW_COLOR and colours["col"] == COL_COLOR
    assert ROW_COLOR != model_color("ape") and COL_COLOR != model_color("ape")
    assert _integer_ticks(fig.axes[0]) and _points_inside(fig.axes[0])
    plt.close(fig)


def test_resolution_figure_legend_outside_the_data():
    module = _make_figures()
    fig = module.resolution_figure({"ape": [_resolution("ape", 0.9)], "none": [_resolution("none", 0.5)]},
                                   ["ape", "none"])
    fig.canvas.draw()
    absolute, retained = fig.axes[:2]
    legend_box = retained.get_legend().get_window_extent()
    assert legend_box.x0 >= retained.get_window_extent().x1  # right of the axes: over no curve
    assert "one seed" in fig._suptitle.get_text() and "sizes rendered" in fig._suptitle.get_text()
    # left: absolute R² (ape's is 0.9 at the fit size); right: the fraction of it retained (1 at 32 px)
    assert list(absolute.lines[0].get_ydata())[2] == pytest.approx(0.9)
    assert list(retained.lines[0].get_ydata()) == pytest.approx([0.65 / 0.9, 0.775 / 0.9, 1.0, 0.65 / 0.9])
    plt.close(fig)


def test_help_lists_the_defaults():
    done = subprocess.run([sys.executable, str(ROOT / "figures" / "make_figures.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for text in ("(default: 128)", "(default: scenes)", "(default: figures/out)", "(default: pdf png)"):
        assert text in " ".join(done.stdout.split()), text
