"""Resolution transfer: planted known answers at every size, protocol details, errors."""
import pytest
import torch
import torch.nn as nn

import asg_probe
from asg_probe.inputs import ImageBatches
from asg_probe.analysis.resolution import (ResolutionResult, any_input_size, default_sizes,
                                           resolution_transfer)
from asg_probe.probes import coordinate_targets
from asg_probe.layers.grid import grid_coords


class _PatchEmbed(nn.Module):
    def __init__(self, patch, img):
        super().__init__()
        self.patch_size = (patch, patch)
        self.img_size = (img, img)


class PlantedCoords(nn.Module):
    """Stub ViT whose layer-0 tokens hold the patch position, linearly, at any grid, plus content.

    ``mode="relative"``: the position part is linear in the *normalised* (row, col), so one probe
    fits every grid. ``mode="absolute"``: linear in the *integer* (row, col), so a probe fit at one
    grid mis-scales at the others. Blocks are identities (layers 1, 2 equal layer 0).
    """

    def __init__(self, mode="relative", patch=4, img=32, pos_dim=6, content_dim=10, depth=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mode = mode
        self.patch_embed = _PatchEmbed(patch, img)
        self.num_prefix_tokens = 1
        self.blocks = nn.ModuleList([nn.Identity() for _ in range(depth)])
        self.register_buffer("pos_mix", torch.randn(2, pos_dim, generator=g))
        self.register_buffer("content", torch.randn(3 * patch * patch, content_dim, generator=g) / patch)

    def forward_features(self, x):
        p = self.patch_embed.patch_size[0]
        B, C, H, W = x.shape
        grid = (H // p, W // p)
        where = coordinate_targets(grid) if self.mode == "relative" else grid_coords(grid)
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B, grid[0] * grid[1], -1)
        tokens = torch.cat([(where @ self.pos_mix).expand(B, -1, -1), patches @ self.content], dim=-1)
        x = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)  # a prefix token, removed by the hooks
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture(scope="module")
def images():
    return torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_default_sizes_span_half_to_double_and_include_the_fit_size():
    assert default_sizes(32, 4) == [16, 24, 32, 40, 48, 64]
    sizes = default_sizes(224, 16)
    assert sizes[0] == 112 and sizes[-1] == 448 and 224 in sizes and all(s % 16 == 0 for s in sizes)


def test_relative_coordinates_transfer_to_every_size(images):
    res = resolution_transfer(PlantedCoords("relative"), images, progress=False)
    assert res.sizes == [16, 24, 32, 40, 48, 64] and res.train_size == 32
    frame = res.to_frame()
    assert len(frame) == 3 * 6  # layers 0..2 × sizes
    assert frame["r2_row"].min() > 0.99 and frame["r2_col"].min() > 0.99
    assert res.num_images_fit == 8 and res.num_images_eval == 8


def test_absolute_coordinates_only_fit_the_training_grid(images):
    res = resolution_transfer(PlantedCoords("absolute"), images, sizes=[16, 32, 64], layers=[0], progress=False)
    _, r2 = res.curve(0, "r2_row")
    # The probe learns target = row / 7 at the 8×8 grid. On a 4×4 grid it predicts row / 7 for
    # row / 3: R² = 1 - (3/7 - 1)² · Σt² / Σ(t - t̄)² = 1 - (16/49) · (14/9) / (5/9) = 3/35.
    assert r2[0] == pytest.approx(3 / 35, abs=0.01)
    assert r2[1] > 0.999
    assert r2[2] < 0  # 16×16: predictions run to 15/7, far past the targets


def test_no_position_gives_zero_at_every_size(images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    res = resolution_transfer(model, images, sizes=[16, 32, 48], layers=[0], progress=False)
    assert all(abs(v) < 0.05 for v in res.to_frame()["r2"])


def test_result_contract_plot_and_save(images, tmp_path):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2)
    res = resolution_transfer(model, images[:10], sizes=[24, 32, 40], progress=False, label="ape")
    d = res.to_dict()
    assert d["checkpoint"] == "ape" and d["train_size"] == 32 and d["sizes"] == [24, 32, 40]
    assert {"layer", "size", "r2_row", "r2_col", "r2"} <= set(d["layers"][0])
    assert [f["layer"] for f in d["fit"]] == [0, 1, 2]
    assert res.curve(0)[1][1] > 0.9  # APE at layer 0, fit size
    fig = res.plot()
    assert len(fig.axes[0].get_legend().get_texts()) in (1, 2)
    assert all(p.exists() for p in res.save(tmp_path))
    assert "<img" in res._repr_html_()


