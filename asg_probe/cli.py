"""``asg-probe``: layer-by-layer spatial analysis of any ViT checkpoint, from the shell.

Every subcommand prints a readable table and writes JSON + CSV + PNG to ``--out`` (a set:
a killed run leaves the previous results or the new ones, never a mix). Arguments, the
device and the output folder are checked before any model is loaded. Errors are one line
on stderr (see README, "Error contract"):

- exit 0: done;
- exit 2: usage error (:class:`~asg_probe.errors.UsageError`): fix the command line;
- exit 1: an input that cannot be read (:class:`~asg_probe.errors.InputError`, e.g. a
  truncated checkpoint), or an unexpected error, reported with a hint to rerun with
  ``--debug``, which prints the traceback;
- exit 130: interrupted (Ctrl-C), also once the results are written: one line, no traceback.

Under ``torchrun`` the images are split over the processes and statistics combined; rank 0
prints and writes.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
import traceback
import warnings
from pathlib import Path

from .cli_args import DEFAULT_CHECKPOINT, build_parser, is_reference_name, out_dir, validate
from .errors import AsgProbeError, UsageError

# UsageError and DEFAULT_CHECKPOINT lived here before errors.py / cli_args.py: still importable from here
__all__ = ["main", "build_parser", "load_model", "UsageError", "DEFAULT_CHECKPOINT"]

DEBUG_HINT = "rerun with --debug for the traceback"


# --------------------------------------------------------------------------- helpers

def _init_distributed():
    from .distributed import launcher_environment

    _, world, _ = launcher_environment()  # WORLD_SIZE without a launcher: one line, not a hang
    if world <= 1:
        return 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return dist.get_rank()


def load_model(spec, args):
    """Load a checkpoint path or a bundled reference model name; returns ``(model, name)``."""
    from .checkpoint import load_checkpoint
    from .cli_args import check_checkpoint_spec
    from .reference import reference_path

    check_checkpoint_spec(spec)
    path = reference_path(spec) if is_reference_name(spec) else Path(spec)
    model = load_checkpoint(path, arch=args.arch, pos=args.pos, trust=args.trust)
    return model, str(spec)


def _default_images(args, models=()):
    """``--images`` as given; if left out, held-out scenes when every model was trained on scenes
    (bundled reference models, scene training runs: photographs would show little but a domain
    gap), else the photographs. ``models``: the loaded ``(model, name)`` pairs."""
    if args.images is not None:
        return args.images
    if models:
        from .checkpoint import trained_on_scenes

        return "scenes" if all(trained_on_scenes(m) for m, _ in models) else None
    from .cli_args import checkpoint_specs  # before loading: only reference names are known

    return "scenes" if all(is_reference_name(s) for s in checkpoint_specs(args)) else None


def _images_kwargs(args, models):
    return dict(images=_default_images(args, models), num_images=args.num_images, img_size=args.img_size,
                batch_size=args.batch_size, seed=args.seed, device=args.device,
                progress=not args.no_progress)


def _analyse(args, analysis, **options):
    """Load ``args.checkpoint`` and run ``analysis`` on it with the common image options
    (``options`` add to or override them); returns ``(result, name)``."""
    model, name = load_model(args.checkpoint, args)
    kwargs = {**_images_kwargs(args, [(model, name)]), **options}
    return analysis(model, label=name, **kwargs), name


def _command_line(argv) -> str:
    return shlex.join(["asg-probe", *argv])


def _three_decimals(value) -> str:
    return f"{value:.3f}"


def _small_in_scientific(value) -> str:
    """3 decimals, but scientific notation where 3 decimals would hide the value (errors, tolerances).

    >>> _small_in_scientific(4.7e-1), _small_in_scientific(7.1e-15), _small_in_scientific(0.0)
    ('0.470', '7.1e-15', '0')
    """
    if value == 0:
        return "0"
    return f"{value:.1e}" if abs(value) < 1e-3 else f"{value:.3f}"


def _finish(result, args, rank, columns=None, extra="", frame=None, float_format=_three_decimals):
    """Print the table (``frame``, default ``result.to_frame()``), ``extra`` and the provenance;
    write the result's files (rank 0 only)."""
    if rank != 0:
        return
    result.provenance.setdefault("device", args.device)
    result.provenance["command"] = _command_line(args.argv)
    for line in result.provenance_warnings():
        print(f"warning: {line}", file=sys.stderr)
    frame = result.to_frame() if frame is None else frame
    if columns:
        frame = frame[[c for c in columns if c in frame.columns]]
    print(frame.to_string(index=False, float_format=float_format))
    if extra:
        print(extra)
    print(result.provenance_line())
    out = out_dir(args)
    replaced = result.existing_outputs(out)
    if replaced:
        print(f"overwriting previous results in {out} ({', '.join(p.name for p in replaced)})")
    paths = result.save(out)
    print(f"wrote {', '.join(str(p) for p in paths)}")


# --------------------------------------------------------------------------- commands

