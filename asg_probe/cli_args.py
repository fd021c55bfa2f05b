"""The ``asg-probe`` argument parser and the checks that run before anything is loaded.

Shared options come from small parent parsers (one per concern: model file, run, images),
so every subcommand that takes, say, ``--images`` gets the same flag with the same help.
:func:`validate` then checks what argparse cannot (the device exists, the output folder is
writable, ``--pos`` applies to the architecture) and raises :class:`~asg_probe.errors.UsageError`
with one line saying what to change, before a model is loaded or an image read.

Examples
--------
>>> args = build_parser().parse_args(["layerwise", "ape", "--num-images", "8"])
>>> args.command, args.checkpoint, args.num_images, args.batch_size
('layerwise', 'ape', 8, 32)
>>> build_parser().parse_args(["check-equivariance"]).num_images
8
"""
from __future__ import annotations

import argparse
import os
import tempfile
import textwrap
from pathlib import Path

from . import cli_help
from .errors import UsageError

DEFAULT_CHECKPOINT = "guidance"
POS_SIMILARITY_DEFAULT = "ape"  # pos-similarity needs a position table; the bundled ape model has one
DESCRIPTION = "layer-by-layer spatial analysis of any ViT checkpoint, from the shell"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _int_at_least(minimum: int, what: str, maximum: int | None = None):
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``), with a message that says so."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "0 or more")
# Memory of an analysis grows with the token count squared (attention): a 2048-px image already
# has 16384 tokens at patch 16. Larger sizes are refused before anything is loaded.
MAX_IMG_SIZE = 2048
image_size = _int_at_least(1, "a positive integer", maximum=MAX_IMG_SIZE)


