"""Attention offsets: kernels and offset R² with known answers, streaming, result contract, CLI.

Known answers: with zero query/key weights an ALiBi-2D model's logits are its distance
bias alone (offset R² 1, kernel = the bias); RoPE on identical tokens makes q·k a
function of the offset (kernel = the analytic rotation); a model without position on
i.i.d. noise has no offset structure (R² near 0, falling with more images); shuffling
patches leaves a position-free model's statistics, read in original coordinates,
exactly unchanged and changes an ``ape`` model's.
"""
import json

import numpy as np
import pytest
import torch

import asg_probe
from asg_probe.analysis.attention_offsets import (AttentionOffsetsAccumulator, AttentionOffsetsResult,
                                                  attention_offsets, offset_counts, offset_design, offset_index)
from asg_probe.capture import capture_attention
from asg_probe.layers.grid import permute_patches
from asg_probe.layers.spatial_bias import alibi2d_slopes


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation on a busy machine
    yield
    torch.set_num_threads(before)


def tiny(pos, depth=1, seed=0):
    torch.manual_seed(seed)
    return asg_probe.create_model("vit_tiny_patch4_32", pos=pos, depth=depth).eval()


def noise(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def centred(kernel, grid):
    """A (…, 2H−1, 2W−1) kernel with its count-weighted mean removed (the result's convention)."""
    c = offset_counts(grid).reshape(2 * grid[0] - 1, 2 * grid[1] - 1).numpy()
    return kernel - (kernel * c).sum((-2, -1), keepdims=True) / c.sum()


def test_offset_geometry_by_brute_force():
    grid = (2, 3)
    idx = offset_index(grid)
    cells = [(r, c) for r in range(2) for c in range(3)]
    for i, (qr, qc) in enumerate(cells):
        for j, (kr, kc) in enumerate(cells):
            assert idx[i, j] == (kr - qr + 1) * 5 + (kc - qc + 2)
    assert offset_counts(grid).sum() == 36 and offset_counts(grid)[idx[0, 0]] == 6
    g = offset_design(grid)
    assert torch.allclose(g, g.T) and torch.allclose(g @ torch.ones(15, dtype=torch.float64),
                                                     torch.zeros(15, dtype=torch.float64), atol=1e-12)


def test_alibi_with_zero_queries_and_keys_kernel_is_the_distance_bias():
    model = tiny("alibi2d", depth=2)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.zero_()   # q = k = 0 (k has no bias in Eva): logits = the bias
            block.attn.q_bias.zero_()
    res = attention_offsets(model, noise(5), progress=False, n_folds=5)
    d = torch.arange(-7, 8, dtype=torch.float64)
    bias = -alibi2d_slopes(4).double()[:, None, None] * (d[:, None] ** 2 + d[None, :] ** 2).sqrt()
    expected = centred(bias.numpy(), (8, 8))
    for layer in (1, 2):
        assert min(res.r2[layer]) >= 0.99 and min(res.r2[layer]) == pytest.approx(1.0, abs=1e-5)
        assert min(res.r2_heldout[layer]) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(res.kernels[layer], expected, atol=2e-6)
        # mean attention per offset: softmax of the bias over the patch keys, averaged over queries
        assert res.prob_kernels[layer].shape == (4, 15, 15)
    # prefix mass: the class token has bias 0 while every other key is below 0 (except self)
    assert all(0 < m < 0.5 for m in res.prefix_mass[1])
    # the control keeps a mechanism's own offset structure: shuffling changes nothing here
    shuffled = attention_offsets(model, noise(5), progress=False, shuffle_patches=True)
    np.testing.assert_allclose(shuffled.kernels[1], expected, atol=2e-6)
    assert shuffled.patches_shuffled and "patches shuffled" in shuffled.summary_line()


def test_rope_on_identical_tokens_gives_the_analytic_rotation():
    model = tiny("rope-axial")
    grid = (8, 8)
    x = torch.zeros(2, 3, 32, 32)          # every patch alike: identical tokens at every position
    res = attention_offsets(model, x, progress=False, n_folds=1)
    assert min(res.r2[1]) == pytest.approx(1.0, abs=1e-5)
    # analytic: q·k after rotating q by θ(p_i) and k by θ(p_j), pair by pair of channels
    entering = {}
    handle = model.blocks[0].register_forward_pre_hook(lambda m, a: entering.setdefault("x", a[0]))
    with torch.no_grad():
        model.forward_features(x[:1])
    handle.remove()
    attn = model.blocks[0].attn
    with torch.no_grad():
        token = model.blocks[0].norm1(entering["x"][0, 1])                     # one patch token (D,)
        qkv = torch.nn.functional.linear(token, attn.qkv.weight, torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]))
    heads, hd = attn.num_heads, token.shape[-1] // attn.num_heads
    q, k = qkv[:heads * hd].reshape(heads, hd).double(), qkv[heads * hd:2 * heads * hd].reshape(heads, hd).double()
    sin, cos = model.rope.get_embed(shape=grid).double().chunk(2, -1)          # (N, hd) each, per channel
    theta = torch.atan2(sin[:, ::2], cos[:, ::2])                               # (N, hd/2): one angle per pair
    delta = theta[None, :, :] - theta[:, None, :]                               # (query, key, pair): θ_j − θ_i
    dot = q[:, ::2] * k[:, ::2] + q[:, 1::2] * k[:, 1::2]                        # (H, pairs)
    cross = q[:, 1::2] * k[:, ::2] - q[:, ::2] * k[:, 1::2]
    logits = (dot[:, None, None] * delta.cos() + cross[:, None, None] * delta.sin()).sum(-1) * hd ** -0.5
    idx = offset_index(grid)
    kernel = torch.zeros(heads, 15 * 15, dtype=torch.float64)
    kernel[:, idx.reshape(-1)] = logits.reshape(heads, -1)                      # the logit of each offset
    for h in range(heads):  # the rotation makes q·k a function of the offset alone
        spread = [float(logits[h][idx == o].std()) for o in (0, 7, 112, 200) if int((idx == o).sum()) > 1]
        assert max(spread) < 1e-6  # float32 angles
    np.testing.assert_allclose(res.kernels[1], centred(kernel.reshape(heads, 15, 15).numpy(), grid), atol=1e-5)


