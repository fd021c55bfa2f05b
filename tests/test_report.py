"""The HTML report: contents, summary and provenance first, every analysis, several models side by side, one file."""
import json
import re

import pandas as pd
import pytest
import torch

import asg_probe
from asg_probe.report import build_report, number


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    ape = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=2)
    ape.asg_meta = {"checkpoint": "runs/ape/seed0/model.safetensors", "checkpoint_format": "asg_probe",
                    "model": {"name": "vit_tiny_patch4_32", "pos": "ape"}, "metrics": {"top1": 0.625},
                    "train": {"command": "asg-train --config cpu_scenes_ape.yaml seed=0"},
                    "config": {"task": "classification", "max_steps": 600, "batch_size": 64,
                               "optim": {"lr": 1e-3, "weight_decay": 0.05}}}
    models = [(ape, "ape"), (asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2), "none+guidance")]
    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    path = build_report(models, out, images=images, progress=False, command="asg-probe report ape none")
    return out, path.read_text()


def test_report_has_every_section_for_every_model(report):
    out, page = report
    for title in ("Layerwise coordinate probes", "Mean attention distance", "Token-position embeddings",
                  "Content or injection?", "Equivariance certificate", "Position-embedding similarity",
                  "Resolution transfer", "All models"):
        assert title in page, title
    assert page.count("data:image/png;base64") >= 13  # 6 per model + ape's PE grid + comparison
    assert "CERTIFIED equivariant" in page and "NOT equivariant" in page
    # the PE similarity section exists for ape only; "none+guidance" is shown under its display name
    section = page.split("<h2 id='pos-similarity'>")[1].split("<h2")[0]
    assert "<h3>ape</h3>" in section and "<h3>guidance</h3>" not in section
    assert "none+guidance" not in page.split("<h2 id='summary'>")[1].split("<h2")[0]
    doc = json.loads((out / "ape.layerwise.json").read_text())
    assert doc["layers"][0]["r2"] > 0.99
    assert doc["provenance"]["command"] == "asg-probe report ape none"
    assert not re.search(r"<script", page)  # a static page: nothing to execute
    offsets = json.loads((out / "ape.attention_offsets.json").read_text())  # the same pass: kernels beside it
    assert "Position in attention scores" in page and (out / offsets["kernels_file"]).exists()


def test_report_opens_with_contents_summary_and_provenance_before_any_figure(report):
    _, page = report
    first_figure = page.index("<img")
    for text in ("Provenance", "asg_probe", asg_probe.__version__, "asg-probe report ape none",
                 "asg-train --config cpu_scenes_ape.yaml seed=0", "max steps 600", "lr 0.001", "0.625",
                 "10 images", "32x32 px", "Summary", "summary.csv", "Reading the verdicts together"):
        assert -1 < page.index(text) < first_figure, text
    # the contents come first and link every section, in page order
    toc = page.split("<nav class='toc'>")[1].split("</nav>")[0]
    assert page.index("<nav class='toc'>") < page.index("<h2")
    anchors = re.findall(r"href='#([\w-]+)'", toc)
    assert anchors == re.findall(r"<h2 id='([\w-]+)'>", page)
    assert anchors[:3] == ["summary", "verdicts", "provenance"] and "layerwise" in anchors


def test_verdicts_are_read_side_by_side(report):
    _, page = report
    readings = page.split("<h2 id='verdicts'>")[1].split("<h2")[0]
    # ape injects and its slot is readable; the none model is certified: each gets its own reading
    assert "<b>ape</b>: position is injected" in readings
    assert "<b>guidance</b>: no positional injection" in readings  # random weights: certified, little position
    from asg_probe.report import reading_of_verdicts

    frame = pd.DataFrame([{"model": "sdt-decay", "shuffle_test": "content", "equivariance": "not equivariant"},
                          {"model": "odd", "shuffle_test": "injected", "equivariance": "certified"}])
    sdt, odd = (text for _, text in reading_of_verdicts(frame))
    assert "distance decay" in sdt and "different questions" in sdt
    assert "not expected" in odd  # an impossible pair is flagged, not explained away


def test_paths_are_portable_and_figures_have_their_caption_as_alt_text(report):
    from asg_probe.report import _portable_command, _portable_path

    _, page = report
    assert "<img width=" in page and " alt='figure'" not in page
    alts = re.findall(r"<img width='\d+' alt='([^']*)'", page)
    assert len(alts) == page.count("<img") and all(len(a) > 40 for a in alts)
    assert any(a.startswith("Layerwise coordinate probes, ape: Held-out R²") for a in alts)
    command = "asg-train --config /home/u/repo/train/configs/cpu_scenes_guidance.yaml out=/scratch/u/runs/g seed=0"
    assert _portable_command(command) == "asg-train --config cpu_scenes_guidance out=…/runs/g seed=0"
    from asg_probe.reference import reference_path

    assert _portable_path(reference_path("guidance")) == "bundled: guidance"


