"""``asg-probe report``: one HTML page with every analysis, several checkpoints side by side.

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
import io
from pathlib import Path


def _png(fig, dpi=110) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>"


def _table(frame, max_rows=40) -> str:
    return frame.head(max_rows).to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0,
                                        classes="tbl")


def analyse_model(model, label, images=None, *, num_images=64, img_size=None, batch_size=32, seed=0,
                  device="cpu", progress=True, with_resolution=True):
    """Every analysis of one model, shown as ``label``; returns ``{analysis name: result}``.

    Layerwise probes, attention distance, token embeddings and the shuffle test share
    one :func:`~asg_probe.extract.run_analyses` pass; the options are those of every
    entry point (``images``, ``num_images``, ``img_size``, ``batch_size``, ``seed``,
    ``device``, ``progress``).
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
     "dashed: control task (fixed random permutation of positions). Selectivity = true − control."),
    ("attention_distance", "Mean attention distance",
     "Attention-weighted distance (px) between query and key patches, per head and layer; prefix tokens "
     "excluded and weights renormalised. Dashed line: uniform attention."),
    ("embeddings", "Token-position embeddings", "UMAP of patch tokens, coloured by 2D grid position."),
    ("shuffle_test", "Content or injection?",
     "Patches shuffled: can a probe decode the patch's original position (content) or its slot (injection)?"),
    ("equivariance", "Equivariance certificate",
     "Shuffle the input patches: do outputs shuffle the same way at every layer? (no positional injection)"),
    ("pos_similarity", "Position-embedding similarity", "Cosine similarity between position embeddings."),
    ("resolution", "Resolution transfer", "Probes fit at the training size, evaluated at other sizes."),
]


def build_report(models, out_dir, images=None, *, num_images=64, img_size=None, batch_size=32, seed=0,
                 device="cpu", progress=True, with_resolution=True) -> Path:
    """Analyse ``models`` (list of ``(model, name)``) and write ``report.html`` plus per-model JSON.

    Examples
    --------
    >>> import asg_probe, tempfile, torch
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="ape", depth=1)
    >>> path = build_report([(m, "ape")], tempfile.mkdtemp(), images=torch.randn(10, 3, 32, 32),
    ...                     progress=False, with_resolution=False)
    >>> path.name
    'report.html'
    """
    from .analysis.layerwise import compare_layerwise
    from .results import write_output_set

    out = Path(out_dir)
    all_results, contents = {}, {}  # contents: every file, written as one set at the end
    for model, name in models:
        res = analyse_model(model, name, images, num_images=num_images, img_size=img_size,
                            batch_size=batch_size, seed=seed, device=device, progress=progress,
                            with_resolution=with_resolution)
        all_results[name] = res
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)
        for result in res.values():
            contents[f"{safe}.{result.name}.json"] = result.to_json()
    parts = [f"<h1>asg_probe report</h1><p>{html.escape(datetime.datetime.now().isoformat(timespec='seconds'))}"
             f" — models: {', '.join(html.escape(n) for n in all_results)}; {num_images} images</p>"]
    names = list(all_results)
    parts += [f"<p class='cap'>{html.escape(n)}: {html.escape(all_results[n]['layerwise'].provenance_line())}</p>"
              for n in names]
    if len(names) > 1:
        parts.append("<h2>All models</h2>" + _png(compare_layerwise([all_results[n]["layerwise"] for n in names],
                                                                     labels=names)))
    for key, title, caption in SECTIONS:
        cells = []
        for n in names:
            result = all_results[n].get(key)
            if result is None:
                continue
            extra = f"<p><b>{html.escape(result.verdict())}</b></p>" if hasattr(result, "verdict") else ""
            cells.append(f"<div class='cell'><h3>{html.escape(n)}</h3>{extra}{_png(result.plot())}"
                         f"<details><summary>table</summary>{_table(result.to_frame())}</details></div>")
        if cells:
            parts.append(f"<h2>{title}</h2><p class='cap'>{caption}</p><div class='row'>{''.join(cells)}</div>")
    style = ("<style>body{font-family:sans-serif;margin:24px;max-width:1800px}.row{display:flex;flex-wrap:wrap;"
             "gap:16px}.cell{flex:1 1 420px;max-width:620px}.cell img{max-width:100%}.cap{color:#555}"
             ".tbl{font-size:12px;border-collapse:collapse}.tbl td,.tbl th{padding:2px 6px}</style>")
    contents["report.html"] = (f"<!doctype html><html><head><meta charset='utf-8'><title>asg_probe report</title>"
                               f"{style}</head><body>{''.join(parts)}</body></html>")
    write_output_set(out, contents)
    return out / "report.html"
