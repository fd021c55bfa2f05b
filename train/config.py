"""Configuration: packaged defaults ← recipe YAML (with ``base:`` inheritance) ← ``key=value``.

Every key that a recipe or the command line sets must already exist in
``configs/default.yaml``; a typo is a one-line :class:`ConfigError` naming the key and
its close matches, raised before any data is touched or any model is built.
``model.kwargs`` is the one free-form mapping (it is forwarded to ``create_model``, and
checked by building the model on the ``meta`` device: no memory, no weights).

Values are validated in one layer (:func:`validate`): every value has its default's type
(an integer where the default is one, a number where it is a float), every number anywhere in
the config is finite, and the keys with a range have it checked (``seed >= 0``, ``threads``
null or >= 1, ``data.eval_crop_ratio >= 1``, ``optim.lr > 0``, ...).
"""
from __future__ import annotations

import copy
import difflib
import functools
from pathlib import Path

import yaml

from asg_probe.errors import UsageError

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULTS = CONFIG_DIR / "default.yaml"
# Mappings whose sub-keys are not checked against the defaults.
FREE_FORM = {"model.kwargs"}


class ConfigError(UsageError):
    """A configuration problem; the message is one line that says what to change (exit code 2)."""


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def list_recipes() -> list[str]:
    """Names of the recipes that ship with the package (``train/configs``, installed as ``asg_train/configs``).

    Examples
    --------
    >>> "cpu_scenes_guidance" in list_recipes(), "default" in list_recipes()
    (True, False)
    """
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p != DEFAULTS)


def recipe_summary(name: str) -> str:
    """The first comment line of a packaged recipe (what it trains), or ``""``."""
    for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            return ""
    return ""


def key_comments() -> list[tuple[str, str]]:
    """``(dotted key, its comment in default.yaml)`` for every key, in file order: what ``--help`` lists.

    Examples
    --------
    >>> dict(key_comments())["max_steps"].startswith("stop after")
    True
    """
    import re

    entries, section = [], None
    for line in DEFAULTS.read_text().splitlines():
        match = re.match(r"^( *)([A-Za-z_][\w-]*):(.*)$", line)
        if not match:
            if entries and re.match(r"^ +#", line):  # a comment continued on the next line
                entries[-1] = (entries[-1][0], f"{entries[-1][1]} {line.strip().lstrip('# ')}".strip())
            continue
        indent, key, rest = match.groups()
        comment = rest.split("#", 1)[1].strip() if "#" in rest else ""
        if indent:
            entries.append((f"{section}.{key}", comment))
        else:
            value = rest.split("#", 1)[0].strip()
            section = key if not value else None
            entries.append((key, comment))
    return entries


