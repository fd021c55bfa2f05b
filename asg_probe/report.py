"""``asg-probe report``: one HTML page with every analysis, several checkpoints side by side.

The page opens with its provenance (package version, command, images, each checkpoint's
own metadata: training command, recipe, top-1) and a summary table of the headline
numbers per model (:func:`summary_frame`, also written as ``summary.csv``), then one
section per analysis with every model's figure at its natural width.

Per model, layerwise probes, attention distance, token embeddings and the
shuffle test come from **one forward call per image batch** (the shuffled copy of
each batch rides in the same call). The equivariance certificate and resolution
transfer need other inputs (shuffles at every layer, other sizes) and run after.
Figures are embedded as base64 PNG, so the page is a single self-contained file.
"""
from __future__ import annotations

import base64
import datetime
import html
import functools
import io
import re
from pathlib import Path


def _png(fig, dpi=110) -> str:
    """The figure as an embedded PNG shown at its natural size (pixels / device pixel ratio)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    width = _png_width(buf.getvalue())
    return (f"<img width='{width}' alt='figure' "
            f"src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>")


def _png_width(data: bytes) -> int:
    return int.from_bytes(data[16:20], "big")  # the IHDR chunk: width, then height


def number(value, tiny=True) -> str:
    """A table cell: 3 decimals, scientific notation for very large or small values, and no
    negative zero (``-0.0004`` reads ``0.000``: the sign of a rounded-away value means nothing).

    Examples
    --------
    >>> number(-0.0004), number(0.91234), number(1e6), number(3.2e-7), number(True), number(None)
    ('0.000', '0.912', '1.0e+06', '3.2e-07', 'yes', '')
    >>> number(-2e-5, tiny=False)  # R²-like columns: three decimals however small
    '0.000'
    """
    import math

    import numpy as np

    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)) or not isinstance(value, (float, np.floating)):
        return str(value)
    if not math.isfinite(value) or value == 0:
        return "0.000" if value == 0 else str(value)
    if abs(value) >= 1e4 or (tiny and abs(value) < 1e-4):  # alphas, relative errors, tolerances
        return f"{value:.1e}"
    text = f"{value:.3f}"
    return "0.000" if text == "-0.000" else text


def _table(frame, max_rows=40, footnote_column=None) -> str:
    frame = frame.head(max_rows)
    for column in frame.columns:  # intervals ([low, high]) and other lists: each number formatted
        if frame[column].dtype == object and any(isinstance(v, (list, tuple)) for v in frame[column]):
            frame = frame.assign(**{column: [f"[{', '.join(number(x) for x in v)}]" if isinstance(v, (list, tuple))
                                             else v for v in frame[column]]})
    if footnote_column and footnote_column in frame.columns:  # the flag column carries a footnote mark
        frame = frame.assign(**{footnote_column: [f"{number(v)}†" if v else number(v) for v in frame[footnote_column]]})
    # scientific notation for tiny values only where they mean something (errors, tolerances, alphas)
    formatters = {c: (number if any(k in c for k in ("error", "tol", "alpha", "delta"))
                      else functools.partial(number, tiny=False)) for c in frame.columns}
    return frame.to_html(index=False, formatters=formatters,
                         border=0, classes="tbl", na_rep="")


def analyse_model(model, label, images=None, *, num_images=64, img_size=None, batch_size=32, seed=0,
                  device="cpu", progress=True, with_resolution=True, init_baseline=True):
    """Every analysis of one model, shown as ``label``; returns ``{analysis name: result}``.

    Layerwise probes, attention distance, token embeddings and the shuffle test share
    one :func:`~asg_probe.extract.run_analyses` pass; the options are those of every
    entry point (``images``, ``num_images``, ``img_size``, ``batch_size``, ``seed``,
    ``device``, ``progress``). ``init_baseline`` adds the layerwise random-initialisation
    baseline (``r2_init``, ``r2_gain``: :func:`~asg_probe.layerwise_probes`), three more forward passes.
    """
    from .analysis.attention_distance import AttentionDistanceAccumulator
    from .analysis.embeddings import EmbeddingsAccumulator
    from .analysis.equivariance import check_equivariance
    from .analysis.layerwise import LayerwiseAccumulator, LayerwiseResult
    from .analysis.pos_similarity import pos_similarity
    from .analysis.shuffle import ShuffleAccumulator, ShuffleResult
    from .extract import run_analyses
    from .geometry import model_geometry
    from .inputs import ImageBatches

    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                batch_size=batch_size, seed=seed)
    geo = model_geometry(model)
    patch, prefix, depth = geo.patch_size, geo.num_prefix_tokens, geo.depth
    layerwise = LayerwiseAccumulator()
    embeddings = EmbeddingsAccumulator(layers=sorted({0, depth // 2, depth}), seed=seed)
    shuffled = ShuffleAccumulator(shuffle_seed=seed)
    accumulators = [layerwise, embeddings, shuffled]
    attention = None
    if geo.token_attention:  # attention over channels (XCiT) has no distance between patches: left out
        attention = AttentionDistanceAccumulator(patch_size=patch, num_prefix_tokens=prefix)
        accumulators.append(attention)
    run_analyses(model, data, accumulators, device=device, progress=progress, desc=f"report: {label}")
    results = {"layerwise": LayerwiseResult.from_accumulator(layerwise, label=label, img_size=data.img_size)}
    if init_baseline:
        from .analysis.layerwise import N_INIT_SEEDS, init_baseline_probes

        seeds = list(range(N_INIT_SEEDS))
        results["layerwise"].add_init_baseline(init_baseline_probes(model, data, seeds, layers=sorted(layerwise.probes),
                                                                    device=device, progress=progress))
        results["layerwise"].extra["init_seeds"] = seeds
    if attention is not None:
        results["attention_distance"] = attention.result(label)
    results["embeddings"] = embeddings.result(label, num_images=data.num_images)
    results["shuffle_test"] = ShuffleResult.from_accumulators(shuffled, layerwise, label=label)
    for result in results.values():
        result.record_inputs(data, device=device)
    results["equivariance"] = check_equivariance(model, data.images[:8], seed=seed, device=device, label=label)
    try:
        results["pos_similarity"] = pos_similarity(model, label=label)
    except ValueError:
        pass  # no absolute position table: nothing to show
    if with_resolution:
        from .analysis.resolution import resolution_transfer

        results["resolution"] = resolution_transfer(model, images, num_images=num_images, batch_size=batch_size,
                                                    seed=seed, device=device, progress=progress, label=label)
    return results


SECTIONS = [
    ("layerwise", "Layerwise coordinate probes",
     "Held-out R² (split by image) of a ridge probe from each layer's patch tokens to (row, col); "
     "dashed grey: slot control (fixed random permutations of the slots: geometry vs identity; selectivity = "
     "true − control); dotted: the same architecture freshly initialised (random-init baseline, r2_init; "
     "learned gain r2_gain = r2 − r2_init). compression_row/col: online-code compression (Voita & Titov 2020), "
     "1 = nothing learnable. Intervals: 95%, delete-one-fold jackknife over images; they cover the expected R² "
     "at the number of images shown beside them. R² rises with the number of images (a probe fit on more "
     "images is better), so compare intervals only at equal image counts."),
    ("attention_distance", "Mean attention distance",
     "Attention-weighted distance (px) between query and key patches, one dot per head and layer, grey line: "
     "mean over heads; prefix tokens excluded and weights renormalised. Dashed line: uniform attention."),
    ("embeddings", "Token-position embeddings", "UMAP of patch tokens, coloured by 2D grid position (key at right)."),
    ("shuffle_test", "Content or injection?",
     "Patches shuffled: can a probe decode the patch's original position (content) or its slot (injection)?"),
    ("equivariance", "Equivariance certificate",
     "Shuffle the input patches: do outputs shuffle the same way at every layer? (no positional injection)"),
    ("pos_similarity", "Position-embedding similarity", "Cosine similarity between position embeddings."),
    ("resolution", "Resolution transfer",
     "Probes fit at the training size, evaluated at other sizes (procedural scenes rendered at each size, "
     "other images resized: size_source in the JSON); thick: mean of row and column, dotted: row, dashed: "
     "column. The table gives absolute R² and the fraction of the same layer's fit-size R² retained "
     "(*_retained; nan where the fit-size R² is below 0.05)."),
]

#: Summary columns: (CSV name, HTML header).
SUMMARY_COLUMNS = [
    ("model", "model"), ("layer", "last layer"), ("top1", "top-1 (checkpoint)"),
    ("r2_row", "R² row"), ("r2_col", "R² col"), ("r2_control", "slot control R²"),
    ("selectivity", "selectivity (slot)"), ("r2_col_init", "R² col at random init"),
    ("r2_col_gain", "R² col gain (learned)"), ("compression_row", "compression row (MDL)"),
    ("compression_col", "compression col (MDL)"), ("num_images", "images"),
    ("attention_distance_px", "mean attention distance (px)"), ("uniform_px", "uniform (px)"),
    ("shuffle_test", "shuffle test"), ("equivariance", "equivariance"),
]

ALPHA_FOOTNOTE = (
    "† alpha_at_edge: the ridge penalty chosen by cross-validation for the row or the column lies at an end "
    "of the grid searched (1e-3 to 1e6 by default, extended automatically while held-out R² still improves). "
    "A flag that remains is expected in two cases: a coordinate with nothing to decode (R² ≤ 0: the largest "
    "penalty, i.e. predicting the mean, wins; alpha_row / alpha_col = 1e6) and a fit already converged (R² ≈ 1 "
    "at the smallest penalty, e.g. a position table added at layer 0). Elsewhere a wider grid "
    "(layerwise_probes(alphas=...)) could raise R² slightly.")


def _top1(meta) -> float | None:
    metrics = (meta or {}).get("metrics") or {}
    evaluation = ((meta or {}).get("train") or {}).get("eval") or {}
    value = metrics.get("top1", evaluation.get("top1"))
    return float(value) if isinstance(value, (int, float)) else None


def summary_rows(all_results, metas=None) -> list:
    """The headline numbers per model, one dict per model (the columns of :data:`SUMMARY_COLUMNS`).

    ``all_results`` is ``{name: {analysis name: result}}`` as :func:`analyse_model` returns;
    ``metas`` optional ``{name: model.asg_meta}``. R² figures are the last layer's row of the
    layerwise result, with the slot control (identity vs geometry), the random-initialisation
    baseline of the column (``r2_col_init``, learned gain ``r2_col_gain``) where it was computed, and
    the online-code compression; where a row carries 95% intervals (``r2_row_ci``, ``r2_col_ci``,
    ``r2_control_ci``, ``selectivity_ci``, ``r2_col_init_ci``, ``r2_col_gain_ci``: ``[low, high]``),
    they are added as ``<column>_low`` / ``<column>_high`` and shown in the page as
    ``value [low, high] (n images)``: an interval covers the expected R² at that image count.

    Examples
    --------
    >>> import asg_probe, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    >>> res = analyse_model(m, "none", torch.randn(10, 3, 32, 32), progress=False, with_resolution=False)
    >>> row = summary_rows({"none": res})[0]
    >>> row["r2_row"] == res["layerwise"].rows[-1]["r2_row"], row["equivariance"]
    (True, 'certified')
    """
    from .plotting import display_name

    metas = metas or {}
    rows = []
    for name, res in all_results.items():
        last = res["layerwise"].rows[-1]
        row = {"model": display_name(name), "layer": last["layer"], "top1": _top1(metas.get(name)),
               "num_images": res["layerwise"].num_images,
               "r2_row": last["r2_row"], "r2_col": last["r2_col"], "r2_control": last["r2_control"],
               "selectivity": last["selectivity"], "r2_col_init": last.get("r2_col_init"),
               "r2_col_gain": last.get("r2_col_gain"), "compression_row": last.get("compression_row"),
               "compression_col": last.get("compression_col")}
        for key in ("r2_row", "r2_col", "r2_control", "selectivity", "r2_col_init", "r2_col_gain"):
            ci = last.get(f"{key}_ci")
            if ci is not None:
                row[f"{key}_low"], row[f"{key}_high"] = float(ci[0]), float(ci[1])
        attention = res.get("attention_distance")
        if attention is not None:
            px = attention.heads_px[max(attention.heads_px)]
            row["attention_distance_px"], row["uniform_px"] = sum(px) / len(px), attention.uniform_px
        shuffled = res.get("shuffle_test")
        if shuffled is not None:
            row["shuffle_test"] = shuffled.rows[-1]["source"]
        equivariance = res.get("equivariance")
        if equivariance is not None:
            row["equivariance"] = "certified" if equivariance.certified else "not equivariant"
        rows.append(row)
    return rows


def summary_frame(all_results, metas=None):
    """:func:`summary_rows` as a pandas DataFrame (what ``summary.csv`` holds and ``report`` prints)."""
    import pandas as pd

    rows = summary_rows(all_results, metas)
    order = [c for c, _ in SUMMARY_COLUMNS]
    extra = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in order]
    columns = [c for c in order + extra if any(r.get(c) is not None for r in rows)]  # no empty columns
    return pd.DataFrame(rows, columns=columns)


def _summary_html(frame) -> str:
    headers = dict(SUMMARY_COLUMNS)
    cells = []
    for _, row in frame.iterrows():
        out = []
        for column in frame.columns:
            if column.endswith(("_low", "_high")):
                continue
            text = number(row[column], tiny=False) if row[column] == row[column] else ""  # NaN: not measured
            if f"{column}_low" in frame.columns and row[f"{column}_low"] == row[f"{column}_low"]:
                text += f" [{number(row[f'{column}_low'], tiny=False)}, {number(row[f'{column}_high'], tiny=False)}]"
                if "num_images" in frame.columns:   # an interval is for the expected R² at this image count
                    text += f" ({int(row['num_images'])} images)"
            out.append(f"<td>{html.escape(text)}</td>")
        cells.append("<tr>" + "".join(out) + "</tr>")
    head = "".join(f"<th>{html.escape(headers.get(c, c))}</th>" for c in frame.columns
                   if not c.endswith(("_low", "_high")))
    return f"<table class='tbl summary'><thead><tr>{head}</tr></thead><tbody>{''.join(cells)}</tbody></table>"


def _recipe(meta) -> str:
    """The training recipe in one line, from the checkpoint's stored config (what is there)."""
    config = (meta or {}).get("config") or {}
    parts = []
    for key in ("task", "max_steps", "epochs", "batch_size", "seed"):
        if config.get(key) is not None:
            parts.append(f"{key.replace('_', ' ')} {config[key]}")
    data = config.get("data") or {}
    if data.get("kind"):
        parts.append(f"data {data['kind']}" + (f" ({data['task']})" if data.get("task") else ""))
    optim = config.get("optim") or {}
    if optim.get("lr") is not None:
        parts.append(f"lr {optim['lr']:g}" + (f", weight decay {optim['weight_decay']:g}"
                                               if optim.get("weight_decay") is not None else ""))
    guidance = config.get("guidance") or {}
    if guidance.get("enabled"):
        parts.append("guidance " + ", ".join(f"{k} {guidance[k]}" for k in ("target", "rc_lambda") if k in guidance))
    return "; ".join(parts)


