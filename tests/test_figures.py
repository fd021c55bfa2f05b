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


def test_make_figures_png_only_and_clear_error_without_runs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "figures" / "make_figures.py"), "--runs", str(tmp_path),
                           "--out", str(tmp_path / "o"), "--formats", "png"], capture_output=True, text=True)
    assert done.returncode != 0 and "no checkpoints found" in done.stderr
