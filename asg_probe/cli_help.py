"""What ``asg-probe COMMAND --help`` says: a paragraph, examples, and what the printed columns mean.

Kept apart from the parser (:mod:`asg_probe.cli_args`) so that the words can be read and
changed in one place, and imported without torch: help must be instant. Columns are
explained by pattern (``r2*``, ``*_ci``, ``selectivity*``), not field by field, so that a
new field of the same kind is covered without editing this file.

Examples
--------
>>> text = epilog("layerwise")
>>> "examples:" in text and "asg-probe layerwise ape" in text and "alpha" in text
True
>>> sorted(COMMAND_HELP) == sorted(set(COMMAND_HELP))
True
"""
from __future__ import annotations

__all__ = ["COMMAND_HELP", "description", "epilog", "TOP_EPILOG"]

# Columns several commands share, explained once.
_R2 = ("r2_row, r2_col, r2: held-out R² of a ridge probe that reads the patch's (row, col) from its token "
       "(1 = exact, 0 = no better than the mean position); r2 averages row and column")
_CI = "*_ci: 95% interval of the quantity before _ci"
_CONTROL = ("r2_control*: the same probe fitted on a control task (a random relabelling of the positions; see "
            "README, 'coordinate probes'); selectivity* = r2 minus the matching control's R², i.e. what the "
            "true positions add over that control")