def test_summary_csv_holds_the_last_layer_numbers_of_each_result(report):
    out, page = report
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["model"]) == ["ape", "guidance"]
    for name, model in (("ape", "ape"), ("none_guidance", "guidance")):  # file names: "+" becomes "_"
        last = json.loads((out / f"{name}.layerwise.json").read_text())["layers"][-1]
        row = summary[summary["model"] == model].iloc[0]
        for column in ("r2_row", "r2_col", "r2_control", "selectivity", "r2_col_init", "r2_col_gain",
                       "compression_row", "compression_col"):
            assert row[column] == pytest.approx(last[column], abs=1e-12), (name, column)
        assert [row["r2_col_gain_low"], row["r2_col_gain_high"]] == pytest.approx(last["r2_col_gain_ci"], abs=1e-12)
        assert row["num_images"] == 10
        assert row["layer"] == last["layer"] == 2
        heads = json.loads((out / f"{name}.attention_distance.json").read_text())["layers"][-1]
        assert row["attention_distance_px"] == pytest.approx(sum(heads["heads_px"]) / len(heads["heads_px"]))
        shuffle = json.loads((out / f"{name}.shuffle_test.json").read_text())["layers"][-1]
        assert row["shuffle_test"] == shuffle["source"]
    assert list(summary["equivariance"]) == ["not equivariant", "certified"]
    assert summary["top1"].iloc[0] == 0.625 and pd.isna(summary["top1"].iloc[1])
    # the HTML summary shows the same numbers, three decimals
    table = page.split("<h2 id='summary'>")[1].split("</table>")[0]
    ape = summary.iloc[0]
    assert "R² col at random init" in table and "compression col (MDL)" in table and "content control" not in table
    for column in ("r2_row", "selectivity", "r2_col_gain"):  # the value, then its interval and the image count
        assert re.search(f"<td>{re.escape(number(float(ape[column]), tiny=False))} \\[[^]]+\\] \\(10 images\\)</td>",
                         table), column


def test_report_figures_at_natural_width_and_captions_match(report):
    _, page = report
    widths = [int(w) for w in re.findall(r"<img width='(\d+)'", page)]
    assert len(widths) == page.count("<img") and min(widths) > 200
    assert "max-width:620px" not in page  # no cell squeezes a figure
    assert "-0.000" not in page
    layerwise = page.split("<h2 id='layerwise'>")[1].split("<h2")[0]
    # the caption names every line the per-model plot draws, with its style, read off the figure
    assert "Lines drawn: row (solid), col (solid), mean (solid), slot control (dashed)" in layerwise
    assert "that model&#x27;s slot control (r2_control" in page.split("<h2 id='all-models'>")[1].split("<h2")[0] \
        or "that model's slot control (r2_control" in page.split("<h2 id='all-models'>")[1].split("<h2")[0]
    assert "<details open>" not in page and "<details>" in page  # raw tables folded
    assert page.count("<div class='scroll'>") >= page.count("<table")  # every table in its scrolling box
    embeddings = page.split("<h2 id='embeddings'>")[1].split("<h2")[0]
    assert "position score: the Pearson correlation" in embeddings
    assert "images shown beside them" in layerwise  # the caption says what the intervals cover


def test_number_formats_for_tables():
    assert number(-0.0004) == "0.000" and number(-0.2) == "-0.200"
    assert number(1e6) == "1.0e+06" and number(2.5e-7) == "2.5e-07"
    assert number(float("nan")) == "nan" and number(3) == "3" and number("injected") == "injected"


def test_report_of_a_run_directory_with_snapshots_adds_the_emergence_section(tmp_path):
    run = tmp_path / "run"
    for step in (0, 5):
        model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1, num_classes=2)
        asg_probe.save_checkpoint(run / "snapshots" / f"step_{step:07d}.safetensors", model, step=step)
    asg_probe.save_checkpoint(run / "model.safetensors", model)
    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    path = build_report([(asg_probe.load_checkpoint(run), str(run))], tmp_path / "out", images=images,
                        progress=False, with_resolution=False)
    page = path.read_text()
    assert "<h2 id='emergence'>Emergence during training</h2>" in page and "href='#emergence'" in page
    doc = json.loads((tmp_path / "out" / "emergence.json").read_text())
    assert doc["runs"][0]["steps"] == [0, 5]