def _provenance_html(all_results, metas, command, seed, device) -> str:
    from . import __version__
    from .plotting import display_name

    # the images part of each model's provenance line (device and version have their own rows)
    lines = {n: re.split(r", (?:device|asg_probe) ", res["layerwise"].provenance_line().removeprefix("computed on: "))[0]
             for n, res in all_results.items()}
    images = next(iter(lines.values())) if len(set(lines.values())) == 1 else \
        "; ".join(f"{display_name(n)}: {v}" for n, v in lines.items())
    run = [("asg_probe", __version__), ("command", command or "build_report() from Python"),
           ("date", datetime.datetime.now().isoformat(timespec="seconds")), ("images", images),
           ("seed", str(seed)), ("device", str(device))]
    out = ["<table class='tbl prov'>"] + [f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in run]
    out.append("</table><h3>Checkpoints</h3><table class='tbl prov'><thead><tr><th>model</th><th>checkpoint</th>"
               "<th>architecture</th><th>training command</th><th>recipe</th><th>top-1</th></tr></thead><tbody>")
    for name in all_results:
        meta = metas.get(name) or {}
        model = meta.get("model") or {}
        arch = " ".join(str(model[k]) for k in ("name", "pos") if model.get(k))
        train = (meta.get("train") or {}).get("command") or ""
        top1 = _top1(meta)
        fmt = meta.get("checkpoint_format")
        checkpoint = (meta.get("checkpoint") or name) + (f" ({fmt})" if fmt else "")
        cells = [display_name(name), checkpoint, arch, train, _recipe(meta), "" if top1 is None else number(top1)]
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def snapshot_runs(names) -> list:
    """The names that are training run directories with a ``snapshots/`` folder (emergence section)."""
    return [n for n in names if Path(n).is_dir() and (Path(n) / "snapshots").is_dir()]