COMMAND_HELP = {
    "layerwise": dict(
        description=(
            "Coordinate probes for every layer, the headline analysis. A ridge probe per layer reads each "
            "patch's (row, col) from its token, cross-validated with folds split by image, with the "
            "regularisation chosen per fold; controls fitted the same way say how much of the R² the true "
            "positions explain. Tokens are never stored: statistics stream during one forward pass."),
        examples=["asg-probe layerwise                              # the bundled guidance model on 64 held-out scenes",
                  "asg-probe layerwise ape --num-images 256 --out out/ape",
                  "asg-probe layerwise run_dir/ --images photos/ --img-size 224 --layers 0 6 11"],
        columns=["layer: 0 = tokens entering block 1 (patch embedding plus any injection), i = output of block i",
                 _R2, _CONTROL, _CI,
                 "alpha: ridge regularisation strength chosen by cross-validation (larger = smoother probe)",
                 "cell_accuracy: fraction of patches whose rounded prediction is the right cell (--cell-accuracy)"]),
    "attention-distance": dict(
        description=(
            "Mean attention distance per head and layer (the ViT paper's measure): the average distance, in "
            "pixels and in patches, between a query patch and the patches it attends to, weighted by attention. "
            "Read from the model's own attention, fused kernels included."),
        examples=["asg-probe attention-distance",
                  "asg-probe attention-distance sdt-decay --num-images 32",
                  "asg-probe attention-distance vit.pt --arch vit_small_patch16_224 --images photos/"],
        columns=["distance_px: mean attention distance of that head in input pixels",
                 "distance_grid: the same in patches (distance_px / patch size)"]),
    "attention-offsets": dict(
        description=(
            "Position in attention scores rather than in tokens. For every layer and head, the offset kernel: "
            "the part of the attention logit that depends only on the 2-D offset (key - query) between patches, "
            "fitted with a free constant per query, and offset_r2, the share of the within-query logit variance "
            "it explains. Relative mechanisms (RoPE, ALiBi-2D, SDT's decay) put position here even when their "
            "tokens carry none. --shuffle-patches is the control: offsets measured between slots of shuffled "
            "patches keep the mechanism's own offset structure and remove what neighbouring patches share."),
        examples=["asg-probe attention-offsets sdt-decay",
                  "asg-probe attention-offsets sdt-decay --shuffle-patches --num-images 128",
                  "asg-probe attention-offsets vit.pt --arch vit_small_patch16_224 --images photos/"],
        columns=["layer: block whose attention is read (1 = first block)",
                 "offset_r2: share of the within-query variance of the patch-to-patch logits explained by the "
                 "offset alone, on all images (in-sample)",
                 "offset_r2_heldout, heldout_low, heldout_high: the same with the kernel fitted on the other folds "
                 "of images, and its 95% interval over folds"]),
    "erase": dict(
        description=(
            "Does the model use the position its tokens carry? At each erase layer, LEACE (Belrose et al. 2023) "
            "removes every linearly decodable trace of (row, col) from the patch tokens, fitted on half of the "
            "images; the other half runs with the eraser applied in the residual stream. Recovery: the "
            "coordinate probe at that layer and every later one (does position come back?). Effect: how much "
            "the output changes. Control: erasing a random subspace of the same rank, same centring; an effect "
            "means something only beside it. Non-linear position survives a linear eraser."),
        examples=["asg-probe erase ape --layers 0",
                  "asg-probe erase guidance",
                  "asg-probe erase vit.pt --arch vit_small_patch16_224 --images photos/ --layers 0 6 -1"],
        columns=["erase_layer: where position is erased (0 = tokens entering block 1); rank: the eraser's rank",
                 "agreement: top-1 agreement of the erased model with the unerased one (1 = unchanged)",
                 "kl: mean KL divergence of the output distribution from the unerased one",
                 "accuracy*: accuracy with labels (clean, erased); relative_change: for a headless model, the "
                 "relative norm change of the final tokens; edit: how far the eraser moved the tokens",
                 "*_control: the same with a random subspace of equal rank erased instead",
                 "recovery table: " + _R2 + "; r2_clean: the same without erasure"]),
    "embeddings": dict(
        description=(
            "A 2-D UMAP map of the patch tokens of a few layers, each point coloured by its grid position, "
            "and one score per layer saying how spatially organised the map is."),
        examples=["asg-probe embeddings",
                  "asg-probe embeddings ape --layers 0 4",
                  "asg-probe embeddings run_dir/ --num-images 32 --out out/emb"],
        columns=["position_score: correlation between a token's (row, col) and the mean position of its nearest "
                 "neighbours from other images in the 2-D map: about 0 = no spatial organisation, 1 = perfect "
                 "(_row/_col: per coordinate; _features: the same on the 50 PCA features instead of the map)",
                 "r2_knn_row, r2_knn_col: R² of that neighbour prediction (also penalises a shrunk map)",
                 "n_tokens: tokens sampled for the map"]),
    "pos-similarity": dict(
        description=(
            "Cosine similarity of each position's embedding with every other (the ViT paper's figure). Needs "
            "a model whose position lives in an embedding table: learned (ape, most timm ViTs) or sin-cos; "
            "models without one (none, guidance, rotary or relative mechanisms) are refused with one line. "
            "No images are read."),
        examples=["asg-probe pos-similarity                          # the bundled ape model",
                  "asg-probe pos-similarity timm:vit_base_patch16_224.augreg2_in21k_ft_in1k",
                  "asg-probe pos-similarity run_dir/ --out out/pos"],
        columns=["distance_grid: Euclidean distance between two positions, in patches (rounded to 0.5)",
                 "mean_cos: mean cosine similarity of the embeddings of positions that far apart"]),
    "shuffle-test": dict(
        description=(
            "Content or injection? The patches of each image are shuffled before the model sees them, and "
            "probes read either the patch's original position (known only from content) or the slot it now "
            "occupies (known only from an injection). A model without positional injection decodes only the "
            "original position."),
        examples=["asg-probe shuffle-test",
                  "asg-probe shuffle-test ape --num-images 128",
                  "asg-probe shuffle-test run_dir/ --images photos/"],
        columns=["r2_unshuffled: probe R² on the images as they are",
                 "r2_original: R² for each shuffled patch's original position (content)",
                 "r2_slot: R² for the slot it was moved to (injection); _row/_col: per coordinate",
                 "source: content (only r2_original above 0.2), injected (only r2_slot), both, or none"]),
    "check-equivariance": dict(
        description=(
            "Certify (or refute) that a model injects no position: shuffle the input patches and check, at "
            "every layer, in float64, that the output tokens are shuffled the same way, within a tolerance "
            "derived from float64 rounding and depth. Only mechanisms that inject nothing (none, and guidance, "
            "which is a training loss) can pass; ape, sincos and every relative mechanism (rope-*, alibi2d, "
            "relpos, rmt-decay, sdt-decay) make attention a function of slot geometry and are refused, "
            "correctly."),
        examples=["asg-probe check-equivariance                      # guidance: CERTIFIED",
                  "asg-probe check-equivariance sdt-decay            # NOT equivariant: the decay depends on slots",
                  "asg-probe check-equivariance asg_checkpoint.pth --num-images 16 --tol 1e-10"],
        columns=["max_rel_error: largest |shuffled output - shuffled reference| over the largest |reference| "
                 "entry (scientific notation: certified models sit near 1e-16)",
                 "tol: that layer's tolerance; equivariant: max_rel_error <= tol"]),
    "resolution": dict(
        description=(
            "Resolution transfer: probes are fitted at the model's input size and scored at other sizes. "
            "Procedural scenes are rendered afresh at each size; other images are resized (--resize resizes "
            "scenes too). The size_source field of the JSON records which."),
        examples=["asg-probe resolution",
                  "asg-probe resolution ape --sizes 16 32 64",
                  "asg-probe resolution run_dir/ --images photos/ --resize"],
        columns=["size, grid: evaluation input size and its patch grid; is_fit_size: the size the probe was fit at",
                 _R2, "*_retained: R² at that size over the same layer's R² at the fit size"]),
    "attribution": dict(
        description=(
            "Which pixels drive a probe's coordinate prediction for one patch of one image (captum integrated "
            "gradients through the model and the fitted probe of one layer)."),
        examples=["asg-probe attribution",
                  "asg-probe attribution ape --layer 0 --patch 3 4",
                  "asg-probe attribution run_dir/ --image-index 2 --out out/attr"],
        columns=["target: row or col; true, predicted, error: the patch's coordinate and the probe's prediction",
                 "probe_r2: held-out R² of the probe explained",
                 "fraction_in_patch: share of the absolute attribution inside the query patch",
                 "convergence_delta: captum's completeness error (small = reliable attribution)"]),
    "report": dict(
        description=(
            "One HTML page with every analysis for several checkpoints side by side: a summary table, "
            "layerwise probes, attention distance, embeddings, shuffle test and equivariance certificate, "
            "figures embedded, raw tables folded away. Also writes summary.csv and each model's JSON."),
        examples=["asg-probe report                                  # every bundled reference model",
                  "asg-probe report none ape guidance --num-images 32 --out report/",
                  "asg-probe report run_a/ run_b/ --images photos/"],
        columns=["the summary: last-layer R² and its control, selectivity, mean attention distance, and the "
                 "shuffle and equivariance verdicts per model (the page explains each)"]),
    "emergence": dict(
        description=(
            "Probes and attention distance over the training snapshots of one or more runs (train with "
            "snapshot_every=N or snapshot_schedule=log): when does position become decodable?"),
        examples=["asg-probe emergence runs/guidance runs/none",
                  "asg-probe emergence runs/guidance_s0 runs/guidance_s1 --threshold 0.3 --num-images 64",
                  "asg-probe emergence runs/guidance --max-snapshots 8 --summary-layer 2"],
        columns=["first_step_col, first_step_row: first training step at which that coordinate's R² reaches "
                 "--threshold; 'never': no snapshot reached it",
                 "final_*: the values at the last snapshot; seed groups give mean and 95% interval over seeds"]),
    "list": dict(
        description="List the bundled reference models, the architectures and the positional mechanisms.",
        examples=["asg-probe list"], columns=[]),
}

