"""The widgets driven from Python: set a control, check what the panels now draw.

Known answers: an ``ape`` model's layer-0 tokens hold their position (probe arrows
are short) while a ``none`` model's do not; zero q/k weights give uniform
attention (every patch 1/N after removing the class token); a random model's
attention equals softmax(q kᵀ/√d) recomputed by hand from the block's weights;
head and query changes never rerun the model.
"""
import numpy as np
import pytest
import torch

import asg_probe
from asg_probe.widgets import MEAN_HEAD, ComparisonExplorer, LayerSlider, ModelView
from asg_probe.widgets.explorer import scaled_cell

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    # The matrices here are 128 wide: threads only add synchronisation, and on a busy
    # 2-core machine a threaded 128x128 eigh can take 100x longer than a serial one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(pos="none", depth=2, seed=0):
    torch.manual_seed(seed)
    return asg_probe.create_model("vit_tiny_patch4_32", pos=pos, depth=depth).eval()


def noise_images(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


class ForwardCounter:
    """Counts forward passes of a model (each one embeds patches exactly once)."""

    def __init__(self, model):
        from asg_probe.geometry import model_geometry

        model_geometry(model)  # measured once per model (one blank image), before counting the widgets' passes
        self.calls = 0
        self.handle = model.patch_embed.register_forward_pre_hook(self._hit)

    def _hit(self, module, args):
        self.calls += 1


def explorer(models, **kw):
    kw.setdefault("images", noise_images())
    kw.setdefault("embedding", "pca")  # UMAP's numba compilation alone takes ~20 s: see the slow test
    ex = ComparisonExplorer(models, **kw)
    assert ex.last_error is None, ex.last_error
    return ex


def test_ape_layer0_arrows_short_none_long():
    ex = explorer({"none": tiny("none"), "ape": tiny("ape")}, layer=2)
    before = ex.last_render["ape"]["pred"].copy()
    ex.layer.value = 0
    assert ex.last_error is None
    ape, none = ex.last_render["ape"], ex.last_render["none"]
    assert ape["layer"] == 0 and not np.allclose(before, ape["pred"])
    arrows = np.linalg.norm(ape["pred"] - ape["true"], axis=1)   # in cells
    assert ape["r2"] > 0.95 and arrows.max() < 0.5
    # without injected position, layer 0 is content only: predictions pile up near the centre
    assert none["r2"] < 0.3
    assert np.linalg.norm(none["pred"] - none["true"], axis=1).mean() > 1.5
    assert np.linalg.norm(none["pred"] - none["pred"].mean(0), axis=1).mean() < 1.5
    # layer 0 has no attention: the panel says so instead of drawing a map
    assert ape["attention"] is None
    assert bytes(ex.panel("ape", "attention").value).startswith(PNG_MAGIC)
    # the true cells are the row-major grid
    assert ape["true"][9].tolist() == [1.0, 1.0] and ape["true"].shape == (64, 2)


def test_zero_qk_gives_flat_attention():
    model = tiny("none")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.zero_()
            block.attn.q_bias.zero_()  # k_bias is a zero buffer; v is irrelevant to the map
    ex = explorer({"flat": model}, layer=1, head=0)
    for head, row, col, layer in [(0, 4, 4, 1), (3, 0, 7, 1), (MEAN_HEAD, 7, 0, 2)]:
        ex.head.value, ex.row.value, ex.col.value, ex.layer.value = head, row, col, layer
        out = ex.last_render["flat"]
        assert out["attention"].shape == (8, 8)
        np.testing.assert_allclose(out["attention"], 1 / 64, rtol=1e-5)
        assert out["query"] == row * 8 + col


def manual_attention(model, image):
    """softmax(q kᵀ / √d) of block 1 from its own weights, patches only, renormalised: (H, N, N)."""
    seen = {}
    handle = model.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            model.forward_features(image)
    finally:
        handle.remove()
    attn, x = model.blocks[0].attn, seen["x"]
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    B, N, C = x.shape
    q, k, _ = torch.nn.functional.linear(x, attn.qkv.weight, bias).reshape(B, N, 3, attn.num_heads, -1) \
        .permute(2, 0, 3, 1, 4).unbind(0)
    a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)[0, :, 1:, 1:]
    return (a / a.sum(-1, keepdim=True)).detach()