def cmd_layerwise(args, rank):
    from .analysis.layerwise import layerwise_probes

    result, name = _analyse(args, layerwise_probes, layers=args.layers, n_folds=args.folds,
                            cell_accuracy=args.cell_accuracy, exact=not args.fast,
                            n_control_seeds=args.control_seeds, tokens=args.tokens,
                            init_baseline=not args.no_init_baseline, n_init_seeds=args.init_seeds)
    cols = ["layer", "r2_row", "r2_col", "r2", "r2_control", "selectivity", "compression_row",
            "compression_col", "r2_init", "r2_gain", "alpha", "cell_accuracy"]
    _finish(result, args, rank, cols, extra=f"{name}: {result.summary_line()}")


def cmd_attention_distance(args, rank):
    from .analysis.attention_distance import attention_distance

    result, _ = _analyse(args, attention_distance)
    _finish(result, args, rank)


def cmd_attention_offsets(args, rank):
    from .analysis.attention_offsets import attention_offsets

    result, name = _analyse(args, attention_offsets, n_folds=args.folds, shuffle_patches=args.shuffle_patches)
    _finish(result, args, rank, frame=result.layer_frame(), extra=f"{name}: {result.summary_line()}")


def cmd_embeddings(args, rank):
    from .analysis.embeddings import token_embeddings

    result, _ = _analyse(args, token_embeddings, layers=args.layers)
    _finish(result, args, rank)


def cmd_pos_similarity(args, rank):
    from .analysis.pos_similarity import pos_similarity

    model, name = load_model(args.checkpoint, args)
    _finish(pos_similarity(model, label=name), args, rank)


def cmd_shuffle_test(args, rank):
    from .analysis.shuffle import shuffle_test

    result, _ = _analyse(args, shuffle_test)
    _finish(result, args, rank)


def cmd_check_equivariance(args, rank):
    from .analysis.equivariance import check_equivariance

    result, _ = _analyse(args, check_equivariance, tol=args.tol, progress=False)  # no bar: its default
    _finish(result, args, rank, extra=result.verdict(), float_format=_small_in_scientific)


def cmd_resolution(args, rank):
    from .analysis.resolution import resolution_transfer

    result, name = _analyse(args, resolution_transfer, sizes=args.sizes, render=False if args.resize else "auto")
    cols = ["layer", "size", "grid", "r2_row", "r2_col", "r2", "r2_row_retained", "r2_col_retained", "r2_retained",
            "is_fit_size"]
    _finish(result, args, rank, cols, extra=f"{name}: {result.summary_line()}")


def cmd_attribution(args, rank):
    from .analysis.attribution import probe_attribution

    result, _ = _analyse(args, probe_attribution, layer=args.layer, patch=args.patch, image_index=args.image_index)
    _finish(result, args, rank)


def cmd_report(args, rank):
    from .cli_args import checkpoint_specs
    from .report import build_report

    models = [load_model(s, args) for s in checkpoint_specs(args)]
    out = out_dir(args)
    if rank == 0 and (out / "report.html").exists():
        print(f"overwriting previous results in {out} (report.html and the per-model JSON)")
    computed_on = {}  # each model's provenance line; warnings (skipped files, fewer images) said once each

    def said(name, results):
        layerwise = results["layerwise"]
        layerwise.provenance.setdefault("device", args.device)
        computed_on[name] = layerwise.provenance_line()
        for line in layerwise.provenance_warnings():
            if rank == 0 and line not in said.warned:
                said.warned.add(line)
                print(f"warning: {line}", file=sys.stderr)
    said.warned = set()

    path = build_report(models, out_dir=out, command=_command_line(args.argv), on_results=said,
                        **_images_kwargs(args, models))
    if rank == 0:
        import pandas as pd

        from .report import number

        summary = pd.read_csv(path.parent / "summary.csv")  # the table the page opens with
        print(summary.to_string(index=False, float_format=lambda v: number(v, tiny=False)))
        lines = set(computed_on.values())
        if len(lines) == 1:
            print(lines.pop())
        else:
            for name, line in computed_on.items():
                print(f"{name}: {line}")
        print(f"wrote {path}, {path.parent / 'summary.csv'} and the per-model JSON")


def cmd_emergence(args, rank):
    import pandas as pd

    from .analysis.emergence import emergence

    # images=None lets emergence pick held-out scenes for scene-trained runs, as elsewhere
    result = emergence(args.runs, args.images, layers=args.layers, num_images=args.num_images,
                       img_size=args.img_size, batch_size=args.batch_size, device=args.device, seed=args.seed,
                       progress=not args.no_progress, threshold=args.threshold, summary_layer=args.summary_layer,
                       max_snapshots=args.max_snapshots)
    frame = pd.DataFrame(result.summary_rows())
    for column in ("first_step_col", "first_step_row"):  # steps are integers; None: never reached
        if column in frame:
            frame[column] = [_step(v) for v in frame[column]]
    layer = frame["layer"].iloc[0] if len(frame) else args.summary_layer
    note = (f"first_step_col / first_step_row: the first snapshot step at which layer {layer}'s column / row "
            f"R² reaches {args.threshold:g}; 'never': no snapshot of that run reached it (a seed group's "
            "mean step is then undefined)")
    _finish(result, args, rank, frame=frame, extra=note)


