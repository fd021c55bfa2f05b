"""One known answer per grid family: a coordinate planted in the pixels is read on the right axis.

Each family of README's table that is not a plain ViT (windowed, hierarchical, pooled, NHWC or
late-class-token) is built tiny with random weights (:func:`asg_probe.compat.build`) and shown
images whose pixels encode only the ROW (a vertical ramp, the same in every column) plus noise,
then only the COLUMN. At the first layer asg_probe reads (the first feature map of a grid
backbone, the patch embedding of a ViT) the probe must decode the ramped coordinate (R² > 0.75)
and not the other (R² < 0.3). A transposed grid, NHWC tokens read as NCHW, or a wrong grid or
stride swaps, mixes or scrambles the two, which a shape check does not see.

Absolute position tables are zeroed first: a random table tells the cells apart whatever the
image shows, so a probe would read the column from it; this test is about where the image's own
position lands. Zero padding in convolutions still marks the border cells (VOLO's conv stem the
most: column R² about 0.2 on a row ramp), hence the noise (0.3 per pixel), which keeps that below 0.3.
"""
import pytest
import torch

import asg_probe
from asg_probe import compat
from asg_probe.geometry import model_geometry

FAMILIES = ["Swin", "Swin V2", "Hiera", "MViTv2", "PVTv2", "Twins-SVT", "NesT", "VOLO", "CoaT-Lite",
            "MCi (FastViT)", "SAM-ViT", "ConViT"]
SIZE, NUM_IMAGES, NOISE = 64, 6, 0.3


def ramp_images(axis, seed=0):
    """``(NUM_IMAGES, 3, SIZE, SIZE)``: -1 to 1 along ``axis`` (0: down the rows, 1: across the columns),
    constant along the other, plus per-pixel noise so that the images differ."""
    ramp = torch.linspace(-1, 1, SIZE)
    plane = ramp[:, None].expand(SIZE, SIZE) if axis == 0 else ramp[None, :].expand(SIZE, SIZE)
    noise = torch.randn(NUM_IMAGES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return plane + NOISE * noise


def _model(family, tmp_path):
    (arch,) = [a for a in compat.ARCHITECTURES if a.family == family and a.source == "timm"]
    model = compat.build(arch, tmp_path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-1] in ("pos_embed", "absolute_pos_embed"):
                param.zero_()
    return model


def test_ramp_images_encode_one_axis():
    rows, cols = ramp_images(0).mean(0), ramp_images(1).mean(0)
    assert rows[0, 0].mean() < -0.8 and rows[0, -1].mean() > 0.8 and abs(rows[0, :, 0].mean()) < 0.2
    assert cols[0, :, 0].mean() < -0.8 and cols[0, :, -1].mean() > 0.8 and abs(cols[0, 0].mean()) < 0.2


@pytest.mark.parametrize("family", FAMILIES)
def test_a_planted_row_or_column_is_read_on_its_own_axis(family, tmp_path):
    model = _model(family, tmp_path)
    first = model_geometry(model).first_layer
    for axis, (ramped, other) in enumerate([("r2_row", "r2_col"), ("r2_col", "r2_row")]):
        frame = asg_probe.layerwise_probes(model, ramp_images(axis), layers=[first], n_folds=2, progress=False,
                                           n_control_seeds=1, init_baseline=False).to_frame()
        row = frame.iloc[0]
        assert row[ramped] > 0.75 and row[other] < 0.3, (family, axis, frame[["layer", "r2_row", "r2_col"]])