def test_head_changes_map_and_matches_manual_softmax():
    images = noise_images()
    model = tiny("ape")
    ex = explorer({"ape": model}, images=images, layer=1, head=0, query=(2, 5), image_index=3)
    expected = manual_attention(model, ModelView(model, images, embedding="pca").inputs[3:4])
    maps = {}
    for head in range(4):
        ex.head.value = head
        maps[head] = ex.last_render["ape"]["attention"].copy()
        np.testing.assert_allclose(maps[head].ravel(), expected[head, 2 * 8 + 5].numpy(), atol=1e-5)
    assert not np.allclose(maps[0], maps[1]) and not np.allclose(maps[1], maps[2])
    ex.head.value = MEAN_HEAD
    np.testing.assert_allclose(ex.last_render["ape"]["attention"], np.mean([maps[h] for h in maps], 0),
                               atol=1e-6)
    assert ex.last_render["ape"]["attention"].sum() == pytest.approx(1.0, abs=1e-5)


def test_head_patch_changes_use_the_cache():
    models = {"none": tiny("none"), "ape": tiny("ape", seed=1)}
    counters = {k: ForwardCounter(m) for k, m in models.items()}
    ex = explorer(models, layer=1)
    after_build = {k: c.calls for k, c in counters.items()}
    assert after_build == {"none": 2, "ape": 2}     # tokens of all images + attention of image 0
    drawn = dict(ex.render_counts)
    for value in (0, 1, 2, MEAN_HEAD):
        ex.head.value = value
    # a head only concerns the attention panel: probe and embedding panels are not redrawn
    assert ex.render_counts[("ape", "field")] == drawn[("ape", "field")]
    assert ex.render_counts[("ape", "embedding")] == drawn[("ape", "embedding")]
    assert ex.render_counts[("ape", "attention")] == drawn[("ape", "attention")] + 4
    ex.row.value, ex.col.value = 0, 7
    assert ex.last_render["ape"]["query"] == 7
    assert ex.last_render["ape"]["embedding_query"] is not None
    ex.layer.value = 2                                # a new layer: new probe and embedding, same tokens
    ex.layer.value = 1
    assert {k: c.calls for k, c in counters.items()} == after_build
    ex.image.value = 4                                # a new image: one pass for its attention, once
    ex.image.value = 0
    ex.image.value = 4
    assert {k: c.calls for k, c in counters.items()} == {"none": 3, "ape": 3}
    assert ex.views["ape"].forward_count == 3
    assert ex.last_timing is not None and ex.last_error is None
    torch.set_num_threads(2)                          # serial solves hand the session's threads back
    ex.layer.value = 0
    assert torch.get_num_threads() == 2


def test_query_moves_and_image_changes_predictions():
    ex = explorer({"ape": tiny("ape")}, layer=2)
    ex.row.value, ex.col.value = 6, 1
    out = ex.last_render["ape"]
    assert out["query_cell"] == (6, 1) and out["query"] == 49
    emb_row = out["embedding_query"]
    view = ex.views["ape"]
    emb = view.embedding(2)
    assert emb.image[emb_row] == 0 and emb.patch[emb_row] == 49
    pred0 = out["pred"].copy()
    ex.image.value = 2
    np.testing.assert_allclose(ex.last_render["ape"]["pred"], view.probe(2).predictions[2])
    assert not np.allclose(pred0, ex.last_render["ape"]["pred"])
    fit = view.probe(2)   # the score is shown with its interval and image count, and the MDL compression kept
    lo, hi = fit.r2_ci
    assert lo < fit.r2 < hi and fit.label().endswith(f"], {view.num_images} images")
    assert fit.compression.shape == (2,) and np.all(fit.compression > 0)


def test_model_selection_shows_columns():
    ex = explorer([tiny("none"), tiny("ape"), tiny("ape", seed=3)])
    assert list(ex.views) == ["none", "ape", "ape (2)"]
    assert len(ex.columns.children) == 3
    ex.models.value = ("ape (2)",)
    assert len(ex.columns.children) == 1 and list(ex.last_render) == ["ape (2)"]
    ex.models.value = ("none", "ape")
    assert sorted(ex.last_render) == ["ape", "none"]
    assert ex._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]["model_id"] == ex.widget.model_id


def test_shallower_model_and_grid_mapping():
    ex = explorer({"deep": tiny("ape", depth=2), "shallow": tiny("ape", depth=1)}, layer=1)
    assert ex.layer.max == 2
    ex.layer.value = 2
    assert ex.last_error is None
    assert ex.last_render["shallow"]["attention"] is None and ex.last_render["shallow"]["pred"] is None
    assert ex.last_render["deep"]["attention"] is not None
    # one pair of query sliders for every grid: same relative place on each
    assert scaled_cell(7, 0, (4, 4), (8, 8)) == (3, 0)
    assert scaled_cell(7, 7, (8, 8), (8, 8)) == (7, 7)
    assert scaled_cell(0, 3, (1, 1), (8, 8)) == (0, 0)