def _step(value) -> str:
    """A training step for the table: an integer, a seed group's mean to one decimal, or 'never'.

    >>> _step(256.0), _step(200.5), _step(None), _step(float("nan"))
    ('256', '200.5', 'never', 'never')
    """
    if value is None or value != value:
        return "never"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def cmd_erase(args, rank):
    from .analysis.erasure import erase_position

    result, name = _analyse(args, erase_position, layers=args.layers, n_folds=args.folds,
                            n_control_seeds=args.control_seeds)
    cols = ["erase_layer", "rank", "agreement", "agreement_control", "kl", "kl_control", "accuracy_clean",
            "accuracy", "accuracy_control", "relative_change", "relative_change_control", "edit", "edit_control"]
    recovery = result.to_frame()[["erase_layer", "read_layer", "r2", "r2_ci", "r2_control", "r2_clean"]].copy()
    recovery["r2_ci"] = [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in recovery["r2_ci"]]
    extra = "recovery (held-out R² after erasure):\n" + recovery.to_string(
        index=False, float_format=lambda v: f"{v:.3f}") + f"\n{name}: {result.summary_line()}"
    _finish(result, args, rank, cols, extra=extra, frame=result.to_frame("effect"))


def cmd_list(args, rank):
    from .models import list_models, list_positions
    from .reference import list_reference_models

    print("reference models: " + (", ".join(list_reference_models()) or "none installed"))
    print("architectures:    " + ", ".join(list_models()))
    print("mechanisms:       " + ", ".join(list_positions()))


COMMANDS = {
    "layerwise": cmd_layerwise, "attention-distance": cmd_attention_distance, "embeddings": cmd_embeddings,
    "attention-offsets": cmd_attention_offsets,
    "pos-similarity": cmd_pos_similarity, "shuffle-test": cmd_shuffle_test,
    "check-equivariance": cmd_check_equivariance, "resolution": cmd_resolution,
    "attribution": cmd_attribution, "report": cmd_report, "emergence": cmd_emergence, "list": cmd_list,
    "erase": cmd_erase,
}


# --------------------------------------------------------------------------- entry point

def _one_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv=None) -> int:
    """Run ``asg-probe`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Exit codes: 0 done, 2 usage error, 1 unreadable input or unexpected error, 130 interrupted.
    """
    from_shell = argv is None
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    debug = "--debug" in argv  # before parsing succeeds, the raw flag decides
    try:
        with cli_warnings():
            return _main(argv, debug)
    except KeyboardInterrupt:  # Ctrl-C while the process group is taken down: still one line
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if from_shell:
            exit_quietly_on_interrupt()


@contextlib.contextmanager
def cli_warnings():
    """Warnings as the CLI prints them: the plotting and imaging libraries' own (fonts, layout,
    palette modes) silenced, since they say nothing about the results; every other warning one
    ``warning:`` line, like the CLI's own."""
    with warnings.catch_warnings():
        for module in ("matplotlib", "PIL"):
            warnings.filterwarnings("ignore", module=rf"{module}(\..*)?$")
        warnings.showwarning = _show_warning
        yield


def exit_quietly_on_interrupt() -> None:
    """From here on, Ctrl-C ends the process with exit code 130 and one line, not a traceback.

    Called once the command's work is done (its files are written and synced): an interrupt
    while the interpreter shuts down (thread pools, progress bars, atexit) would otherwise
    print a traceback. Only from the shell's entry point, never in a caller's process.
    """
    import signal

    def stop(signum, frame):
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.write("error: interrupted\n")
            sys.stderr.flush()
        os._exit(130)

    with contextlib.suppress(ValueError):  # not the main thread: leave Python's handler
        signal.signal(signal.SIGINT, stop)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {_one_line(message)}", file=sys.stderr)


def _main(argv, debug) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv, debug = argv, getattr(args, "debug", debug)
        validate(args)  # device, output folder, options: before any model is loaded or image read
        rank = _init_distributed()
        COMMANDS[args.command](args, rank)
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except AsgProbeError as exc:  # UsageError (2), InputError and CheckpointError (1): the message says what to do
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug (ours or a dependency's): say so, keep the traceback one flag away
        if debug:
            traceback.print_exc()
            print(f"error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        else:
            print(f"error: {type(exc).__name__}: {_one_line(exc)} ({DEBUG_HINT})", file=sys.stderr)
        return 1
    finally:
        _shutdown_distributed()


def _shutdown_distributed():
    if "torch" not in sys.modules:  # nothing started (help, a usage error): don't import torch to say so
        return
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # never mask the command's own exit status
        pass


if __name__ == "__main__":
    sys.exit(main())