def positive_float(text):
    """An argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not value > 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


# --------------------------------------------------------------------------- parent parsers

def _debug_parent():
    p = _Parser(add_help=False)
    # SUPPRESS: a subcommand without --debug must not reset a `asg-probe --debug CMD` given before it
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an unexpected error, print the full traceback")
    return p


def _checkpoint_parent(default=DEFAULT_CHECKPOINT):
    # a fresh parent per default, for the reason given in _images_parent
    p = _Parser(add_help=False)
    p.add_argument("checkpoint", nargs="?", default=default,
                   help="checkpoint file, training run directory, bundled reference model name, hf:ORG/NAME "
                        f"or timm:NAME (default: {default}; see `asg-probe list`)")
    return p


def _model_parent():
    p = _Parser(add_help=False)
    p.add_argument("--arch", help="architecture for files that don't describe themselves "
                                  "(asg_probe or timm model name)")
    p.add_argument("--pos", help="positional mechanism for files that don't describe themselves "
                                 "(asg_probe architectures only; see `asg-probe list`)")
    p.add_argument("--trust", action="store_true",
                   help="allow arbitrary pickled objects (only for files you trust)")
    return p


def _run_parent(seed=True):
    p = _Parser(add_help=False)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: asg-probe-out/<command>); earlier results of the same "
                        "command there are replaced, and the command says so")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: %(default)s)")
    if seed:  # only where something is random (images, shuffles)
        p.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed for image crops and shuffles (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _images_parent(num_images=64):
    # a fresh parent per default: argparse shares Action objects between a parent and its
    # children, so set_defaults on one subcommand would change the others' defaults and help
    p = _Parser(add_help=False)
    p.add_argument("--images", default=None,
                   help="folder of images (searched recursively), or 'scenes' (procedural scenes); default: "
                        "held-out scenes for models trained on scenes (bundled reference models, scene "
                        "training runs), else embedded photographs")
    p.add_argument("--num-images", type=positive_int, default=num_images,
                   help="number of images (default: %(default)s)")
    p.add_argument("--img-size", type=image_size, default=None, help="input size (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="images per forward pass (default: %(default)s)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``asg-probe`` parser: one subparser per command, shared flags from parent parsers."""
    parser = _Parser(prog="asg-probe", description=DESCRIPTION, epilog=cli_help.TOP_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", default=False,
                        help="on an unexpected error, print the full traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    debug, ckpt, model, run = _debug_parent(), _checkpoint_parent(), _model_parent(), _run_parent()

    def command(name, help, *, images=64, checkpoint=True, model_file=True):
        ckpt_parent = ckpt if checkpoint is True else _checkpoint_parent(checkpoint)
        parents = ([debug] + ([ckpt_parent] if checkpoint else []) + ([model] if model_file else [])
                   + [run if images else _run_parent(seed=False)])
        if images:
            parents.append(_images_parent(images))
        # description and examples as written (RawDescription), wrapped here to the terminal's habit
        return sub.add_parser(name, help=help, parents=parents, epilog=cli_help.epilog(name),
                              description=textwrap.fill(cli_help.description(name) or help, width=96),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("layerwise", "coordinate probes for every layer (the headline analysis)")
    p.add_argument("--folds", type=_int_at_least(2, "at least 2"), default=5,
                   help="cross-validation folds, split by image (default: %(default)s)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to probe (default: all)")
    p.add_argument("--cell-accuracy", action="store_true", help="also per-cell accuracy (second pass)")
    p.add_argument("--fast", action="store_true",
                   help="float32 Gram matrices: ~5%% faster on CPU, but R² can move by ~1e-3 "
                        "(default: float64 throughout)")
    p.add_argument("--control-seeds", type=_int_at_least(1, "at least 1"), default=5,
                   help="permutations of the slot control, averaged (default: %(default)s)")
    p.add_argument("--tokens", choices=("pre_norm", "post_norm"), default="pre_norm",
                   help="probe each layer's tokens before or after the model's final norm (default: %(default)s)")
    p.add_argument("--no-init-baseline", action="store_true",
                   help="skip the random-initialisation baseline (r2_init, r2_gain: one more forward pass per "
                        "init seed)")
    p.add_argument("--init-seeds", type=_int_at_least(1, "at least 1"), default=3,
                   help="freshly initialised copies of the model in the baseline (default: %(default)s)")

    command("attention-distance", "mean attention distance per head and layer")

    p = command("attention-offsets", "position in attention scores: offset kernel and offset R² per head")
    p.add_argument("--folds", type=_int_at_least(1, "at least 1"), default=5,
                   help="folds of images for the held-out offset R² and its interval (default: %(default)s)")
    p.add_argument("--shuffle-patches", action="store_true",
                   help="control: shuffle each image's patches and measure offsets between slots (content "
                        "adjacency removed, the mechanism's own offset structure kept)")

    p = command("embeddings", "UMAP of patch tokens coloured by 2D position")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers (default: first, middle, last)")

    # its own default: the bundled model with a position table (guidance has none)
    command("pos-similarity", "cosine similarity of position embeddings (ape, sincos)", images=None,
            checkpoint=POS_SIMILARITY_DEFAULT)
    command("shuffle-test", "content or injection? probes on patch-shuffled images")

    p = command("check-equivariance", "certify that a model has no positional injection", images=8)
    p.add_argument("--tol", type=positive_float, default=None,
                   help="one relative tolerance for all layers (default: float64 rounding floor x depth)")

    p = command("resolution", "fit probes at one size, evaluate at others")
    p.add_argument("--sizes", type=image_size, nargs="+", default=None,
                   help="evaluation sizes (default: 0.5x..2x the training size, multiples of the patch)")
    p.add_argument("--resize", action="store_true",
                   help="make every size by resizing the images loaded at the largest size (default: scenes "
                        "are rendered at each size, other images resized)")

    p = command("attribution", "captum: which pixels drive a probe's coordinate prediction", images=32)
    p.add_argument("--layer", type=int, default=-1, help="layer of the probe (default: last)")
    p.add_argument("--patch", type=non_negative_int, nargs=2, default=None, metavar=("ROW", "COL"),
                   help="query patch (default: grid centre)")
    p.add_argument("--image-index", type=non_negative_int, default=0,
                   help="which image to explain (default: %(default)s)")

    p = command("report", "one HTML page with every analysis, several checkpoints side by side",
                checkpoint=False)
    p.add_argument("checkpoints", nargs="*", default=None, help="checkpoints or reference names "
                   "(default: all bundled reference models)")

    p = command("emergence", "probes and attention distance over the training snapshots of runs",
                checkpoint=False, model_file=False)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="training run folders with snapshots/ (train with snapshot_every=N)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to probe (default: all)")
    p.add_argument("--threshold", type=positive_float, default=0.5,
                   help="column R² a layer must reach for the summary's first step (default: %(default)s)")
    p.add_argument("--summary-layer", type=int, default=-1,
                   help="layer the summary and curves use (default: %(default)s, the last)")
    p.add_argument("--max-snapshots", type=_int_at_least(2, "at least 2"), default=None,
                   help="analyse at most this many snapshots per run, spread over the run (default: all)")

    # 128 images: about 64 fit the eraser, whose held-out error shrinks with fit tokens per channel
    p = command("erase", "does the model use its position? LEACE erasure: recovery and output effect vs. a "
                         "random-subspace control", images=128)
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layers to erase position at (default: all; 0 = patch embedding, negative from the end)")
    p.add_argument("--folds", type=_int_at_least(2, "at least 2"), default=5,
                   help="cross-validation folds of the recovery probes, split by image (default: %(default)s)")
    p.add_argument("--control-seeds", type=_int_at_least(1, "at least 1"), default=3,
                   help="random subspaces of the control, averaged (default: %(default)s)")

    sub.add_parser("list", help="list bundled reference models, architectures and mechanisms", parents=[debug],
                   description=cli_help.description("list"), epilog=cli_help.epilog("list"),
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


# --------------------------------------------------------------------------- validation

def is_reference_name(spec) -> bool:
    """A bundled reference model's name, and no file or folder of that name (a path wins)."""
    from .reference import list_reference_models

    return not Path(spec).exists() and spec in list_reference_models()


def checkpoint_specs(args) -> list:
    """The checkpoints a command reads (``report`` without names: every reference model)."""
    if args.command == "list":
        return []
    if args.command == "report":
        from .reference import list_reference_models

        specs = args.checkpoints or list_reference_models()
        if not specs:
            raise UsageError("report: no checkpoints given and no reference models installed")
        return specs
    if args.command == "emergence":
        return args.runs
    return [args.checkpoint]


def out_dir(args) -> Path:
    return args.out or Path("asg-probe-out") / args.command


def check_device(spec: str) -> None:
    """Raise UsageError unless ``spec`` names a device this machine has."""
    if spec == "cpu":  # the default needs no torch: argument errors and help stay instant
        return
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec}: not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {spec}: no CUDA GPU is available on this machine; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {spec}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {spec}: Apple MPS is not available on this machine; use --device cpu")
        return
    raise UsageError(f"--device {spec}: {device.type!r} devices are not supported; use cpu, cuda or mps")


def check_out_dir(out: Path, recover: bool = True) -> None:
    """Raise UsageError unless results can be written into folder ``out`` (created if missing).

    Tried by creating and removing a file in the deepest folder that exists, so a read-only
    file system or a missing permission is found before the computation, not after it. With
    ``recover``, what a killed earlier write left in ``out`` is finished or discarded
    (:func:`asg_probe.results.recover_output_set`).
    """
    out = Path(out)
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        what = "is an existing file" if existing == out else f"is below {existing}, which is a file"
        raise UsageError(f"--out {out} {what}; give a folder path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".asg-probe-write-test.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write in {existing} ({exc.strerror or exc}); "
                         "choose another folder with --out") from None
    if recover and existing == out:
        from .results import recover_output_set

        recover_output_set(out)


def check_model_options(arch, pos) -> None:
    """``--arch`` must name a model; ``--pos`` applies only to asg_probe architectures."""
    from .models import list_models, list_positions

    if pos is not None and pos not in list_positions():
        raise UsageError(f"--pos {pos}: unknown mechanism; choose one of {', '.join(list_positions())}")
    if arch is None or arch in list_models():
        return
    import timm

    if not timm.is_model(arch):
        raise UsageError(f"--arch {arch}: neither an asg_probe architecture ({', '.join(list_models())}) "
                         "nor a timm model name")
    if pos is not None:
        raise UsageError(f"--pos applies only to asg_probe architectures ({', '.join(list_models())}); "
                         f"{arch} is a timm model, whose position handling timm fixes: drop --pos")


NAMED_PREFIXES = ("hf:", "timm:", "open_clip:")  # models named, not stored: the loader looks in the local caches


def check_checkpoint_spec(spec) -> None:
    """A file or folder, a bundled reference model, or a ``hf:``/``timm:`` name; else UsageError."""
    if is_reference_name(spec) or Path(spec).exists() or str(spec).startswith(NAMED_PREFIXES):
        return
    if str(spec).startswith(("hf:", "timm:")):  # named models; load_checkpoint says if not cached
        return
    from .reference import list_reference_models

    refs = ", ".join(list_reference_models()) or "none installed"
    raise UsageError(f"{spec}: no such file or reference model (reference models: {refs}; "
                     "or hf:ORG/NAME, timm:NAME, open_clip:ARCH[:TAG])")


def check_images(images) -> None:
    if images is None or images == "scenes" or Path(images).expanduser().exists():
        return
    raise UsageError(f"--images {images}: no such file or folder (give an image folder, or 'scenes')")


def validate(args) -> None:
    """Every check that needs no model and no image; raises UsageError with one line."""
    if args.command == "list":
        return
    check_device(args.device)
    check_model_options(getattr(args, "arch", None), getattr(args, "pos", None))
    for spec in checkpoint_specs(args):
        check_checkpoint_spec(spec)
    check_images(getattr(args, "images", None))
    # under torchrun only rank 0 writes, so only rank 0 tidies the folder
    check_out_dir(out_dir(args), recover=os.environ.get("RANK", "0") == "0")