def find_recipe(recipe) -> Path:
    """A recipe file: an existing path as given, else a packaged recipe by name, from any folder.

    ``cpu_scenes_guidance``, ``cpu_scenes_guidance.yaml`` and ``train/configs/cpu_scenes_guidance.yaml``
    (README's form, typed outside the repository) all name the packaged file.

    Examples
    --------
    >>> find_recipe("cpu_scenes_guidance") == find_recipe("train/configs/cpu_scenes_guidance.yaml")
    True
    """
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    name = path.name[:-len(".yaml")] if path.name.endswith(".yaml") else path.name
    if name in list_recipes():
        return CONFIG_DIR / f"{name}.yaml"
    close = difflib.get_close_matches(name, list_recipes(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"config file not found: {recipe} ({hint}a YAML path, or a packaged recipe name: "
                      "see asg-train --list-recipes)")


def load_recipe(path) -> dict:
    """A recipe with its ``base:`` chain resolved (paths relative to the file that names them)."""
    path = Path(path)
    data = load_yaml(path)
    bases = data.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = (path.parent / base).resolve()
        if base_path == path.resolve():
            raise ConfigError(f"{path}: a recipe cannot be its own base")
        merged = merge(merged, load_recipe(base_path))
    return merge(merged, data)


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; ``update`` wins, neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flatten(cfg: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; free-form mappings stay whole."""
    flat = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in FREE_FORM and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _unknown_key_error(name: str, known, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    # "max_step" should also find "max_steps" when the prefix is right but the tail differs.
    tail = name.rsplit(".", 1)[-1]
    close += [k for k in known if k.rsplit(".", 1)[-1] == tail and k not in close][:3 - len(close)]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {name!r} in {where}{hint}")


def check_keys(cfg: dict, defaults: dict, where: str):
    """Raise on the first key of ``cfg`` that ``defaults`` does not know."""
    known = flatten(defaults)
    known_sections = {k.rsplit(".", 1)[0] for k in known if "." in k} | FREE_FORM
    for name in flatten(cfg):
        if name in known or any(name.startswith(f + ".") for f in FREE_FORM):
            continue
        if name in known_sections:  # an empty mapping for a section, e.g. `guidance: {}`
            continue
        raise _unknown_key_error(name, list(known), where)


def parse_value(text: str, default):
    """Parse a command-line value, typed after the default it replaces.

    YAML syntax (``[0,1,2]``, ``null``, ``true``) plus plain floats such as ``1e-4``
    (which YAML 1.1 would read as a string). A string default keeps the text as is,
    so ``guidance.target=true`` stays the string ``"true"``.
    """
    if isinstance(default, str) and not text.startswith(("[", "{")):
        return text
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {text!r}")
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
        if value != int(value):
            raise ConfigError(f"expected an integer, got {text!r}")
        return int(value)
    return value


def _set_dotted(cfg: dict, name: str, value):
    node = cfg
    parts = name.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def apply_overrides(cfg: dict, overrides, defaults: dict) -> dict:
    """Apply ``["a.b=1", "seeds=[0,1]"]`` to ``cfg`` (a copy is returned)."""
    cfg = copy.deepcopy(cfg)
    known = flatten(defaults)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        name, text = item.split("=", 1)
        name = name.strip()
        free = any(name.startswith(f + ".") for f in FREE_FORM)
        if name not in known and not free:
            raise _unknown_key_error(name, list(known), "the command line")
        try:
            value = parse_value(text, known.get(name))
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        _set_dotted(cfg, name, value)
    return cfg


def _check_number(name: str, value, *, low: float, inclusive: bool, integer: bool = False):
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and (value >= low if inclusive else value > low)
    if not ok:
        what = "an integer" if integer else "a number"
        bound = f">= {low}" if inclusive else f"> {low}"
        raise ConfigError(f"{name} must be {what} {bound}, got {value!r}")


def _type_name(value) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def _check_types(cfg: dict, defaults: dict):
    """One rule for every key: the value has its default's type, and every number is finite."""
    import math

    known = flatten(defaults)
    for name, value in flatten(cfg).items():
        numbers = value if isinstance(value, list) else [value]
        for v in numbers:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        default = known.get(name)
        if default is None or value is None and name in _NULLABLE:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(f"{name} must be {_type_name(default)}, got {value!r}")


# keys whose default is a value but that may also be set to null
_NULLABLE = {"data.mean", "data.std"}


def _check_model_kwargs(model: dict):
    """Build the model on the meta device (no memory, no weights): an argument the
    architecture does not take, or a value it refuses, is a config error now, not a crash later."""
    if not model["kwargs"]:
        return
    import json

    problem = _model_kwargs_problem(model["name"], model["pos"], json.dumps(model["kwargs"], sort_keys=True))
    if problem:
        raise ConfigError(f"model.kwargs {model['kwargs']} do not fit {model['name']} pos={model['pos']} "
                          f"({problem})")


@functools.lru_cache(maxsize=64)
def _model_kwargs_problem(name: str, pos: str, kwargs_json: str) -> str:
    """The first line of what building the model says about its arguments ('' if nothing);
    cached, since a config is resolved again for every seed and on every resume."""
    import json

    import torch

    import asg_probe

    try:
        with torch.device("meta"):
            asg_probe.create_model(name, pos=pos, **json.loads(kwargs_json))
    except (TypeError, ValueError) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    except Exception:  # noqa: BLE001 - only a check: a meta-device limitation is not the config's fault
        pass
    return ""


def validate(cfg: dict):
    """Checks that need more than a key name; all before any work starts."""
    import asg_probe
    from asg_probe.layers.guidance import GUIDANCE_TARGETS

    _check_types(cfg, load_yaml(DEFAULTS))
    _check_number("seed", cfg["seed"], low=0, inclusive=True, integer=True)
    if cfg["threads"] is not None:
        _check_number("threads", cfg["threads"], low=1, inclusive=True, integer=True)
    _check_number("num_workers", cfg["num_workers"], low=0, inclusive=True, integer=True)
    data = cfg["data"]
    _check_number("data.eval_crop_ratio", data["eval_crop_ratio"], low=1, inclusive=True)
    for key in ("num_classes", "pixel_budget"):
        if data[key] is not None:
            _check_number(f"data.{key}", data[key], low=1, inclusive=True, integer=True)
    for key, low in (("mean", None), ("std", 0)):
        values = data[key]
        if values is not None and not (isinstance(values, list) and len(values) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and (low is None or v > low) for v in values)):
            what = "three positive numbers" if low is not None else "three numbers"
            raise ConfigError(f"data.{key} must be {what} (one per RGB channel), got {values!r}")
    scale = data["crop_scale"]
    if not (isinstance(scale, list) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale)
            and 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"data.crop_scale must be two numbers 0 < low <= high <= 1 like [0.08,1.0], got {scale!r}")
    model = cfg["model"]
    if model["name"] not in asg_probe.list_models():
        raise ConfigError(f"model.name must be one of {', '.join(asg_probe.list_models())}, got {model['name']!r}")
    if model["pos"] not in asg_probe.list_positions():
        raise ConfigError(f"model.pos must be one of {', '.join(asg_probe.list_positions())}, got {model['pos']!r}")
    if not isinstance(model["kwargs"], dict):
        raise ConfigError(f"model.kwargs must be a mapping like {{depth: 2}}, got {model['kwargs']!r}")
    _check_number("model.img_size", model["img_size"], low=0, inclusive=False, integer=True)
    _check_model_kwargs(model)
    optim = cfg["optim"]
    _check_number("optim.lr", optim["lr"], low=0, inclusive=False)
    for key in ("min_lr", "weight_decay"):
        _check_number(f"optim.{key}", optim[key], low=0, inclusive=True)
    _check_number("optim.grad_clip", optim["grad_clip"], low=0, inclusive=False)
    _check_number("optim.warmup_steps", optim["warmup_steps"], low=0, inclusive=True, integer=True)
    betas = optim["betas"]
    if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1
                                                                for b in betas)):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1) like [0.9,0.999], got {betas!r}")
    g = cfg["guidance"]
    for key in ("rc_lambda", "lambda_min"):
        _check_number(f"guidance.{key}", g[key], low=0, inclusive=True)
    _check_number("guidance.hidden_dim", g["hidden_dim"], low=0, inclusive=False, integer=True)
    _check_number("guidance.warmup_steps_for_aux", g["warmup_steps_for_aux"], low=0, inclusive=True, integer=True)
    for key in ("num_train", "num_val"):
        _check_number(f"data.{key}", cfg["data"][key], low=0, inclusive=False, integer=True)
    _check_number("eval.batch_size", cfg["eval"]["batch_size"], low=0, inclusive=False, integer=True)
    _check_number("eval.every_epochs", cfg["eval"]["every_epochs"], low=0, inclusive=True, integer=True)
    eval_sizes = cfg["eval"]["sizes"]
    if eval_sizes is not None and (not isinstance(eval_sizes, list) or not eval_sizes
                                   or not all(isinstance(s, int) and s > 0 for s in eval_sizes)):
        raise ConfigError(f"eval.sizes must be a list of positive integers or null, got {eval_sizes!r}")
    _check_number("snapshot_every", cfg["snapshot_every"], low=0, inclusive=True, integer=True)
    if cfg["snapshot_schedule"] not in (None, "log"):
        raise ConfigError(f"snapshot_schedule must be log or null, got {cfg['snapshot_schedule']!r}")
    if cfg["snapshot_max"] is not None:
        _check_number("snapshot_max", cfg["snapshot_max"], low=2, inclusive=True, integer=True)
    if cfg["snapshot_dtype"] not in (None, "fp32", "fp16", "bf16"):
        raise ConfigError(f"snapshot_dtype must be fp32, fp16, bf16 or null, got {cfg['snapshot_dtype']!r}")
    if cfg["guidance"]["target"] not in GUIDANCE_TARGETS:
        raise ConfigError(f"guidance.target must be one of {', '.join(GUIDANCE_TARGETS)}, "
                          f"got {cfg['guidance']['target']!r}")
    kinds = {"classification": ("imagefolder", "scenes", "photos", "synthetic"), "segmentation": ("ade20k",),
             "depth": ("hypersim",)}
    if cfg["task"] not in kinds:
        raise ConfigError(f"task must be classification, segmentation or depth, got {cfg['task']!r}")
    if cfg["data"]["kind"] not in kinds[cfg["task"]]:
        raise ConfigError(f"task={cfg['task']} takes data.kind in {kinds[cfg['task']]}, got {cfg['data']['kind']!r}")
    if cfg["device"] not in ("auto", "cpu", "cuda") and not str(cfg["device"]).startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {cfg['device']!r}")
    if cfg["precision"] not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {cfg['precision']!r}")
    for key in ("batch_size", "grad_accum", "log_every", "ckpt_every", "epochs"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg["max_steps"] is not None and (not isinstance(cfg["max_steps"], int) or cfg["max_steps"] < 1):
        raise ConfigError(f"max_steps must be a positive integer or null, got {cfg['max_steps']!r}")
    seeds = cfg["seeds"]
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"seeds must be a non-empty list of integers >= 0 like [0,1,2], got {seeds!r}")
    sizes = cfg["data"]["multires_sizes"]
    if sizes is not None and (not isinstance(sizes, list) or not all(isinstance(s, int) and s > 0 for s in sizes)):
        raise ConfigError(f"data.multires_sizes must be a list of positive integers, got {sizes!r}")
    if cfg["data"]["kind"] in ("imagefolder", "ade20k", "hypersim") and not cfg["data"]["root"]:
        raise ConfigError("data.root is not set; pass data.root=/path/to/images")