def _emergence_html(runs, images, *, num_images, img_size, batch_size, seed, device, progress, max_snapshots=8):
    """The emergence section for run directories with snapshots, and its JSON document."""
    from .analysis.emergence import emergence

    result = emergence(runs, images, num_images=num_images, img_size=img_size, batch_size=batch_size, seed=seed,
                       device=device, progress=progress, max_snapshots=max_snapshots)
    caption = (f"Layerwise probes on up to {max_snapshots} training snapshots per run (spread over the run): "
               "step × layer heatmaps of column and row R², and the last layer's column R² against the step "
               "(dotted: control task; dashed: the threshold of the summary's first step).")
    section = (f"<h2>Emergence during training</h2><p class='cap'>{caption}</p>{_png(result.plot())}"
               f"<details open><summary>summary</summary>{_table(result.summary_frame())}</details>")
    return section, result.to_json()


def build_report(models, out_dir, images=None, *, num_images=64, img_size=None, batch_size=32, seed=0,
                 device="cpu", progress=True, with_resolution=True, command=None, init_baseline=True) -> Path:
    """Analyse ``models`` (list of ``(model, name)``) and write ``report.html``, ``summary.csv``
    and per-model JSON.

    The page opens with the provenance (package version, ``command``, images, each checkpoint's
    ``asg_meta``: training command, recipe, top-1) and the summary table (:func:`summary_frame`),
    then one section per analysis, and an emergence section (:mod:`asg_probe.analysis.emergence`)
    when a model's name is a training run directory with ``snapshots/``.

    Examples
    --------
    >>> import asg_probe, tempfile, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    >>> path = build_report([(m, "ape")], tempfile.mkdtemp(), images=torch.randn(10, 3, 32, 32),
    ...                     progress=False, with_resolution=False)
    >>> path.name, sorted(p.name for p in path.parent.glob("*.csv"))
    ('report.html', ['summary.csv'])
    """
    from .analysis.layerwise import compare_layerwise
    from .plotting import display_name
    from .results import write_output_set

    out = Path(out_dir)
    all_results, metas, contents = {}, {}, {}  # contents: every file, written as one set at the end
    for model, name in models:
        res = analyse_model(model, name, images, num_images=num_images, img_size=img_size,
                            batch_size=batch_size, seed=seed, device=device, progress=progress,
                            with_resolution=with_resolution, init_baseline=init_baseline)
        all_results[name], metas[name] = res, getattr(model, "asg_meta", None) or {}
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)
        for result in res.values():
            if command:
                result.provenance["command"] = command
            contents[f"{safe}.{result.name}.json"] = result.to_json()
    names = list(all_results)
    summary = summary_frame(all_results, metas)
    contents["summary.csv"] = summary.to_csv(index=False)
    parts = [f"<h1>asg_probe report: {html.escape(', '.join(display_name(n) for n in names))}</h1>",
             "<h2>Provenance</h2>", _provenance_html(all_results, metas, command, seed, device),
             "<h2>Summary</h2><p class='cap'>Last layer of each model. R²: held-out (split by image) linear "
             "probe of the patch row / column with its 95% interval (delete-one-fold jackknife over images, "
             "with refits), followed by the number of images it was computed on: an interval covers the expected "
             "R² at that image count, and R² rises with the image count (a probe fit on more images is better). "
             "Slot control: the same probe on fixed random permutations of the positions (solved by any code of "
             "slot identity: it separates geometry from identity); selectivity = mean R² − that control, "
             "averaged over 5 permutations. Random init: the same architecture freshly initialised (3 seeds), "
             "same images and folds; gain = R² − that, i.e. what training added. Compression (MDL, Voita &amp; "
             "Titov 2020): uniform / online code length of the coordinate, 1 = nothing learnable, large = read "
             "from a few images. Shuffle test: where the last layer's position comes from (content, injected, "
             "both, none). Equivariance: certified = no positional injection. Also in summary.csv.</p>",
             _summary_html(summary)]
    if len(names) > 1:
        parts.append("<h2>All models</h2><p class='cap'>Mean of row and column R² per layer; "
                     "dotted: control task (slot permutation)."
                     "</p>" + _png(compare_layerwise([all_results[n]["layerwise"] for n in names], labels=names)))
    for key, title, caption in SECTIONS:
        cells, flagged = [], False
        for n in names:
            result = all_results[n].get(key)
            if result is None:
                continue
            extra = f"<p><b>{html.escape(result.verdict())}</b></p>" if hasattr(result, "verdict") else ""
            frame = result.to_frame()
            flagged |= bool("alpha_at_edge" in frame.columns and frame["alpha_at_edge"].any())
            is_open = " open" if len(frame) <= 16 else ""  # short tables shown, long ones one click away
            cells.append(f"<div class='cell'><h3>{html.escape(display_name(n))}</h3>{extra}{_png(result.plot())}"
                         f"<details{is_open}><summary>table ({len(frame)} rows)</summary>"
                         f"{_table(frame, footnote_column='alpha_at_edge')}</details></div>")
        if cells:
            note = f"<p class='note'>{html.escape(ALPHA_FOOTNOTE)}</p>" if flagged else ""
            parts.append(f"<h2>{title}</h2><p class='cap'>{caption}</p><div class='row'>{''.join(cells)}</div>{note}")
    runs = snapshot_runs(names)
    if runs:
        section, contents["emergence.json"] = _emergence_html(
            runs, images, num_images=num_images, img_size=img_size, batch_size=batch_size, seed=seed,
            device=device, progress=progress)
        parts.append(section)
    style = ("<style>body{font-family:sans-serif;margin:24px}.row{display:flex;flex-wrap:wrap;gap:24px}"
             ".cell{flex:0 0 auto;max-width:100%;overflow-x:auto}.cell img{display:block}.cap{color:#555}"
             ".note{color:#555;font-size:13px}.tbl{font-size:13px;border-collapse:collapse}"
             ".tbl td,.tbl th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}"
             ".prov td,.prov th{text-align:left}.summary td:first-child{text-align:left;font-weight:bold}</style>")
    contents["report.html"] = (f"<!doctype html><html><head><meta charset='utf-8'><title>asg_probe report</title>"
                               "<link rel='icon' href='data:,'>"
                               f"{style}</head><body>{''.join(parts)}</body></html>")
    write_output_set(out, contents)
    return out / "report.html"
