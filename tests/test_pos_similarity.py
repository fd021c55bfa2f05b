"""Positional-embedding similarity: planted tables, prefix handling, sin-cos geometry, plotting."""
import pytest
import timm
import torch

import asg_probe
from asg_probe.analysis.pos_similarity import pos_similarity, position_embeddings


def _planted_vit(table):
    """A timm ViT (cls token, pos_embed covering it) whose patch position table is ``table``."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0)
    with torch.no_grad():
        model.pos_embed[0, 0] = 100.0  # the cls entry: must not leak into the patch grid
        model.pos_embed[0, 1:] = table
    return model


def test_orthogonal_table_gives_identity_and_cls_entry_is_excluded():
    table = torch.zeros(16, 192)
    table[torch.arange(16), torch.arange(16) * 3] = 2.0  # orthogonal rows, not unit length
    res = pos_similarity(_planted_vit(table))
    assert res.grid == (4, 4)
    assert torch.allclose(res.similarity, torch.eye(16), atol=1e-6)


def test_table_reads_row_major_positions():
    # embedding = (row, col, 1) in the first three dims: cos similarity known in closed form
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    table = torch.zeros(16, 192)
    table[:, 0], table[:, 1], table[:, 2] = rows.flatten(), cols.flatten(), 1.0
    emb, grid = position_embeddings(_planted_vit(table))
    assert grid == (4, 4) and emb[2, 3, :3].tolist() == [2.0, 3.0, 1.0]
    res = pos_similarity(_planted_vit(table))
    a, b = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([3.0, 3.0, 1.0])
    expected = float(a @ b / (a.norm() * b.norm()))
    assert res.similarity[0, 15].item() == pytest.approx(expected, abs=1e-6)


def test_sincos_similarity_falls_with_distance():
    res = pos_similarity(asg_probe.create_model("vit_tiny_patch4_32", pos="sincos"))
    assert torch.allclose(res.similarity.diagonal(), torch.ones(64), atol=1e-5)
    assert torch.allclose(res.similarity, res.similarity.T, atol=1e-6)
    profile = dict(res.distance_profile())
    assert profile[0.0] == pytest.approx(1.0, abs=1e-5)
    assert profile[0.0] > profile[1.0] > profile[2.0] > profile[5.0]


def test_model_without_a_table_is_a_clear_error():
    with pytest.raises(ValueError, match="ape"):
        pos_similarity(asg_probe.create_model("vit_tiny_patch4_32", pos="rope-mixed"))


def test_mosaic_and_plot_into_a_given_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = torch.randn(16, 192)
    res = pos_similarity(_planted_vit(table), label="planted")
    with pytest.warns(DeprecationWarning, match="label="):  # the old keyword still works
        assert pos_similarity(_planted_vit(table), checkpoint="planted").to_dict()["checkpoint"] == "planted"
    assert res.to_dict()["checkpoint"] == "planted"
    mosaic = res.mosaic()
    assert mosaic.shape == (4 * 5 - 1, 4 * 5 - 1)
    # tile (r, c) holds position (r, c)'s similarities; its own cell is 1
    assert mosaic[2 * 5 + 2, 1 * 5 + 1].item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(mosaic[1 * 5:1 * 5 + 4, 3 * 5:3 * 5 + 4], res.similarity[1 * 4 + 3].reshape(4, 4))
    assert torch.isnan(mosaic[4]).all()  # separator line
    fig, axes = plt.subplots(1, 2)
    assert res.plot(ax=axes[1]) is fig
    assert len(axes[1].images) == 1 and len(axes[0].images) == 0
    plt.close(fig)
