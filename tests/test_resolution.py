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