def test_no_position_on_noise_has_no_offset_structure_and_falls_with_images():
    model = tiny("none")
    few = attention_offsets(model, noise(2), progress=False, n_folds=2)
    many = attention_offsets(model, noise(16, seed=1), progress=False)
    assert max(many.r2[1]) <= 0.05
    assert many.layer_r2[1] < few.layer_r2[1] / 3            # in-sample R² of pure noise shrinks ~ 1 / images
    lo, hi = many.layer_r2_heldout_ci[1]
    assert lo <= 0.005 and many.layer_r2_heldout[1] < 0.01   # nothing that generalises to other images
    # shuffling noise gives noise: the slot statistics are unchanged in expectation
    shuffled = attention_offsets(model, noise(16, seed=1), progress=False, shuffle_patches=True)
    assert abs(shuffled.layer_r2[1] - many.layer_r2[1]) < 0.01 and max(shuffled.r2[1]) <= 0.05


def _original_frame_statistics(model, images, perm=None):
    """Accumulated offset statistics of ``images`` (patch-shuffled by ``perm`` first, then the logits put
    back in the patches' original places): what a model's scores say about the *original* layout."""
    prefix = model.num_prefix_tokens
    acc = AttentionOffsetsAccumulator(prefix, n_folds=1)
    x = images if perm is None else permute_patches(images, 4, perm)
    with torch.no_grad(), capture_attention(model, logits=True) as rec:
        model.forward_features(x)
    maps = dict(rec.attn)
    if perm is not None:
        back = torch.cat([torch.arange(prefix), prefix + torch.argsort(perm)])   # original patch -> its slot
        maps = {layer: tuple(t[:, :, back][:, :, :, back] for t in value) for layer, value in maps.items()}
    acc.add(maps, (8, 8), torch.arange(len(images)))
    return acc.result()


def test_patch_shuffling_leaves_no_position_unchanged_and_changes_ape():
    images = noise(3)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    none = tiny("none", depth=2)
    a, b = _original_frame_statistics(none, images), _original_frame_statistics(none, images, perm)
    for layer in (1, 2):  # permutation-equivariant: the same scores, wherever the patches sat
        np.testing.assert_allclose(a.kernels[layer], b.kernels[layer], atol=1e-5)
        np.testing.assert_allclose(a.r2[layer], b.r2[layer], atol=1e-5)
    ape = tiny("ape", depth=2)
    with torch.no_grad():
        ape.pos_embed.normal_(0, 1.0)  # a position table that matters next to noise content
    a, b = _original_frame_statistics(ape, images), _original_frame_statistics(ape, images, perm)
    assert np.abs(a.kernels[1] - b.kernels[1]).max() > 0.05  # its scores follow the slots, not the patches


