"""Layerwise probes and the shared extraction engine: known answers, hooks, invariances."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import asg_probe
from asg_probe.analysis.layerwise import layerwise_probes
from asg_probe.extract import capture_tokens, forward_tokens


@pytest.fixture(scope="module")
def images():
    return torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_ape_layer0_decodes_position_and_none_does_not(images):
    ape = layerwise_probes(asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2), images,
                           progress=False, init_baseline=False)
    none = layerwise_probes(asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2), images,
                            progress=False, init_baseline=False)
    # APE adds a distinct vector per slot: position is linearly decodable from layer 0
    assert ape.rows[0]["r2"] > 0.99
    # Without injection, tokens of random-noise images carry no position at any layer
    assert all(abs(r["r2"]) < 0.05 for r in none.rows)
    assert [r["layer"] for r in none.rows] == [0, 1, 2]
    d = ape.to_dict()
    assert d["grid"] == [8, 8] and d["num_images"] == 20 and d["img_size"] == [32, 32]
    assert set(d["layers"][0]) >= {"layer", "r2_row", "r2_col", "r2", "r2_control", "selectivity", "alpha"}


def test_result_does_not_depend_on_batch_size(images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="rope-axial", depth=2)
    a = layerwise_probes(model, images, batch_size=20, progress=False, init_baseline=False)
    b = layerwise_probes(model, images, batch_size=3, progress=False, init_baseline=False)
    for ra, rb in zip(a.rows, b.rows):
        assert ra["r2"] == pytest.approx(rb["r2"], abs=1e-6)


def test_cell_accuracy_and_layer_selection(images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=3)
    res = layerwise_probes(model, images, layers=[0, -1], cell_accuracy=True, progress=False,
                           init_baseline=False)
    assert [r["layer"] for r in res.rows] == [0, 3]
    assert res.rows[0]["cell_accuracy"] > 0.9  # 64 cells, chance 1/64
    with pytest.raises(ValueError, match="layers 0..3"):
        layerwise_probes(model, images, layers=[7], progress=False, init_baseline=False)


def test_too_few_images_is_a_clear_error():
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    with pytest.raises(ValueError, match="at least 5"):
        layerwise_probes(model, torch.randn(3, 3, 32, 32), progress=False, init_baseline=False)


def test_no_hook_stays_attached(images, hook_count):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2)
    before = hook_count(model)
    layerwise_probes(model, images[:6], progress=False, init_baseline=False)
    forward_tokens(model, images[:2], layers=[1])
    assert hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with capture_tokens(model, None):
            raise RuntimeError("boom")
    assert hook_count(model) == before
    with pytest.raises(ValueError):
        forward_tokens(model, images[:1], layers=[99])
    assert hook_count(model) == before


def test_stop_early_gives_the_same_tokens(images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="sdt-decay", depth=3).eval()
    early = forward_tokens(model, images[:2], layers=[1], stop_early=True)
    full = forward_tokens(model, images[:2], layers=[1], stop_early=False)
    torch.testing.assert_close(early[1], full[1], rtol=0, atol=0)


def test_result_objects_render(images, tmp_path):
    res = layerwise_probes(asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1), images[:10],
                           progress=False, label="tiny-ape")
    assert res.to_dict()["checkpoint"] == "tiny-ape"
    html = res._repr_html_()
    assert "<table" in html and "data:image/png;base64" in html
    paths = res.save(tmp_path)
    assert [p.suffix for p in paths] == [".json", ".csv", ".png"] and all(p.stat().st_size > 0 for p in paths)
    assert "last layer" in res.summary_line()


def test_the_result_keeps_each_layers_fitted_probe(images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="rope-axial", depth=2)
    res = layerwise_probes(model, images[:15], progress=False, init_baseline=False)
    tokens = forward_tokens(model.eval(), images[:15], layers=[1])[1].double()        # what the probe saw
    new = forward_tokens(model, images[15:], layers=[1])[1].double()                  # five unseen images
    probe = res.probe(1)
    row = res.rows[1]
    assert (probe.cv_r2_[0], probe.cv_r2_[1]) == (row["r2_row"], row["r2_col"])
    # the probe's control is the first seed's slot permutation; the row averages the five seeds
    r2, names = probe.cv_results_.cv_r2_, probe.cv_results_.target_names
    assert 0.5 * (probe.control_cv_r2_[0] + probe.control_cv_r2_[1]) == 0.5 * (r2[2] + r2[3])
    slot = [i for i, n in enumerate(names) if n.startswith("control_")]
    assert len(slot) == 10 and row["n_control_seeds"] == 5 and len(names) == 12   # no other control
    assert row["r2_control"] == pytest.approx(np.mean(r2[slot]), abs=1e-12)
    # every R² carries its 95% jackknife interval, around the CV estimate
    reps = res.replicates[1]
    assert row["r2_row_ci"] == asg_probe.probes.jackknife_interval(row["r2_row"], reps["row"])
    for key in ("r2", "r2_row", "r2_col", "r2_control", "selectivity"):
        lo, hi = row[f"{key}_ci"]
        assert lo < row[key] < hi
    assert res.to_dict()["interval"].startswith("95%, delete-one-fold jackknife")
    assert res.probe(-1) is res.probe(2) and res.probe(0) is not probe
    # a direct ridge (standardised features, scikit-learn) at the chosen alpha, refit on every image
    X, Xn = tokens.reshape(-1, tokens.shape[-1]).numpy(), new.reshape(-1, new.shape[-1]).numpy()
    y = asg_probe.probes.coordinate_targets(res.grid, dtype=torch.float64).repeat(15, 1).numpy()
    predicted = probe.predict(Xn)
    for col, alpha in enumerate(probe.alpha_):
        direct = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X, y[:, col])
        np.testing.assert_allclose(predicted[:, col], direct.predict(Xn), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match=r"no probe for layer 5: this result has layers \[0, 1, 2\]"):
        res.probe(5)


def test_checkpoint_is_a_deprecated_alias_of_label(images):
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    with pytest.warns(DeprecationWarning, match="pass label="):
        res = layerwise_probes(model, images[:6], layers=[1], progress=False, checkpoint="old",
                               init_baseline=False)
    assert res.checkpoint == "old" and res.to_dict()["checkpoint"] == "old"


def test_near_perfect_layer0_fit_stays_at_most_one_by_default():
    """Layer 0 of an APE model decodes the slot from the learned table: R² just below 1, ill-conditioned.

    The float32 Gram path reads 1.00001 here (3e-4 off); the float64 default must not exceed 1."""
    torch.manual_seed(0)
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    row = layerwise_probes(model, torch.randn(20, 3, 32, 32), layers=[0], progress=False,
                           init_baseline=False).rows[0]
    assert 0.999 < row["r2_row"] <= 1.0 and 0.999 < row["r2_col"] <= 1.0
    # at the default grid's floor (1e-3), or below it where the grid was extended; flagged if on an edge
    assert row["alpha_row"] <= 1e-3 and row["alpha_col"] <= 1e-3 and isinstance(row["alpha_at_edge"], bool)


def test_the_probe_accumulators_follow_the_accumulator_protocol(images):
    from asg_probe.analysis.layerwise import CellAccuracyAccumulator, LayerwiseAccumulator, LayerwiseResult
    from asg_probe.analysis.shuffle import ShuffleAccumulator
    from asg_probe.extract import Accumulator, run_analyses

    layerwise, shuffled = LayerwiseAccumulator(), ShuffleAccumulator(shuffle_seed=3)
    assert (layerwise.view, layerwise.attention, shuffled.view, shuffled.shuffle_seed) == ("original", None,
                                                                                          "shuffled", 3)
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    batches = [(images[:6], torch.arange(6)), (images[6:10], torch.arange(6, 10))]
    returned = run_analyses(model, batches, [layerwise, shuffled], progress=False)
    assert returned[0] is layerwise and returned[1] is shuffled  # handed back, merged, not finalised
    cells = CellAccuracyAccumulator(layerwise.fitted(), layerwise.grid)
    assert all(isinstance(a, Accumulator) for a in (layerwise, shuffled, cells))
    result = LayerwiseResult.from_accumulator(layerwise, label="x")
    assert result.num_images == 10 and np.array_equal(result.probe(1).coef_, layerwise.fitted()[1].coef_)
    assert not hasattr(result.probe(1), "stats_")  # results keep the solved probe, not its D x D sums


# --------------------------------------------------------------------------- the slot control

def _control_rows(tokens, images, batches, seeds=3, patch=2, grid=(4, 4)):
    """Layerwise rows of planted layer-0 ``tokens`` (n, N, D) for ``images``, streamed in ``batches``."""
    from asg_probe.analysis.layerwise import LayerwiseAccumulator, LayerwiseResult
    from asg_probe.extract import ForwardBatch

    acc = LayerwiseAccumulator(n_folds=4, n_control_seeds=seeds)
    for idx in batches:
        idx = torch.as_tensor(idx)
        acc.update(ForwardBatch(tokens={0: tokens[idx]}, grid=grid, image_index=idx, images=images[idx],
                                num_prefix_tokens=0, patch_size=patch))
    return LayerwiseResult.from_accumulator(acc).rows[0]


def _patchwise(colours, patch=2):
    """Images (n, 3, gh * patch, gw * patch) whose patch (i, j) is the uniform colour ``colours[:, i, j]``."""
    return colours.permute(0, 3, 1, 2).repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def test_the_controls_do_not_depend_on_batch_order_or_size():
    g = torch.Generator().manual_seed(1)
    n = 24
    images = _patchwise(torch.randn(n, 4, 4, 3, generator=g))
    tokens = torch.randn(n, 16, 8, generator=g, dtype=torch.float64) + torch.randn(16, 8, generator=g,
                                                                                  dtype=torch.float64)
    a = _control_rows(tokens, images, [range(n)])
    order = torch.randperm(n, generator=g)
    b = _control_rows(tokens, images, [order[:5], order[5:17], order[17:]])
    assert a.keys() == b.keys()
    for key in ("r2", "r2_control", "r2_control_std", "compression_row", "compression_col"):
        assert a[key] == pytest.approx(b[key], abs=1e-9)
    for key in ("r2_ci", "r2_control_ci"):
        assert a[key] == pytest.approx(b[key], abs=1e-9)


def test_one_control_seed_is_the_plain_probe():
    """n_control_seeds=1: the columns of a plain CoordinateProbe on the same tokens."""
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    res = layerwise_probes(model, images, layers=[1], n_control_seeds=1, progress=False, init_baseline=False)
    tokens = forward_tokens(model.eval(), images, layers=[1])[1]
    plain = asg_probe.probes.CoordinateProbe(n_folds=5).fit(tokens, grid=(8, 8))
    row = res.rows[0]
    assert row["r2_control_std"] == 0.0
    assert row["r2"] == pytest.approx(plain.cv_r2_.mean(), abs=1e-9)
    assert row["r2_control"] == pytest.approx(plain.control_cv_r2_.mean(), abs=1e-9)


def test_post_norm_tokens_are_the_final_norm_of_each_layer_and_the_last_is_forward_features(images):
    from asg_probe.probes import final_norm

    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1).eval()
    post = layerwise_probes(model, images[:10], tokens="post_norm", n_control_seeds=1,
                            progress=False, init_baseline=False)
    pre = layerwise_probes(model, images[:10], n_control_seeds=1, progress=False, init_baseline=False)
    with torch.no_grad():
        last = model.forward_features(images[:10])[:, model.num_prefix_tokens:]
    plain = asg_probe.probes.CoordinateProbe(n_folds=5).fit(last.double(), grid=(8, 8))
    assert post.rows[1]["r2"] == pytest.approx(plain.cv_r2_.mean(), abs=1e-6)
    assert abs(pre.rows[1]["r2"] - post.rows[1]["r2"]) > 1e-4      # the norm changes what a linear probe reads
    with pytest.raises(ValueError, match="tokens must be one of pre_norm, post_norm; got 'final'"):
        final_norm(model, "final")