def test_report_command_prints_the_summary_table_and_writes_it_as_csv(tmp_path, capsys):
    from asg_probe.cli import main

    model = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1, num_classes=2)
    checkpoint = asg_probe.save_checkpoint(tmp_path / "ape-small.safetensors", model)
    out = tmp_path / "out"
    out.mkdir()  # as a previous report of another model left it, plus a file of the user's (issue 23)
    (out / "old.layerwise.json").write_text("{}")
    (out / ".asg-probe-report.files").write_text("old.layerwise.json\n")
    (out / "mine.layerwise.json").write_text("the user's")
    assert main(["report", str(checkpoint), "--num-images", "10", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "computed on: 10 images from embedded photographs" in printed  # like every command
    assert not (out / "old.layerwise.json").exists() and (out / "mine.layerwise.json").read_text() == "the user's"
    summary = pd.read_csv(out / "summary.csv")
    last = json.loads((out / "ape-small.safetensors.layerwise.json").read_text())["layers"][-1]
    assert summary["r2_row"].iloc[0] == pytest.approx(last["r2_row"], abs=1e-12)
    header = printed.splitlines()[0].split()
    assert header[:5] == ["model", "layer", "r2_row", "r2_col", "r2_control"]  # no top-1: not stored
    assert number(last["r2_row"]) in printed and "summary.csv" in printed
    page = (out / "report.html").read_text()
    assert "asg-probe report " in page  # the command, in the provenance
    assert str(tmp_path) not in page  # paths of this machine shortened
    assert "computed on: 10 images" in printed  # what every command prints


def test_summary_carries_the_fold_intervals_a_layerwise_result_has():
    from asg_probe.analysis.layerwise import LayerwiseResult
    from asg_probe.report import _summary_html, summary_frame

    rows = [{"layer": 0, "r2_row": 0.5, "r2_col": 0.4, "r2": 0.45, "r2_control": 0.0, "selectivity": 0.45},
            {"layer": 1, "r2_row": 0.9, "r2_col": -0.0001, "r2": 0.45, "r2_control": 0.01, "selectivity": 0.44,
             "r2_row_ci": [0.85, 0.95], "r2_col_ci": [float("nan"), float("nan")]}]
    frame = summary_frame({"ape": {"layerwise": LayerwiseResult(rows, (8, 8), 10)}})
    assert list(frame.columns) == ["model", "layer", "r2_row", "r2_col", "r2_control", "selectivity", "num_images",
                                   "r2_row_low", "r2_row_high", "r2_col_low", "r2_col_high"]
    assert frame.iloc[0][["r2_row", "r2_row_low", "r2_row_high"]].tolist() == [0.9, 0.85, 0.95]
    page = _summary_html(frame)
    assert "<td>0.900 [0.850, 0.950] (10 images)</td>" in page
    assert "<td>0.000</td>" in page and "nan" not in page  # -0.0001 shown as 0.000; no interval: none shown


def test_a_grid_backbone_gets_the_layerwise_probes_and_the_reasons_for_the_rest(tmp_path):
    """The same probes as ``layerwise`` (each stage on its own grid) with the random-init baseline, and
    every other analysis named with its reason."""
    import timm

    from asg_probe.report import GRID_BACKBONE_NOT_RUN

    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(1, 1),
                             num_heads=(1, 2), window_size=4, num_classes=0).eval()
    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    page = build_report([(swin, "swin")], tmp_path, images=images, progress=False).read_text()
    section = page.split("<h2 id='not-run'>")[1].split("<h2")[0]
    assert "<b>swin</b>" in section
    assert all(why.replace("'", "&#x27;") in section for why in GRID_BACKBONE_NOT_RUN.values())
    assert "<h2 id='layerwise'>" in page and "<h2 id='shuffle-test'>" not in page
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert "shuffle_test" not in summary and summary.loc[0, "r2_col_init"] == summary.loc[0, "r2_col_init"]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["swin.layerwise.json"]
    doc = json.loads((tmp_path / "swin.layerwise.json").read_text())
    assert sorted(doc["not_run"]) == sorted(GRID_BACKBONE_NOT_RUN)
    assert [r["grid"] for r in doc["layers"]] == [[8, 8], [4, 4]] and [r["stride"] for r in doc["layers"]] == [4, 8]
    alone = asg_probe.layerwise_probes(swin, images, progress=False, init_baseline=False).to_frame()
    assert [r["r2_row"] for r in doc["layers"]] == pytest.approx(alone["r2_row"].tolist(), abs=1e-6)


def test_verdicts_are_read_only_where_both_analyses_ran():
    from asg_probe.report import reading_of_verdicts

    rows = pd.DataFrame([{"model": "ape", "shuffle_test": "injected", "equivariance": "not equivariant"},
                         {"model": "swin", "shuffle_test": float("nan"), "equivariance": float("nan")}])
    assert [m for m, _ in reading_of_verdicts(rows)] == ["ape"]
