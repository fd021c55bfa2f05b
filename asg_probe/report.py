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


def _png(fig, dpi=110, alt="figure") -> str:
    """The figure as an embedded PNG shown at its natural size (pixels / device pixel ratio);
    ``alt``: what a reader without the image is told (the caption)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    width = _png_width(buf.getvalue())
    return (f"<img width='{width}' alt='{html.escape(alt, quote=True)}' "
            f"src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>")


_LINE_STYLES = {"-": "solid", "solid": "solid", "--": "dashed", "dashed": "dashed", ":": "dotted",
                "dotted": "dotted", "-.": "dash-dot", "dashdot": "dash-dot"}


def line_key(fig) -> str:
    """The lines a figure's legends name, with their styles, e.g. ``"row (solid), slot control (dashed)"``.

    Read off the drawn figure, so a caption built from it names exactly what is drawn, whatever
    lines a result's ``plot`` adds later.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> fig, ax = plt.subplots()
    >>> _ = ax.plot([0, 1], label="row"); _ = ax.plot([1, 0], ls=":", label="slot control"); _ = ax.legend()
    >>> line_key(fig)
    'row (solid), slot control (dotted)'
    >>> plt.close(fig)
    """
    from matplotlib.lines import Line2D

    entries = []
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        handles = getattr(legend, "legend_handles", None) or getattr(legend, "legendHandles", [])
        for handle, text in zip(handles, legend.get_texts()):
            style = ""
            if isinstance(handle, Line2D):  # points and patches: the label alone
                style = _LINE_STYLES.get(handle.get_linestyle(), "markers")
            entry = f"{text.get_text()} ({style})" if style else text.get_text()
            if entry not in entries:
                entries.append(entry)
    return ", ".join(entries)


def _portable_path(path) -> str:
    """A path as another machine can read it: a bundled model by name, a packaged recipe by name,
    else relative to the working folder when below it, else its last two parts.

    Examples
    --------
    >>> _portable_path("/build/host/train/configs/cpu_scenes_guidance.yaml")
    'cpu_scenes_guidance'
    >>> _portable_path("/elsewhere/runs/a/model.safetensors")
    '…/a/model.safetensors'
    >>> _portable_path("runs/a")
    'runs/a'
    """
    text = str(path)
    p = Path(text)
    if not p.is_absolute():
        return text
    if p.parent.name == "configs" and p.parent.parent.name in ("train", "asg_train") and p.suffix == ".yaml":
        return p.stem  # a packaged recipe: `asg-train --config NAME` finds it from any folder
    if p.parent.name == "reference" and p.parent.parent.name == "asg_probe":
        return f"bundled: {p.stem}"
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return "…/" + "/".join(p.parts[-2:])


def _portable_command(command: str) -> str:
    """A command line with every absolute path shortened by :func:`_portable_path`."""
    # a path starts after a space, an "=" or the start of the line
    return re.sub(r"(?<![^\s=])/[^\s'\"]+", lambda m: _portable_path(m.group(0)), command or "")


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
    table = frame.to_html(index=False, formatters=formatters, border=0, classes="tbl", na_rep="")
    return f"<div class='scroll'>{table}</div>"  # a wide table scrolls inside its box, not the page


def analyse_model(model, label, images=None, *, num_images=64, img_size=None, batch_size=32, seed=0,
                  device="cpu", progress=True, with_resolution=True, init_baseline=True):
    """Every analysis of one model, shown as ``label``; returns ``{analysis name: result}``.

    Layerwise probes, attention distance, token embeddings and the shuffle test share
    one :func:`~asg_probe.extract.run_analyses` pass; the options are those of every
    entry point (``images``, ``num_images``, ``img_size``, ``batch_size``, ``seed``,
    ``device``, ``progress``). ``init_baseline`` adds the layerwise random-initialisation
    baseline (``r2_init``, ``r2_gain``: :func:`~asg_probe.layerwise_probes`), three more forward passes.

    A grid backbone (:mod:`asg_probe.intermediates`: hierarchical or windowed, each stage on its
    own grid) gets the layerwise probes and their baseline only; what is left out, and why
    (:data:`GRID_BACKBONE_NOT_RUN`), is in its layerwise result's ``extra["not_run"]`` and on the page.
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
    # a grid backbone (each stage on its own grid) gets the layerwise probes only: GRID_BACKBONE_NOT_RUN
    grid_backbone = geo.kind != "vit"
    layerwise = LayerwiseAccumulator()
    embeddings = EmbeddingsAccumulator(layers=sorted({0, depth // 2, depth}), seed=seed)
    shuffled = ShuffleAccumulator(shuffle_seed=seed)
    accumulators = [layerwise] if grid_backbone else [layerwise, embeddings, shuffled]
    attention = offsets = None
    # attention over channels (XCiT) has no distance between patches: left out
    if geo.token_attention and not grid_backbone:
        from .analysis.attention_offsets import AttentionOffsetsAccumulator

        attention = AttentionDistanceAccumulator(patch_size=patch, num_prefix_tokens=prefix)
        offsets = AttentionOffsetsAccumulator(num_prefix_tokens=prefix)  # same pass: the logits ride along
        accumulators += [attention, offsets]
    run_analyses(model, data, accumulators, device=device, progress=progress, desc=f"report: {label}")
    results = {"layerwise": LayerwiseResult.from_accumulator(layerwise, label=label, img_size=data.img_size)}
    if init_baseline:
        from .analysis.layerwise import N_INIT_SEEDS, init_baseline_probes

        seeds = list(range(N_INIT_SEEDS))
        results["layerwise"].add_init_baseline(init_baseline_probes(model, data, seeds, layers=sorted(layerwise.probes),
                                                                    device=device, progress=progress))
        results["layerwise"].extra["init_seeds"] = seeds
    if grid_backbone:
        results["layerwise"].extra["not_run"] = dict(GRID_BACKBONE_NOT_RUN)
        results["layerwise"].record_inputs(data, device=device)
        return results
    if attention is not None:
        results["attention_distance"] = attention.result(label)
        results["attention_offsets"] = offsets.result(label)
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


#: What a report leaves out for a grid backbone (:mod:`asg_probe.intermediates`), and why.
GRID_BACKBONE_NOT_RUN = {
    "attention_distance": "its attention maps are not read in the report's shared pass (windowed, pooled or "
                          "convolutional stages); `asg-probe attention-distance` measures it per window for Swin, "
                          "Swin V2, NesT, Hiera, Twins, PVTv2 and SAM-ViT",
    "attention_offsets": "needs attention logits over one token grid; a grid backbone's stages are windowed, "
                         "pooled or convolutional",
    "embeddings": "the UMAP compares layers on one token grid; a grid backbone's stages each have their own",
    "shuffle_test": "shuffles non-overlapping patches, which a grid backbone's overlapping, windowed or pooled "
                    "stages do not keep apart",
    "equivariance": "permutes non-overlapping patches at every block, which a grid backbone does not keep apart",
    "pos_similarity": "compares the rows of a plain ViT's position table",
    "resolution": "fits probes at one size and reads other sizes through layer 0, which a grid backbone lacks",
}


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
    ("attention_offsets", "Position in attention scores",
     "Offset kernel per layer (rows) and head (columns): the part of the attention logit that depends on the "
     "offset key − query alone (query at +, one colour scale per model), fitted with a free constant per query; "
     "R² = share of the within-query logit variance it explains. The table adds the same score on held-out "
     "images (folds) with its 95% interval, the part beyond the zero offset, and the attention given to "
     "prefix tokens. Kernels: asg-probe attention-offsets writes them as .npz."),
    ("embeddings", "Token-position embeddings",
     "UMAP of patch tokens, coloured by 2D grid position (key at right). The score in each panel's title is "
     "the position score: the Pearson correlation between each token's normalised (row, col) and the mean "
     "position of its nearest neighbours in the 2-D map among tokens of other images (same-image neighbours "
     "are left out, because neighbouring patches of one image look alike), averaged over row and column: "
     "about 0 = no spatial organisation, 1 = perfect."),
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
    return (f"<div class='scroll'><table class='tbl summary'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(cells)}</tbody></table></div>")


def _recipe(meta) -> str:
    """The training recipe in one line, from the checkpoint's stored config (what is there)."""
    config = (meta or {}).get("config") or {}
    parts = [f"recipe {config['recipe']}"] if config.get("recipe") else []
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
    run = [("asg_probe", __version__), ("command", _portable_command(command) or "build_report() from Python"),
           ("date", datetime.datetime.now().isoformat(timespec="seconds")), ("images", images),
           ("seed", str(seed)), ("device", str(device))]
    out = ["<div class='scroll'><table class='tbl prov'>"] + [f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>"
                                                             for k, v in run]
    out.append("</table></div><h3>Checkpoints</h3><div class='scroll'><table class='tbl prov'><thead><tr>"
               "<th>model</th><th>checkpoint</th><th>architecture</th><th>training command</th><th>recipe</th>"
               "<th>top-1</th></tr></thead><tbody>")
    for name in all_results:
        meta = metas.get(name) or {}
        model = meta.get("model") or {}
        arch = " ".join(str(model[k]) for k in ("name", "pos") if model.get(k))
        train = _portable_command((meta.get("train") or {}).get("command") or "")
        top1 = _top1(meta)
        fmt = meta.get("checkpoint_format")
        checkpoint = _portable_path(meta.get("checkpoint") or name) + (f" ({fmt})" if fmt else "")
        cells = [display_name(name), checkpoint, arch, train, _recipe(meta), "" if top1 is None else number(top1)]
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table></div>")
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
               "(solid: each run's column R²; dotted, in the run's colour: its slot control, r2_control; dashed black: "
               "the threshold of the summary's first step).")
    section = (f"<h2 id='emergence'>Emergence during training</h2><p class='cap'>{caption}</p>"
               f"{_png(result.plot(), alt=caption)}"
               f"<details><summary>summary</summary>{_table(result.summary_frame())}</details>")
    return section, result.to_json()


#: lists the files a report wrote (hidden, part of the set): the next report into the folder
#: removes those of them it does not write again, and nothing else
REPORT_MANIFEST = ".asg-probe-report.files"


def output_keys(names) -> dict:
    """``{name: file-name key}`` for the per-model files; unique even when two checkpoints share
    a file name (``a/model.pt``, ``b/model.pt``): those get a short hash of their full name.

    >>> output_keys(["runs/a/model.pt", "runs/b/model.pt", "ape"])["ape"]
    'ape'
    >>> len(set(output_keys(["runs/a/model.pt", "runs/b/model.pt"]).values()))
    2
    """
    import hashlib

    def safe(text):
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)

    base = {n: safe(Path(n).name) or "model" for n in names}
    keys = {}
    for n in names:
        shared = sum(b == base[n] for b in base.values()) > 1
        keys[n] = f"{base[n]}-{hashlib.sha1(str(n).encode()).hexdigest()[:8]}" if shared else base[n]
    return keys


def report_files(out_dir) -> list:
    """The files the last report in ``out_dir`` wrote (from its manifest); ``[]`` if none."""
    manifest = Path(out_dir) / REPORT_MANIFEST
    if not manifest.is_file():
        return []
    return [n for n in manifest.read_text(encoding="utf-8").splitlines() if n and Path(n).name == n]


def build_report(models, out_dir, images=None, *, num_images=64, img_size=None, batch_size=32, seed=0,
                 device="cpu", progress=True, with_resolution=True, command=None, on_results=None,
                 init_baseline=True) -> Path:
    """Analyse ``models`` (list of ``(model, name)``) and write ``report.html``, ``summary.csv``
    and per-model JSON.

    The page opens with a table of contents, the summary table (:func:`summary_frame`) and a
    reading of each model's verdicts side by side (:func:`reading_of_verdicts`), then the
    provenance (package version, ``command``, images, each checkpoint's ``asg_meta``: training
    command, recipe, top-1; paths shortened so that they mean something on another machine),
    then one section per analysis (raw tables folded, wide ones scrolling in their own box), and
    an emergence section (:mod:`asg_probe.analysis.emergence`) when a model's name is a training
    run directory with ``snapshots/``. ``on_results(name, results)`` is called with each model's
    results as they are computed (the command line prints their provenance).

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
    given = [name for _, name in models]
    twice = sorted({n for n in given if given.count(n) > 1})
    if twice:
        from .errors import UsageError

        raise UsageError(f"report: {', '.join(map(str, twice))} given more than once; name each model once")
    keys = output_keys(given)
    for model, name in models:
        res = analyse_model(model, name, images, num_images=num_images, img_size=img_size,
                            batch_size=batch_size, seed=seed, device=device, progress=progress,
                            with_resolution=with_resolution, init_baseline=init_baseline)
        all_results[name], metas[name] = res, getattr(model, "asg_meta", None) or {}
        if on_results is not None:
            on_results(name, res)
        safe = keys[name]
        for result in res.values():
            if command:
                result.provenance["command"] = command
            if hasattr(result, "npz_bytes"):  # attention offsets: the kernels beside the JSON
                result.kernels_file = f"{safe}.{result.name}.npz"
                contents[result.kernels_file] = result.npz_bytes()
            contents[f"{safe}.{result.name}.json"] = result.to_json()
    names = list(all_results)
    summary = summary_frame(all_results, metas)
    contents["summary.csv"] = summary.to_csv(index=False)
    sections = []  # (anchor, title, html): the table of contents is made from them

    def section(anchor, title, body_html):
        sections.append((anchor, title, f"<h2 id='{anchor}'>{html.escape(title)}</h2>{body_html}"))

    section("summary", "Summary",
            "<p class='cap'>Last layer of each model. R²: held-out (split by image) linear "
             "probe of the patch row / column with its 95% interval (delete-one-fold jackknife over images, "
             "with refits), followed by the number of images it was computed on: an interval covers the expected "
             "R² at that image count, and R² rises with the image count (a probe fit on more images is better). "
             "Slot control: the same probe on fixed random permutations of the positions (solved by any code of "
             "slot identity: it separates geometry from identity); selectivity = mean R² − that control, "
             "averaged over 5 permutations. Random init: the same architecture freshly initialised (3 seeds), "
             "same images and folds; gain = R² − that, i.e. what training added. Compression (MDL, Voita &amp; "
             "Titov 2020): uniform / online code length of the coordinate, 1 = nothing learnable, large = read "
             "from a few images. Shuffle test: where the last layer's position comes from (content, injected, "
             "both, none). Equivariance: certified = no positional injection. Also in summary.csv.</p>"
            + _summary_html(summary))
    readings = reading_of_verdicts(summary)
    if readings:
        section("verdicts", "Reading the verdicts together",
                "<p class='cap'>The shuffle test asks whether a linear probe can read the slot a patch "
                "occupies; the equivariance certificate asks whether the model injects any position at all. "
                "They can disagree without contradicting each other.</p><ul class='readings'>"
                + "".join(f"<li><b>{html.escape(display_name(m))}</b>: {html.escape(t)}</li>" for m, t in readings)
                + "</ul>")
    section("provenance", "Provenance", _provenance_html(all_results, metas, command, seed, device))
    if len(names) > 1:
        caption = ("Mean of row and column R² per layer, one colour per model (solid); dotted, in the same "
                   "colour: that model's slot control (r2_control, a fixed random permutation of the positions).")
        section("all-models", "All models", f"<p class='cap'>{caption}</p>"
                + _png(compare_layerwise([all_results[n]["layerwise"] for n in names], labels=names), alt=caption))
    for key, title, caption in SECTIONS:
        cells, flagged, lines = [], False, ""
        for n in names:
            result = all_results[n].get(key)
            if result is None:
                continue
            extra = f"<p><b>{html.escape(result.verdict())}</b></p>" if hasattr(result, "verdict") else ""
            frame = result.to_frame()
            flagged |= bool("alpha_at_edge" in frame.columns and frame["alpha_at_edge"].any())
            fig = result.plot()
            if key == "layerwise" and not lines:
                lines = line_key(fig)  # the same plot for every model: its legend, once
            alt = f"{title}, {display_name(n)}: {caption}"
            # raw tables folded: the figures carry the page, the numbers are one click away
            cells.append(f"<div class='cell'><h3>{html.escape(display_name(n))}</h3>{extra}{_png(fig, alt=alt)}"
                         f"<details><summary>table ({len(frame)} rows)</summary>"
                         f"{_table(frame, footnote_column='alpha_at_edge')}</details></div>")
        if cells:
            note = f"<p class='note'>{html.escape(ALPHA_FOOTNOTE)}</p>" if flagged else ""
            key_text = f" Lines drawn: {html.escape(lines)}." if lines else ""
            section(key.replace("_", "-"), title,
                    f"<p class='cap'>{caption}{key_text}</p><div class='row'>{''.join(cells)}</div>{note}")
    not_run = {n: all_results[n]["layerwise"].extra.get("not_run") for n in names}
    not_run = {n: reasons for n, reasons in not_run.items() if reasons}
    if not_run:
        titles = {key: title for key, title, _ in SECTIONS}
        items = "".join(f"<li><b>{html.escape(display_name(n))}</b>, grid backbone: "
                        + "; ".join(f"{html.escape(titles.get(k, k))}: {html.escape(why)}" for k, why in reasons.items())
                        + "</li>" for n, reasons in not_run.items())
        section("not-run", "Analyses not run",
                "<p class='cap'>Grid backbones (hierarchical or windowed: feature maps from timm's "
                "forward_intermediates, each stage on its own grid) get the layerwise probes only; the other "
                f"analyses are left out, each for the reason given.</p><ul class='readings'>{items}</ul>")
    runs = snapshot_runs(names)
    if runs:
        emergence_html, contents["emergence.json"] = _emergence_html(
            runs, images, num_images=num_images, img_size=img_size, batch_size=batch_size, seed=seed,
            device=device, progress=progress)
        sections.append(("emergence", "Emergence during training", emergence_html))
    toc = ("<nav class='toc'><b>Contents</b><ol>"
           + "".join(f"<li><a href='#{a}'>{html.escape(t)}</a></li>" for a, t, _ in sections) + "</ol></nav>")
    parts = [f"<h1>asg_probe report: {html.escape(', '.join(display_name(n) for n in names))}</h1>", toc]
    parts += [body_html for _, _, body_html in sections]
    style = ("<style>body{font-family:sans-serif;margin:24px;max-width:100%}"
             ".row{display:flex;flex-wrap:wrap;gap:24px}"
             ".cell{flex:0 1 auto;min-width:0;max-width:100%}.cell img{display:block;max-width:none}"
             ".scroll,.cell{overflow-x:auto}.scroll{max-width:100%}.cap{color:#555;max-width:70em}"
             ".toc{border:1px solid #ddd;padding:4px 16px;display:inline-block}.toc ol{margin:4px 0}"
             ".readings{max-width:70em}"
             ".note{color:#555;font-size:13px;max-width:70em}.tbl{font-size:13px;border-collapse:collapse}"
             ".tbl td,.tbl th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}"
             ".prov td,.prov th{text-align:left}.summary td{white-space:nowrap}.summary td:first-child{text-align:left;font-weight:bold}</style>")
    contents["report.html"] = (f"<!doctype html><html><head><meta charset='utf-8'>"
                               "<meta name='viewport' content='width=device-width, initial-scale=1'>"
                               "<title>asg_probe report</title><link rel='icon' href='data:,'>"
                               f"{style}</head><body>{''.join(parts)}</body></html>")
    contents[REPORT_MANIFEST] = "".join(f"{n}\n" for n in sorted(contents))
    # files the previous report wrote and this one does not (other models): retired with the set
    write_output_set(out, contents, remove=report_files(out))
    return out / "report.html"


#: What a (shuffle test, certificate) pair of verdicts means together, for the last layer.
_READINGS = {
    ("content", "certified"):
        "no positional injection (certified), so all it knows about position it infers from content; a "
        "probe reads the original position, never the slot (r2_slot is 0 by equivariance, not by chance).",
    ("content", "not equivariant"):
        "the model does inject something that depends on where patches sit (the certificate refuses it), yet "
        "no linear probe reads the slot at the last layer. Typical of relative mechanisms such as a distance "
        "decay or relative bias: attention knows how far apart two patches are, not where either one is, so "
        "the position it reports comes from content. Both verdicts are right; they answer different questions.",
    ("both", "not equivariant"):
        "position is injected (refused by the certificate) and a probe still reads the slot after shuffling, "
        "alongside the original position that content gives.",
    ("injected", "not equivariant"):
        "position is injected and the slot is what a probe reads; content adds little the probe uses.",
    ("none", "certified"):
        "no positional injection, and at the last layer no position either (neither original nor slot "
        "above the shuffle test's threshold).",
    ("none", "not equivariant"):
        "position is injected somewhere, but at the last layer neither the slot nor the original position "
        "is decodable above the shuffle test's threshold.",
}


def reading_of_verdicts(summary) -> list:
    """``[(model, sentence)]``: what each model's shuffle-test and certificate verdicts mean together.

    A pair that cannot happen (a certified model whose slot a probe reads) is said to be so,
    rather than explained away.

    Examples
    --------
    >>> import pandas as pd
    >>> rows = pd.DataFrame([{"model": "sdt-decay", "shuffle_test": "content", "equivariance": "not equivariant"}])
    >>> reading_of_verdicts(rows)[0][1].startswith("the model does inject")
    True
    """
    if "shuffle_test" not in summary or "equivariance" not in summary:
        return []
    out = []
    for _, row in summary.iterrows():
        pair = (row["shuffle_test"], row["equivariance"])
        if not all(isinstance(v, str) for v in pair):
            continue  # not run for this model (a grid backbone): nothing to read together
        text = _READINGS.get(pair, f"shuffle test '{pair[0]}' with certificate '{pair[1]}' is not expected: a "
                                   "certified model cannot let a probe read the slot; please report it.")
        out.append((row["model"], text))
    return out
