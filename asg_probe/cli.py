"""``asg-probe``: layer-by-layer spatial analysis of any ViT checkpoint, from the shell.

Every subcommand prints a readable table, writes JSON + CSV + PNG to ``--out`` and
fails with one line on stderr: exit code 2 for usage errors and bad input, 1 for
checkpoints that cannot be read. Under ``torchrun`` the images are split over the
processes and statistics combined; rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_CHECKPOINT = "guidance"


class UsageError(Exception):
    """Bad command-line input: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _common(p, images=True):
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_CHECKPOINT,
                   help="checkpoint file, training run directory, or bundled reference model name "
                        f"(default: {DEFAULT_CHECKPOINT}; see `asg-probe list`)")
    p.add_argument("--arch", help="architecture for files that don't describe themselves "
                                  "(asg_probe or timm model name)")
    p.add_argument("--pos", help="positional mechanism for files that don't describe themselves")
    p.add_argument("--trust", action="store_true",
                   help="allow arbitrary pickled objects (only for files you trust)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: asg-probe-out/<command>)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for image crops and shuffles (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if images:
        p.add_argument("--images", default=None,
                       help="folder of images (searched recursively), or 'scenes' (procedural scenes); "
                            "default: scenes for bundled reference models, else embedded photographs")
        p.add_argument("--num-images", type=int, default=64, help="number of images (default: 64)")
        p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
        p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")


def build_parser():
    parser = _Parser(prog="asg-probe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("layerwise", help="coordinate probes for every layer (the headline analysis)")
    _common(p)
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds, split by image (default: 5)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to probe (default: all)")
    p.add_argument("--cell-accuracy", action="store_true", help="also per-cell accuracy (second pass)")
    p.add_argument("--fast", action="store_true",
                   help="float32 Gram matrices: ~5%% faster on CPU, but R² can move by ~1e-3 "
                        "(default: float64 throughout)")

    p = sub.add_parser("attention-distance", help="mean attention distance per head and layer")
    _common(p)

    p = sub.add_parser("embeddings", help="UMAP of patch tokens coloured by 2D position")
    _common(p)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers (default: first, middle, last)")

    p = sub.add_parser("pos-similarity", help="cosine similarity of position embeddings (ape, sincos)")
    _common(p, images=False)

    p = sub.add_parser("shuffle-test", help="content or injection? probes on patch-shuffled images")
    _common(p)

    p = sub.add_parser("check-equivariance", help="certify that a model has no positional injection")
    _common(p)
    p.set_defaults(num_images=8)
    p.add_argument("--tol", type=float, default=1e-4, help="relative tolerance (default: 1e-4)")

    p = sub.add_parser("resolution", help="fit probes at one size, evaluate at others")
    _common(p)
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="evaluation sizes (default: 0.5x..2x the training size, multiples of the patch)")

    p = sub.add_parser("attribution", help="captum: which pixels drive a probe's coordinate prediction")
    _common(p)
    p.set_defaults(num_images=32)
    p.add_argument("--layer", type=int, default=-1, help="layer of the probe (default: last)")
    p.add_argument("--patch", type=int, nargs=2, default=None, metavar=("ROW", "COL"),
                   help="query patch (default: grid centre)")
    p.add_argument("--image-index", type=int, default=0, help="which image to explain (default: 0)")

    p = sub.add_parser("report", help="one HTML page with every analysis, several checkpoints side by side")
    p.add_argument("checkpoints", nargs="*", default=None, help="checkpoints or reference names "
                   "(default: all bundled reference models)")
    for action in _common_actions():
        p.add_argument(*action[0], **action[1])

    p = sub.add_parser("list", help="list bundled reference models, architectures and mechanisms")
    return parser


def _common_actions():
    scratch = _Parser()
    _common(scratch)
    out = []
    for a in scratch._actions:
        if a.dest in ("help", "checkpoint"):
            continue
        kw = {"default": a.default, "help": a.help, "dest": a.dest}
        if isinstance(a, argparse._StoreTrueAction):
            kw["action"] = "store_true"
        else:
            kw["type"] = a.type
        out.append((a.option_strings, kw))
    return out


# --------------------------------------------------------------------------- helpers

def _init_distributed():
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return dist.get_rank()


def _is_reference_name(spec) -> bool:
    """A bundled reference model's name, and no file or folder of that name (a path wins)."""
    from .reference import list_reference_models

    return not Path(spec).exists() and spec in list_reference_models()


def load_model(spec, args):
    """Load a checkpoint path or a bundled reference model name."""
    from .checkpoint import load_checkpoint
    from .reference import list_reference_models, reference_path

    path = Path(spec)
    if _is_reference_name(spec):
        path = reference_path(spec)
    elif not path.exists():
        refs = ", ".join(list_reference_models()) or "none installed"
        raise UsageError(f"{spec}: no such file or reference model (reference models: {refs})")
    model = load_checkpoint(path, arch=args.arch, pos=args.pos, trust=args.trust)
    return model, str(spec)


def _out_dir(args):
    return args.out or Path("asg-probe-out") / args.command


def _print_table(result, rank, columns=None):
    if rank != 0:
        return
    frame = result.to_frame()
    if columns:
        frame = frame[[c for c in columns if c in frame.columns]]
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _finish(result, args, rank, columns=None, extra=""):
    if rank != 0:
        return
    _print_table(result, rank, columns)
    paths = result.save(_out_dir(args))
    if extra:
        print(extra)
    print(f"wrote {', '.join(str(p) for p in paths)}")


def _default_images(args):
    """``--images`` as given; if left out, held-out scenes for bundled reference models (the data
    they were trained on: photographs would show little but a domain gap), else the photographs."""
    if args.images is not None:
        return args.images
    from .reference import list_reference_models

    if hasattr(args, "checkpoints"):  # report: no names means every reference model (as cmd_report)
        names = args.checkpoints or list_reference_models()
    else:
        names = [args.checkpoint]
    return "scenes" if all(_is_reference_name(name) for name in names) else None


def _images_kwargs(args):
    return dict(images=_default_images(args), num_images=args.num_images, img_size=args.img_size,
                batch_size=args.batch_size, seed=args.seed, device=args.device,
                progress=not args.no_progress)


# --------------------------------------------------------------------------- commands

def cmd_layerwise(args, rank):
    from .analysis.layerwise import layerwise_probes

    model, name = load_model(args.checkpoint, args)
    result = layerwise_probes(model, layers=args.layers, n_folds=args.folds, cell_accuracy=args.cell_accuracy,
                              exact=not args.fast,
                              checkpoint=name, **_images_kwargs(args))
    cols = ["layer", "r2_row", "r2_col", "r2", "r2_control", "selectivity", "alpha", "cell_accuracy"]
    _finish(result, args, rank, cols, extra=f"{name}: {result.summary_line()}")


def cmd_attention_distance(args, rank):
    from .analysis.attention_distance import attention_distance

    model, name = load_model(args.checkpoint, args)
    result = attention_distance(model, checkpoint=name, **_images_kwargs(args))
    _finish(result, args, rank)


def cmd_embeddings(args, rank):
    from .analysis.embeddings import token_embeddings

    model, name = load_model(args.checkpoint, args)
    result = token_embeddings(model, layers=args.layers, checkpoint=name, **_images_kwargs(args))
    _finish(result, args, rank)


def cmd_pos_similarity(args, rank):
    from .analysis.pos_similarity import pos_similarity

    model, name = load_model(args.checkpoint, args)
    _finish(pos_similarity(model, checkpoint=name), args, rank)


def cmd_shuffle_test(args, rank):
    from .analysis.shuffle import shuffle_test

    model, name = load_model(args.checkpoint, args)
    _finish(shuffle_test(model, checkpoint=name, **_images_kwargs(args)), args, rank)


def cmd_check_equivariance(args, rank):
    from .analysis.shuffle import check_equivariance

    model, name = load_model(args.checkpoint, args)
    kw = _images_kwargs(args)
    kw.pop("progress")
    result = check_equivariance(model, tol=args.tol, checkpoint=name, **kw)
    _finish(result, args, rank, extra=result.verdict())


def cmd_resolution(args, rank):
    from .analysis.resolution import resolution_transfer

    model, name = load_model(args.checkpoint, args)
    _finish(resolution_transfer(model, sizes=args.sizes, checkpoint=name, **_images_kwargs(args)), args, rank)


def cmd_attribution(args, rank):
    from .analysis.attribution import probe_attribution

    model, name = load_model(args.checkpoint, args)
    result = probe_attribution(model, layer=args.layer, patch=args.patch, image_index=args.image_index,
                               checkpoint=name, **_images_kwargs(args))
    _finish(result, args, rank)


def cmd_report(args, rank):
    from .reference import list_reference_models
    from .report import build_report

    specs = args.checkpoints or list_reference_models()
    if not specs:
        raise UsageError("report: no checkpoints given and no reference models installed")
    models = [load_model(s, args) for s in specs]
    path = build_report(models, out_dir=_out_dir(args), **_images_kwargs(args))
    if rank == 0:
        print(f"wrote {path}")


def cmd_list(args, rank):
    from .models import list_models, list_positions
    from .reference import list_reference_models

    print("reference models: " + (", ".join(list_reference_models()) or "none installed"))
    print("architectures:    " + ", ".join(list_models()))
    print("mechanisms:       " + ", ".join(list_positions()))


COMMANDS = {
    "layerwise": cmd_layerwise, "attention-distance": cmd_attention_distance, "embeddings": cmd_embeddings,
    "pos-similarity": cmd_pos_similarity, "shuffle-test": cmd_shuffle_test,
    "check-equivariance": cmd_check_equivariance, "resolution": cmd_resolution,
    "attribution": cmd_attribution, "report": cmd_report, "list": cmd_list,
}


def main(argv=None) -> int:
    from .checkpoint import CheckpointError

    try:
        args = build_parser().parse_args(argv)
        rank = _init_distributed()
        COMMANDS[args.command](args, rank)
        return 0
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        _shutdown_distributed()


def _shutdown_distributed():
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # never mask the command's own exit status
        pass


if __name__ == "__main__":
    sys.exit(main())
