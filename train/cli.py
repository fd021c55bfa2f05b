"""``asg-train`` / ``python -m asg_train``: resolve the config, then train one run per seed.

    asg-train --config train/configs/cpu_scenes_none.yaml out=runs/none max_steps=300 device=cpu seed=0
    asg-train --config cpu_scenes_none out=runs/none   # a packaged recipe by name, from any folder
    asg-train --list-recipes
    asg-train --config ... seeds=[0,1,2]           # one run dir per seed + summary.{csv,md,json}
    asg-train --resume runs/none                   # continue from runs/none/train_state.pt
    asg-train --config ... out=runs/none --resume  # the same, from the original command
    asg-train --config ... out=runs/none --overwrite   # replace the run in runs/none

A folder that holds a run is refused without ``--resume`` or ``--overwrite``, and a folder
another ``asg-train`` is writing is refused (see :mod:`asg_train.rundir`).

Exit codes (asg-probe's contract): 0 done; 2 a configuration error (:class:`ConfigError`, an
``asg_probe.errors.UsageError``: one line on stderr, before any work starts); 1 an input that
cannot be read, or anything unexpected (one line; the traceback with ``--debug``); 3 the loss
became non-finite; 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from asg_probe.errors import AsgProbeError

from . import config as config_mod


def _epilog() -> str:
    """Examples, then every config key with the comment it has in the packaged default.yaml."""
    import textwrap

    lines = ["examples:",
             "  asg-train --list-recipes                                   # the packaged recipes",
             "  asg-train --config cpu_scenes_guidance out=runs/g          # a recipe by name, from any folder",
             "  asg-train --config cpu_scenes_none seeds=[0,1,2] device=cpu",
             "  asg-train --config in100_vits16_ape data.root=/data/in100 --print-config",
             "",
             "overrides: key=value, nested keys with dots (optim.lr=1e-4), lists as seeds=[0,1,2].",
             f"config keys (defaults and comments: {config_mod.DEFAULTS}):"]
    defaults = config_mod.flatten(config_mod.load_yaml(config_mod.DEFAULTS))
    for key, comment in config_mod.key_comments():
        if not comment and key in defaults:  # no comment: the default value says what kind of value it takes
            comment = f"default: {defaults[key]}"
        text = f"{key:<28} {comment}".rstrip()
        lines += textwrap.wrap(text, width=100, initial_indent="  ", subsequent_indent=" " * 31,
                               break_on_hyphens=False) or [f"  {key}"]
    return "\n".join(lines)


def _parser():
    p = argparse.ArgumentParser(
        prog="asg-train", description="Train ViTs with a positional mechanism under the matched ASG protocol.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="RECIPE",
                   help="recipe: a YAML path, or the name of a packaged recipe (see --list-recipes)")
    p.add_argument("--list-recipes", action="store_true", help="list the packaged recipes and exit")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue a run: from RUN_DIR's saved config, or from out= of --config")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in out= (its files are removed before training starts)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def resolve_from_args(args) -> dict:
    if isinstance(args.resume, str):
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise config_mod.ConfigError(f"--resume {run_dir}: no config.yaml there (is it a run directory?)")
        base = config_mod.load_yaml(saved)
        return config_mod.resolve(recipe=args.config, base=base, overrides=list(args.overrides) + [f"out={run_dir}"])
    if args.config is None:
        raise config_mod.ConfigError("pass --config RECIPE (a name from asg-train --list-recipes, or a YAML path), "
                                     "or --resume RUN_DIR")
    return config_mod.resolve(recipe=args.config, overrides=args.overrides)


def seed_runs(cfg: dict) -> list[dict]:
    """One config per seed: ``seeds=[0,1,2]`` → ``<out>/seed0``, ``<out>/seed1``, ..."""
    if not cfg["seeds"]:
        return [cfg]
    runs = []
    for seed in cfg["seeds"]:
        one = config_mod.merge(cfg, {"seed": seed, "seeds": None, "out": str(Path(cfg["out"]) / f"seed{seed}")})
        runs.append(one)
    return runs


def main(argv=None) -> int:
    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        if args.overwrite and args.resume is not None:
            raise config_mod.ConfigError("--overwrite and --resume contradict each other; pass one")
        return _main(args, argv)
    except AsgProbeError as exc:  # ConfigError and other usage errors: 2; unreadable inputs: 1
        print(f"asg-train: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("asg-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment failure: one line unless --debug
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"asg-train: error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        try:
            if "torch" in sys.modules:  # nothing ran (--list-recipes, a config error): no torch import to say so
                from .dist import cleanup

                cleanup()
        finally:
            if from_shell:  # the work is done: a Ctrl-C while Python shuts down is exit 130, no traceback
                from asg_probe.cli import exit_quietly_on_interrupt

                exit_quietly_on_interrupt()


def print_recipes() -> None:
    names = config_mod.list_recipes()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {config_mod.recipe_summary(name)}".rstrip())
    print(f"({len(names)} recipes in {config_mod.CONFIG_DIR}; use asg-train --config NAME)")


def _main(args, argv) -> int:
    if args.list_recipes:
        print_recipes()
        return 0
    cfg = resolve_from_args(args)
    if args.print_config:
        print(config_mod.dump(cfg), end="")
        return 0

    from .summary import write_seed_summary
    from .trainer import EXIT_NONFINITE, NonFiniteLoss, run  # heavy imports only once the config is good

    command = "asg-train " + " ".join(shlex.quote(a) for a in argv)
    summaries = []
    try:
        for one in seed_runs(cfg):
            summaries.append(run(one, resume=args.resume is not None, command=command, overwrite=args.overwrite))
    except NonFiniteLoss as exc:
        print(f"asg-train: stopped: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    if cfg["seeds"] and summaries:
        if int(os.environ.get("RANK", "0")) == 0:
            table = write_seed_summary(cfg["out"], summaries)
            print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