def test_timm_vit_fused_and_unfused_agree_and_batches_stream():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    x = torch.randn(4, 3, 64, 64)
    fused = attention_offsets(model, x, progress=False, n_folds=2)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False   # the attn_drop route sees probabilities only: log-probabilities
    unfused = attention_offsets(model, x, batch_size=1, progress=False, n_folds=2)
    assert fused.num_images == unfused.num_images == 4 and fused.grid == (4, 4)
    for layer in (1, 2):
        np.testing.assert_allclose(fused.kernels[layer], unfused.kernels[layer], atol=1e-4)
        np.testing.assert_allclose(fused.r2[layer], unfused.r2[layer], atol=1e-4)
        np.testing.assert_allclose(fused.r2_heldout[layer], unfused.r2_heldout[layer], atol=1e-4)


def test_hugging_face_logits_match_its_own_eager_attention():
    transformers = pytest.importorskip("transformers")
    from asg_probe.hf import HFViT

    config = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, image_size=32, patch_size=8,
                                                    num_register_tokens=4)
    hf = transformers.Dinov2WithRegistersModel(config).eval()
    model = HFViT(hf)
    x = torch.randn(3, 3, 32, 32)
    res = attention_offsets(model, x, progress=False, n_folds=1)
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        ref = hf(x, output_attentions=True).attentions
    acc = AttentionOffsetsAccumulator(5, n_folds=1)  # class + 4 registers
    acc.add({i + 1: (a, a.log()) for i, a in enumerate(ref)}, (4, 4), torch.arange(3))
    own = acc.result()
    for layer in (1, 2):
        np.testing.assert_allclose(res.kernels[layer], own.kernels[layer], atol=1e-4)
        np.testing.assert_allclose(res.prefix_mass[layer], own.prefix_mass[layer], atol=1e-5)
        assert res.prefix_logit[layer].shape == (2, 5)