def test_errors_are_reported_not_raised():
    ex = explorer({"ape": tiny("ape")})
    ex.views["ape"].probe = lambda layer: (_ for _ in ()).throw(RuntimeError("probe broke"))
    ex.layer.value = 1
    assert isinstance(ex.last_error, RuntimeError) and "probe broke" in ex.status.value
    with pytest.raises(ValueError, match="embedding must be"):
        ModelView(tiny(), noise_images(), embedding="tsne")
    view = ModelView(tiny(), noise_images(), embedding="pca")
    with pytest.raises(ValueError, match="no attention"):
        view.attention(0, image=0)
    with pytest.raises(ValueError, match="layers 0..2"):
        view.probe(3)
    with pytest.raises(ValueError, match="multiple of the patch"):
        ModelView(tiny(), noise_images(size=30))


def test_layer_slider_animates_probe_fields():
    models = {"none": tiny("none"), "ape": tiny("ape")}
    ls = LayerSlider(models, images=noise_images())
    assert ls.last_error is None
    assert {k: v.shape for k, v in ls.r2_curves.items()} == {"none": (3,), "ape": (3,)}
    assert ls.r2_curves["ape"][0] > 0.95 and ls.r2_curves["none"][0] < 0.3
    ape = ls.last_render["ape"]
    assert ape["layer"] == 0 and np.linalg.norm(ape["pred"] - ape["true"], axis=1).max() < 0.5
    ls.play.value = 2                                   # the play button drives the slider
    assert ls.layer.value == 2 and ls.last_render["none"]["layer"] == 2
    assert ls.last_render["ape"]["r2"] == pytest.approx(ls.r2_curves["ape"][2])
    frames = len(ls._frames)
    ls.layer.value = 0
    ls.layer.value = 2
    assert len(ls._frames) == frames                    # replays reuse drawn frames
    assert bytes(ls.curve.value).startswith(PNG_MAGIC)
    one = LayerSlider(models, images=noise_images(), image_index=1, layer=1)
    np.testing.assert_allclose(one.last_render["ape"]["pred"], one.views["ape"].probe(1).predictions[1])


def test_widgets_import_umap_only_when_laying_out():
    # Module-level imports only (a subprocess import of torch would cost seconds): umap and
    # numba are imported inside the function that lays out tokens, nowhere else.
    import ast
    from pathlib import Path

    import asg_probe.widgets as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and not n.level}
        assert not names & {"umap", "numba", "pynndescent"}, path.name


@pytest.mark.slow
def test_umap_embedding_layout():
    view = ModelView(tiny("ape"), noise_images(n=5), embedding="umap", max_embed_tokens=5 * 64)
    emb = view.embedding(0)
    assert emb.method == "umap" and emb.xy.shape == (5 * 64, 2) and np.isfinite(emb.xy).all()
    assert emb.index_of(4, 63) == 5 * 64 - 1 and emb.index_of(5, 0) is None
    assert view.embedding(0) is emb                     # cached


def test_rows_orientation_and_stable_boxes():
    ex = explorer({"none": tiny("none"), "ape": tiny("ape")}, orientation="rows")
    boxes = ex.columns.children
    assert len(boxes) == 2 and all(len(box.children[1].children) == 3 for box in boxes)
    ex.head.value = 1
    assert ex.columns.children == boxes                 # same widgets, not rebuilt on every change
    with pytest.raises(ValueError, match="orientation"):
        ComparisonExplorer({"none": tiny("none")}, images=noise_images(), orientation="diagonal")


def test_manhattan_decay_map_with_zero_qk():
    # With q = k = 0 the RMT block's logits are its bias alone, log γ_h · (|Δrow| + |Δcol|),
    # so among patches the map is γ_h^distance, normalised (γ = 0.75, 0.875, ... for 4 heads).
    model = tiny("rmt-decay", depth=1)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.zero_()
        model.blocks[0].attn.q_bias.zero_()
    ex = explorer({"rmt": model}, layer=1, head=1, query=(3, 5))
    rows, cols = np.divmod(np.arange(64), 8)
    expected = 0.875 ** (np.abs(rows - 3) + np.abs(cols - 5))
    np.testing.assert_allclose(ex.last_render["rmt"]["attention"].ravel(), expected / expected.sum(), rtol=1e-4)
    ex.head.value = 0
    assert ex.last_render["rmt"]["attention"][3, 5] > ex.last_render["rmt"]["attention"][3, 6] * 1.3  # γ = 0.75