def check_output(out) -> None:
    """Raise a one-line :class:`ConfigError` unless ``out`` can be (or already is) a run directory.

    Checked before any work, so that a bad ``out=`` never costs a training run.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"; _ = f.write_text("x")
    >>> check_output(f)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    asg_train.config.ConfigError: out=... is a file; pass a directory for the run
    """
    import os

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; pass a directory for the run")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out={out}: {existing} is a file, so the run directory cannot be created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out={out}: {existing} is not writable; pass out= somewhere you can write")


def resolve(recipe=None, overrides=(), base: dict | None = None) -> dict:
    """Defaults ← recipe (or ``base``, a saved resolved config) ← overrides; validated.

    Parameters
    ----------
    recipe : path or None
        A recipe YAML file.
    overrides : list of str
        ``key=value`` items.
    base : dict or None
        A previously resolved config (``--resume``) used instead of the recipe.

    Examples
    --------
    >>> cfg = resolve(overrides=["data.kind=synthetic", "optim.lr=1e-3", "seeds=[0,1]"])
    >>> cfg["optim"]["lr"], cfg["seeds"]
    (0.001, [0, 1])
    """
    defaults = load_yaml(DEFAULTS)
    cfg = defaults
    if recipe is not None:
        path = find_recipe(recipe)
        layer = load_recipe(path)
        check_keys(layer, defaults, str(recipe))
        named = {} if path.resolve() == DEFAULTS.resolve() else {"recipe": path.stem}  # defaults: no recipe
        cfg = merge(cfg, {**layer, **named})
    if base is not None:
        check_keys(base, defaults, "the saved run config")
        cfg = merge(cfg, base)
    cfg = apply_overrides(cfg, list(overrides), defaults)
    validate(cfg)
    return cfg


def run_label(cfg: dict) -> str:
    """How a run is named on screen: its recipe, else its mechanism and guidance target.

    Examples
    --------
    >>> run_label({"recipe": "cpu_scenes_guidance", "model": {"pos": "none"}, "guidance": {"enabled": True}})
    'cpu_scenes_guidance'
    >>> run_label({"model": {"pos": "none"}, "guidance": {"enabled": True, "target": "shuffled"}})
    'none + guidance (shuffled)'
    """
    if cfg.get("recipe"):
        return str(cfg["recipe"])
    label = cfg["model"]["pos"]
    guidance = cfg.get("guidance") or {}
    if guidance.get("enabled"):
        label += f" + guidance ({guidance.get('target', 'true')})"
    return label


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
