"""The HTML report: every analysis, several models side by side, one file."""
import json
import re

import torch

import asg_probe
from asg_probe.report import build_report


def test_report_has_every_section_for_every_model(tmp_path):
    models = [(asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2), "ape"),
              (asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2), "none")]
    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    path = build_report(models, tmp_path, images=images, progress=False)
    page = path.read_text()
    for title in ("Layerwise coordinate probes", "Mean attention distance", "Token-position embeddings",
                  "Content or injection?", "Equivariance certificate", "Position-embedding similarity",
                  "Resolution transfer", "All models"):
        assert title in page, title
    assert page.count("data:image/png;base64") >= 13  # 6 per model + ape's PE grid + comparison
    assert "CERTIFIED equivariant" in page and "NOT equivariant" in page
    # the PE similarity section exists for ape only
    section = page.split("Position-embedding similarity")[1].split("<h2>")[0]
    assert "<h3>ape</h3>" in section and "<h3>none</h3>" not in section
    doc = json.loads((tmp_path / "ape.layerwise.json").read_text())
    assert doc["layers"][0]["r2"] > 0.99
    assert not re.search(r"<script", page)  # a static page: nothing to execute