def test_uint8_source_is_resized_in_pixel_space_then_normalised():
    src = torch.full((2, 3, 16, 16), 255, dtype=torch.uint8)
    data = ImageBatches(src, 4, mean=(0.5,) * 3, std=(0.25,) * 3)
    (x, idx), = list(data.subset([0, 1], size=8))
    assert x.shape == (2, 3, 8, 8) and torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25
    assert idx.tolist() == [0, 1]
    (_, idx), = list(data.subset([1], size=8, renumber=True))
    assert idx.tolist() == [0]


def test_fixed_size_timm_vit_is_run_at_other_sizes_and_restored():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1,
                              num_classes=0)
    assert not model.dynamic_img_size
    res = resolution_transfer(model, torch.randn(10, 3, 32, 32), sizes=[24, 40], layers=[0], progress=False)
    assert res.to_frame()["r2"].min() > 0.9  # learned APE (resampled to each grid) at layer 0
    assert not model.dynamic_img_size and model.patch_embed.strict_img_size  # switched back
    with pytest.raises(RuntimeError):
        with any_input_size(model):
            raise RuntimeError("boom")
    assert not model.dynamic_img_size and model.patch_embed.flatten


def test_bad_arguments_are_one_line_errors(images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    with pytest.raises(ValueError, match="multiple of the patch size 4; pass e.g. 28 or 32"):
        resolution_transfer(model, images, sizes=[30], progress=False)
    with pytest.raises(ValueError, match="at least 10 images"):
        resolution_transfer(model, images[:7], progress=False)
    with pytest.raises(ValueError, match="layers 0..1"):
        resolution_transfer(model, images, layers=[3], progress=False)
    assert isinstance(resolution_transfer(model, images[:10], sizes=[32], layers=[0], progress=False),
                      ResolutionResult)


def _transfer_on_two_ranks(rank, out):
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    res = resolution_transfer(PlantedCoords("absolute"), images, sizes=[16, 32], progress=False, batch_size=2)
    if rank == 0:
        torch.save(res.to_dict(), out)


def test_two_processes_split_the_images_and_agree_with_one(tmp_path, two_ranks):
    two_ranks(_transfer_on_two_ranks, str(tmp_path / "out.pt"))
    split = torch.load(tmp_path / "out.pt", weights_only=False)
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    whole = resolution_transfer(PlantedCoords("absolute"), images, sizes=[16, 32], progress=False).to_dict()
    for a, b in zip(split["layers"], whole["layers"]):
        assert a["r2"] == pytest.approx(b["r2"], abs=1e-6)


# --------------------------------------------------------------------------- sizes rendered or resized; retained

class RecordingCoords(PlantedCoords):
    """PlantedCoords that keeps every input batch it is given, in call order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def forward_features(self, x):
        self.seen.append(x.clone())
        return super().forward_features(x)


def _scenes_at(size, n, seed):
    from asg_probe.data import load_images, preprocess
    from asg_probe.geometry import IMAGENET_MEAN, IMAGENET_STD

    return preprocess(load_images("scenes", num_images=n, img_size=size, seed=seed).images, IMAGENET_MEAN,
                      IMAGENET_STD)


def test_scenes_are_rendered_at_every_size_not_resized():
    model = RecordingCoords("relative")
    res = resolution_transfer(model, "scenes", num_images=10, seed=3, sizes=[16, 48], layers=[0], progress=False)
    assert res.size_source == "rendered" and res.sizes == [16, 32, 48]  # the fit size is always evaluated
    fit, *evaluated = model.seen  # one pass to fit at 32 px (even indices), then one per size (odd indices)
    assert torch.equal(fit, _scenes_at(32, 10, 3)[0::2])
    for size, seen in zip(res.sizes, evaluated):
        assert torch.equal(seen, _scenes_at(size, 10, 3)[1::2]), size
    # the resize path shows something else at 16 px: the 48 px scenes shrunk, not the 16 px ones
    resized = RecordingCoords("relative")
    out = resolution_transfer(resized, "scenes", num_images=10, seed=3, sizes=[16, 48], layers=[0],
                              progress=False, render=False)
    assert out.size_source == "resized"
    assert resized.seen[1].shape == (5, 3, 16, 16) and not torch.allclose(resized.seen[1], evaluated[0], atol=0.1)
    doc = res.to_dict()
    assert doc["size_source"] == "rendered" and doc["provenance"]["size_source"] == "rendered"
    assert doc["provenance"]["images"]["seed"] == 3 and doc["provenance"]["images"]["img_size"] == [32, 32]
    assert out.to_dict()["provenance"]["size_source"] == "resized"


def test_a_tensor_source_is_resized_under_auto():
    res = resolution_transfer(PlantedCoords("relative"), torch.randn(10, 3, 32, 32), sizes=[16], layers=[0],
                              progress=False)
    assert res.size_source == "resized" and res.provenance["size_source"] == "resized"


def test_retained_is_r2_over_the_fit_size_r2_of_the_same_layer(images):
    res = resolution_transfer(PlantedCoords("absolute"), images, sizes=[16, 32, 64], layers=[0, 2],
                              progress=False)
    frame = res.to_frame()
    for layer in (0, 2):
        rows = frame[frame.layer == layer].set_index("size")
        for column in ("r2", "r2_row", "r2_col"):
            assert (rows[f"{column}_retained"] == rows[column] / rows.loc[32, column]).all()
            assert rows.loc[32, f"{column}_retained"] == 1.0
    # known answer (see test_absolute_coordinates_only_fit_the_training_grid): 3/35 of a fit-size R² ≈ 1
    assert frame.set_index(["layer", "size"]).loc[(0, 16), "r2_row_retained"] == pytest.approx(3 / 35, abs=0.01)
    line = res.summary_line()
    assert "retained" in line and "at 16px" in line and "at 64px" in line and "(sizes resized)" in line


def test_retained_is_nan_below_the_floor():
    floor = ResolutionResult.retained_floor
    assert floor == 0.05
    rows = [{"layer": 0, "size": 16, "r2_row": 0.02, "r2_col": 0.3, "r2": 0.02},
            {"layer": 0, "size": 32, "r2_row": floor * 0.99, "r2_col": 0.6, "r2": floor}]
    res = ResolutionResult(rows, 32, [16, 32], 4)
    first = res.rows[0]
    assert first["r2_row_retained"] != first["r2_row_retained"]  # NaN: fit-size row R² under the floor
    assert first["r2_col_retained"] == 0.5 and first["r2_retained"] == pytest.approx(0.02 / floor)  # at the floor
    assert res.rows[1]["r2_row_retained"] != res.rows[1]["r2_row_retained"]  # NaN even at the fit size itself
    assert '"r2_row_retained": null' in res.to_json()  # JSON has no NaN
    # no fit-size row (a result built by hand without it): NaN, not an error
    orphan = ResolutionResult([{"layer": 0, "size": 16, "r2_row": 0.5, "r2_col": 0.5, "r2": 0.5}], 32, [16], 4)
    assert orphan.rows[0]["r2_retained"] != orphan.rows[0]["r2_retained"]
    assert "n/a at 16px" in orphan.summary_line()


def test_render_true_needs_a_source_that_renders(tmp_path, monkeypatch):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    with pytest.raises(asg_probe.errors.UsageError, match=r"render=True needs .* got a tensor \(10, 3, 32, 32\); "
                                                          r"pass images='scenes'"):
        resolution_transfer(model, torch.randn(10, 3, 32, 32), render=True, progress=False)
    with pytest.raises(asg_probe.errors.UsageError, match="embedded photographs"):
        resolution_transfer(model, None, render=True, progress=False)
    with pytest.raises(asg_probe.errors.UsageError, match="render must be 'auto', True or False"):
        resolution_transfer(model, "scenes", render="yes", progress=False)
    with pytest.raises(asg_probe.errors.UsageError, match="cannot be rendered at 4 px"):
        resolution_transfer(model, "scenes", sizes=[4, 32], render=True, progress=False)
    (tmp_path / "scenes").mkdir()  # a folder named scenes is read as images, as load_images does
    monkeypatch.chdir(tmp_path)
    with pytest.raises(asg_probe.errors.UsageError, match="'scenes' names a file or folder here"):
        resolution_transfer(model, "scenes", render=True, progress=False)


def test_plot_of_the_retained_fraction():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"layer": l, "size": s, "r2_row": v, "r2_col": v / 2, "r2": 0.75 * v}
            for l in (1, 2) for s, v in ((16, 0.3), (32, 0.6), (64, 0.9))]
    res = ResolutionResult(rows, 32, [16, 32, 64], 4)
    fig = res.plot(value="retained")
    ax = fig.axes[0]
    assert "retained" in ax.get_ylabel() and "retained" in ax.get_title()
    data = [line for line in ax.lines if len(line.get_xdata()) == 3]
    for line in data[:3]:  # mean, row, col of the first layer drawn
        assert list(line.get_ydata()) == pytest.approx([0.5, 1.0, 1.5])
    assert [line.get_linestyle() for line in data[:3]] == ["-", ":", "--"]
    assert {line.get_color() for line in data[:3]} == {"k"} and {line.get_color() for line in data[3:]} == {"0.55"}
    assert ax.get_ylim()[1] >= 1.5
    plt.close(fig)
    assert "R²" in res.plot().axes[0].get_ylabel()  # the default is still absolute R²
    plt.close("all")
    with pytest.raises(asg_probe.errors.UsageError, match="value must be 'r2' or 'retained'"):
        res.plot(value="fraction")


def test_cli_resolution_writes_retained_columns_and_how_sizes_were_made(tmp_path, capsys):
    import json

    import pandas as pd

    from asg_probe.cli import main

    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1, num_classes=3)
    ckpt = asg_probe.save_checkpoint(tmp_path / "tiny-ape", model)
    common = ["resolution", str(ckpt), "--images", "scenes", "--num-images", "10", "--sizes", "16", "48",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "rendered")]) == 0
    printed = capsys.readouterr().out
    assert "r2_retained" in printed and "(sizes rendered)" in printed
    table = pd.read_csv(tmp_path / "rendered" / "resolution.csv")
    assert {"r2_retained", "r2_row_retained", "r2_col_retained"} <= set(table.columns)
    assert (table.loc[table["size"] == 32, "r2_retained"] == 1.0).all()  # layer 0 (APE) and 1, both over the floor
    doc = json.loads((tmp_path / "rendered" / "resolution.json").read_text())
    assert doc["size_source"] == "rendered" and doc["provenance"]["size_source"] == "rendered"
    assert main([*common, "--resize", "--out", str(tmp_path / "resized")]) == 0
    assert "(sizes resized)" in capsys.readouterr().out
    doc = json.loads((tmp_path / "resized" / "resolution.json").read_text())
    assert doc["size_source"] == "resized" and doc["provenance"]["images"]["img_size"] == [48, 48]


def test_report_resolution_table_shows_retained_fractions():
    from asg_probe.report import SECTIONS, _table

    caption = dict((key, cap) for key, _, cap in SECTIONS)["resolution"]
    assert "fraction of the same layer's fit-size R² retained" in caption and "rendered at each size" in caption
    assert f"below {ResolutionResult.retained_floor:g}" in caption  # the floor the table applies
    rows = [{"layer": 0, "size": s, "r2_row": v, "r2_col": v, "r2": v} for s, v in ((16, 0.4), (32, 0.8))]
    table = _table(ResolutionResult(rows, 32, [16, 32], 4).to_frame())  # what the report's section shows
    assert all(f"<th>{c}</th>" in table for c in ("r2_retained", "r2_row_retained", "r2_col_retained"))
    assert "<td>0.500</td>" in table


def _rendered_transfer_on_two_ranks(rank, out):
    res = resolution_transfer(PlantedCoords("absolute"), "scenes", num_images=12, sizes=[16], progress=False,
                              batch_size=2)
    if rank == 0:
        torch.save(res.to_dict(), out)


def test_rendered_scenes_split_over_two_processes_agree_with_one(tmp_path, two_ranks):
    two_ranks(_rendered_transfer_on_two_ranks, str(tmp_path / "out.pt"))
    split = torch.load(tmp_path / "out.pt", weights_only=False)
    whole = resolution_transfer(PlantedCoords("absolute"), "scenes", num_images=12, sizes=[16],
                                progress=False).to_dict()
    assert split["size_source"] == whole["size_source"] == "rendered"
    for a, b in zip(split["layers"], whole["layers"]):
        assert a["r2"] == pytest.approx(b["r2"], abs=1e-6)
        assert a["r2_retained"] == pytest.approx(b["r2_retained"], abs=1e-6)