def test_result_contract_files_and_reload(tmp_path):
    model = tiny("sdt-decay", depth=2)
    res = attention_offsets(model, noise(5), progress=False, label="sdt")
    doc = res.to_dict()
    assert doc["grid"] == [8, 8] and doc["provenance"]["images"]["num_images"] == 5
    assert [r["layer"] for r in doc["layers"]] == [1, 2]
    row = doc["layers"][1]
    assert {"layer", "offset_r2", "offset_r2_heldout", "offset_r2_heldout_ci", "heads"} <= set(row)
    assert [h["head"] for h in row["heads"]] == [0, 1, 2, 3]
    assert row["offset_r2"] > 0.5  # the decay's prior at initialisation dominates random logits
    frame = res.to_frame()
    assert len(frame) == 8 and list(frame.columns[:3]) == ["layer", "head", "offset_r2"]
    fig = res.plot()
    images = [a.images[0] for a in fig.axes if a.images]
    assert len(images) == 8 and len({im.get_clim() for im in images}) == 1  # one colour scale per figure
    import matplotlib.pyplot as plt

    plt.close(fig)
    paths = res.save(tmp_path)
    assert [p.name for p in paths] == ["attention_offsets.json", "attention_offsets.csv", "attention_offsets.png",
                                       "attention_offsets.npz"]
    json.loads(paths[0].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    with np.load(paths[3]) as npz:
        assert npz["kernel_2"].shape == (4, 15, 15) and list(npz["offsets_row"]) == list(range(-7, 8))
    back = AttentionOffsetsResult.load(paths[0])
    np.testing.assert_allclose(back.kernels[2], res.kernels[2])
    assert back.r2 == res.r2 and back.layer_r2_heldout_ci == res.layer_r2_heldout_ci
    assert back.provenance["images"]["num_images"] == 5
    assert "<img" in res._repr_html_()


class _TwoThreads:
    """torch.distributed's collectives for two threads standing in for two processes (spawning real
    gloo processes costs ~30 s of imports here; asg_probe.distributed's own primitives are tested
    across real processes in test_distributed.py)."""

    def __init__(self):
        import threading

        self.barrier, self.slots, self.local = threading.Barrier(2, timeout=60), [None, None], threading.local()

    def _exchange(self, obj):
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        both = list(self.slots)
        self.barrier.wait()
        return both

    def rank_world(self, group=None):
        return self.local.rank, 2

    def all_gather_object(self, obj, group=None):
        return self._exchange(obj)

    def all_reduce_sum(self, tensors, group=None):
        mine, theirs = self._exchange([t.clone() for t in tensors])
        assert [t.shape for t in mine] == [t.shape for t in theirs], "processes disagree on the tensors"
        for t, a, b in zip(tensors, mine, theirs):
            t.copy_(a + b)
        return tensors


def test_all_reduce_sums_over_processes(monkeypatch):
    import threading

    import asg_probe.distributed as distributed

    fake = _TwoThreads()
    for name in ("rank_world", "all_gather_object", "all_reduce_sum"):
        monkeypatch.setattr(distributed, name, getattr(fake, name))
    maps = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    accs, errors = [AttentionOffsetsAccumulator(1, n_folds=2) for _ in range(2)], []

    def run(rank):
        fake.local.rank = rank
        try:
            if rank == 0:  # rank 1 sees no image at all (more processes than batches)
                accs[0].add({1: (maps[:2].softmax(-1), maps[:2])}, (3, 5), torch.arange(2))
                accs[0].add({1: (maps[2:].softmax(-1), maps[2:])}, (3, 5), torch.arange(2, 4))
            accs[rank].all_reduce()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    single = AttentionOffsetsAccumulator(1, n_folds=2)
    single.add({1: (maps.softmax(-1), maps)}, (3, 5), torch.arange(4))
    expected = single.result()
    for acc in accs:
        res = acc.result()
        assert res.num_images == 4 and res.grid == (3, 5)
        np.testing.assert_allclose(res.kernels[1], expected.kernels[1], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(res.r2[1], expected.r2[1], rtol=1e-9)
        np.testing.assert_allclose(res.r2_heldout[1], expected.r2_heldout[1], rtol=1e-9)


def test_bad_arguments_fail_before_any_forward():
    from asg_probe.errors import UsageError

    model = tiny("none")
    with pytest.raises(UsageError, match="n_folds"):
        attention_offsets(model, noise(2), n_folds=0, progress=False)
    acc = AttentionOffsetsAccumulator(1)
    with pytest.raises(ValueError, match="nothing to summarise"):
        acc.result()
    masked = torch.zeros(1, 1, 5, 5)
    masked[..., 2, 3] = float("-inf")
    with pytest.raises(ValueError, match="not finite"):
        acc.add({1: (masked.softmax(-1), masked)}, (2, 2), torch.arange(1))


def test_cli_runs_on_the_bundled_sdt_decay_model(tmp_path, capsys):
    from asg_probe.cli import main

    code = main(["attention-offsets", "sdt-decay", "--num-images", "6", "--batch-size", "3", "--out", str(tmp_path),
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "offset R²" in out and "computed on: 6 images" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention_offsets.csv", "attention_offsets.json",
                                                         "attention_offsets.npz", "attention_offsets.png"]
    doc = json.loads((tmp_path / "attention_offsets.json").read_text())
    assert doc["provenance"]["command"].startswith("asg-probe attention-offsets sdt-decay")


def test_widget_shows_the_chosen_layer_and_head():
    pytest.importorskip("ipywidgets")
    from asg_probe.widgets import OffsetKernelViewer

    model = tiny("alibi2d", depth=2)
    res = attention_offsets(model, noise(3), progress=False, label="alibi2d", n_folds=1)
    viewer = OffsetKernelViewer({"alibi2d": res})
    viewer.layer.value, viewer.head.value = 1, 2
    shown = viewer.last_render["alibi2d"]
    assert viewer.last_error is None and (shown["layer"], shown["head"]) == (1, 2)
    np.testing.assert_array_equal(shown["kernel"], res.kernels[1][2])
    viewer.kind.value = "prob"
    np.testing.assert_array_equal(viewer.last_render["alibi2d"]["kernel"], res.prob_kernels[1][2])
    assert bytes(viewer._images["alibi2d"].value[:8]) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("pos,form", [("rope-mixed", "full"), ("relpos", "full"), ("sdt-decay", "decomposed")])
def test_captured_logits_are_what_the_softmax_received(pos, form):
    torch.manual_seed(0)
    kw = {"decay_form": form} if pos == "sdt-decay" else {}
    model = asg_probe.create_model("vit_tiny_patch4_32", pos=pos, depth=1, **kw).eval()
    x = noise(2)
    with torch.no_grad(), capture_attention(model) as plain:
        model.forward_features(x)
    with torch.no_grad(), capture_attention(model, logits=True) as both:
        model.forward_features(x)
    probs, logits = both.attn[1]
    torch.testing.assert_close(probs, plain.attn[1])                     # the probabilities do not change
    torch.testing.assert_close(logits.softmax(-1), probs, atol=1e-6, rtol=1e-5)
    if form == "decomposed":  # two chained passes: no single logit matrix, the log of the composed map
        assert both.calls[1] == 2
        torch.testing.assert_close(logits, probs.log())
    else:                     # the logits themselves: a query's logits are not shifted to log-probabilities
        assert not torch.allclose(logits, probs.log(), atol=1e-3)
