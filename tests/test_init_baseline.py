"""The random-initialisation baseline: fresh weights of the same architecture (asg_probe.reinit, r2_init)."""
import numpy as np
import pytest
import torch
from scipy.stats import t as student_t

import asg_probe
from asg_probe.reinit import reinitialised


def _changed(a, b):
    return {n for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()) if not torch.equal(p, q)}


@pytest.mark.parametrize("build", ["ours", "timm"])
def test_every_weight_is_redrawn_seeded_and_the_original_is_untouched(build):
    import timm

    torch.manual_seed(0)
    if build == "ours":
        model = asg_probe.create_model("vit_tiny_patch4_32", pos="rope-mixed", depth=1)
    else:
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    state = torch.random.get_rng_state()
    a, b, c = reinitialised(model, 1), reinitialised(model, 1), reinitialised(model, 2)
    assert torch.equal(torch.random.get_rng_state(), state)                 # the caller's random stream
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not _changed(a, b)                                                # seeded
    varying = {n for n, p in model.named_parameters() if p.numel() > 1 and bool(p.std() > 0)}
    assert varying and varying <= _changed(model, a) and varying <= _changed(a, c)
    for (name, buf), (_, fresh) in zip(model.named_buffers(), a.named_buffers()):
        assert torch.equal(buf, fresh), name                                 # fixed tables are architecture


def test_hugging_face_models_are_reinitialised_by_their_own_init():
    transformers = pytest.importorskip("transformers")
    from asg_probe.hf import HFViT

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    model = HFViT(transformers.ViTModel(config).eval())
    fresh = reinitialised(model, 0)
    varying = {n for n, p in model.named_parameters() if p.numel() > 1 and bool(p.std() > 0)}
    assert varying <= _changed(model, fresh)
    assert fresh.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 17, 32)


def test_a_randomly_initialised_model_scores_its_own_init_baseline():
    """A model straight from its constructor is one more draw of the init distribution: its r2 lies in the
    99% prediction interval of the init seeds, r2_init ± t(0.995, S - 1) sd sqrt(1 + 1/S), at every layer."""
    torch.manual_seed(3)
    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = asg_probe.layerwise_probes(model, images, n_init_seeds=4, n_control_seeds=1, progress=False)
    for row in res.rows:
        S = row["n_init_seeds"]
        half = student_t.ppf(0.995, S - 1) * row["r2_init_std"] * np.sqrt(1 + 1 / S)
        assert abs(row["r2"] - row["r2_init"]) <= max(half, 1e-3), row["layer"]
        assert row["r2_gain"] == pytest.approx(row["r2"] - row["r2_init"])
        lo, hi = row["r2_col_gain_ci"]
        assert lo < row["r2_col_gain"] < hi
    assert res.rows[1]["r2_init_std"] > 0 and res.to_dict()["init_seeds"] == [0, 1, 2, 3]
    assert "r2_init" in res.to_frame().columns and "random init" in res.summary_line()


def test_the_guided_models_column_is_learned_and_its_row_is_partly_given():
    """Bundled guidance: the column is learned (gain interval above 0); the scenes' row is decodable at init."""
    from asg_probe.scenes import SceneDataset

    images = SceneDataset(20, split="val").images()
    res = asg_probe.layerwise_probes(asg_probe.load_reference_model("guidance"), images, layers=[-1],
                                     n_control_seeds=1, n_init_seeds=2, progress=False)
    row = res.rows[0]
    assert row["r2_col_gain_ci"][0] > 0.2 and row["r2_col_init"] < 0.2
    assert row["r2_row_init"] > 0.3