TOP_EPILOG = """\
examples:
  asg-probe list                                  bundled models, architectures, mechanisms
  asg-probe layerwise                             probe the bundled guidance model on held-out scenes
  asg-probe report none ape guidance --out rep/   several models side by side in one HTML page
  asg-probe COMMAND --help                        what a command does, its examples and columns

Each command prints a table and a `computed on:` line and writes JSON + CSV + PNG to --out.
Exit codes: 0 done, 2 usage error, 1 unreadable input or unexpected error, 130 interrupted."""


def description(command: str) -> str | None:
    """The one-paragraph description of ``command`` (``None`` for a command not written up yet:
    its help still works; tests/test_cli_help.py asks for the paragraph)."""
    return COMMAND_HELP.get(command, {}).get("description")


def epilog(command: str) -> str | None:
    """Examples and the column key of ``command``, laid out for argparse's RawDescriptionHelpFormatter."""
    import textwrap

    info = COMMAND_HELP.get(command)
    if info is None:
        return None
    lines = ["examples:"] + [f"  {e}" for e in info["examples"]]
    if info["columns"]:
        lines += ["", "printed columns:"]
        for text in info["columns"]:
            lines += textwrap.wrap(text, width=96, initial_indent="  ", subsequent_indent="      ",
                                   break_on_hyphens=False)
    return "\n".join(lines)
