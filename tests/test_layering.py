"""Dependencies inside the project point one way, and nothing imports in a circle.

``asg_probe`` is layered: helpers → layers → models → checkpoint → extraction → probes →
analysis → report/widgets → cli. A module may import its own layer or lower ones, never a
higher one, and never the training package (``train/``, installed as ``asg_train``). The
imports are read from the source with :mod:`ast`, including imports inside functions (a
lazy import is still a dependency), so the test needs nothing importable.

The checks are functions of a source root, so they are also run on small synthetic trees to
show that they catch an upward import, a training import and a cycle.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ("train", "asg_train")  # the training package: folder train/, installed as asg_train

# (rank, module or package prefix). A module takes the rank of its longest matching prefix.
# Helpers every layer may use sit at the bottom.
RANKS = [
    (0, "asg_probe"),             # __init__ only (lazy names): not a prefix for the rest
    (0, "asg_probe.files"),
    (0, "asg_probe.errors"),
    (0, "asg_probe.finite"),      # the one check that no NaN or inf becomes a result
    (0, "asg_probe.progress"),
    (0, "asg_probe.plotting"),    # colours and display names shared by every figure
    (0, "asg_probe.version"),
    (1, "asg_probe.layers"),
    (2, "asg_probe.models"),
    (3, "asg_probe.checkpoint"),
    (3, "asg_probe.reference"),   # bundled checkpoints, read through checkpoint
    (3, "asg_probe.pretrained"),  # timm:NAME, hf:ORG/NAME: what load_checkpoint asks first
    (3, "asg_probe.hf"),          # Hugging Face models as timm-like ViTs, loaded like checkpoints
    (3, "asg_probe.reinit"),      # the same architecture freshly initialised (the init baseline)
    (3, "asg_probe.openclip"),    # open_clip image towers as timm-like ViTs (open_clip:ARCH)
    (4, "asg_probe.extract"),
    (4, "asg_probe.capture"),
    (4, "asg_probe.geometry"),
    (4, "asg_probe.intermediates"),  # grid backbones read through timm's forward_intermediates
    (4, "asg_probe.hooks"),       # named hook points: run_with_cache / run_with_hooks, interventions
    (4, "asg_probe.inputs"),
    (4, "asg_probe.distributed"),
    (4, "asg_probe.data"),
    (4, "asg_probe.scenes"),
    (5, "asg_probe.probes"),
    (6, "asg_probe.analysis"),
    (6, "asg_probe.results"),     # result base class: analyses build on it
    (6, "asg_probe.activations"), # collect_activations: the analyses' extraction, kept per layer
    (7, "asg_probe.compat"),      # compatibility table: runs analyses on many architectures
    (7, "asg_probe.report"),
    (7, "asg_probe.widgets"),
    (8, "asg_probe.cli"),
    (8, "asg_probe.cli_args"),
    (8, "asg_probe.cli_help"),    # the words of --help: no imports at all
]
LAYER_NAMES = {0: "helpers", 1: "layers", 2: "models", 3: "checkpoint", 4: "extraction", 5: "probes",
               6: "analysis", 7: "report/widgets", 8: "cli"}


# --------------------------------------------------------------------------- reading the source

def project_modules(root: Path) -> dict:
    """``{dotted module name: file}`` for asg_probe and the training package under ``root``."""
    found = {}
    for top, package in (("asg_probe", "asg_probe"), ("train", "train")):
        base = root / top
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _canonical(name: str) -> str:
    """The training package's installed name and its folder name are one package."""
    head, _, rest = name.partition(".")
    return "train" + ("." + rest if rest else "") if head in TRAINING else name


def _lazy_names(modules: dict) -> dict:
    """``asg_probe.__init__``'s ``_LAZY`` table: ``from asg_probe import X`` really imports its module."""
    init = modules.get("asg_probe")
    if init is None:
        return {}
    for node in ast.walk(ast.parse(init.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return {}
    return {}


def imports_of(name: str, path: Path, modules: dict, lazy: dict) -> set:
    """Project modules imported anywhere in ``path`` (module ``name``), as dotted names."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [_canonical(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = _canonical(node.module or "")
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    targets.append(sub)  # `from pkg import submodule`
                elif base == "asg_probe" and alias.name in lazy:
                    targets.append(lazy[alias.name])
                else:
                    targets.append(base)
        else:
            continue
        for target in targets:
            # `import a.b.c` of a project module, or the nearest project package above it
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph(root: Path) -> dict:
    modules = project_modules(root)
    lazy = _lazy_names(modules)
    return {name: imports_of(name, path, modules, lazy) for name, path in modules.items()}


def rank_of(module: str):
    best = None
    for rank, prefix in RANKS:
        if module == prefix or (prefix != "asg_probe" and module.startswith(prefix + ".")):
            if best is None or len(prefix) > len(best[1]):
                best = (rank, prefix)
    return None if best is None else best[0]


# --------------------------------------------------------------------------- the checks

def layering_violations(root: Path) -> list:
    """One line per asg_probe import that runs upward, reaches training code, or is unranked."""
    problems = []
    for module, targets in sorted(import_graph(root).items()):
        if not module.startswith("asg_probe"):
            continue
        own = rank_of(module)
        if own is None:
            problems.append(f"{module} has no layer: add it to RANKS in tests/test_layering.py")
            continue
        for target in sorted(targets):
            if target.split(".")[0] == "train":
                problems.append(f"{module} imports training code ({target})")
                continue
            theirs = rank_of(target)
            if theirs is not None and theirs > own:
                problems.append(f"{module} ({LAYER_NAMES[own]}) imports {target} ({LAYER_NAMES[theirs]}), "
                                "a higher layer")
    return problems


def import_cycles(root: Path) -> list:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph = import_graph(root)
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


# --------------------------------------------------------------------------- the project

def test_the_project_is_read():
    graph = import_graph(ROOT)
    assert {"asg_probe.cli", "asg_probe.models", "asg_probe.checkpoint"} <= set(graph)
    assert "asg_probe.models" in graph["asg_probe.checkpoint"]  # a known edge: checkpoint builds models
    assert any(m.startswith("train") for m in graph)


def test_asg_probe_imports_point_down_and_never_reach_training_code():
    assert layering_violations(ROOT) == []


def test_no_import_cycles_between_project_files():
    assert import_cycles(ROOT) == []


# --------------------------------------------------------------------------- the checks can fail

def _tree(tmp_path, files: dict) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


BASE = {
    "asg_probe/__init__.py": "_LAZY = {'create_model': 'asg_probe.models'}\n",
    "asg_probe/files.py": "import os\n",
    "asg_probe/layers/__init__.py": "",
    "asg_probe/layers/attention.py": "from .grid import pad\n",
    "asg_probe/layers/grid.py": "def pad(): pass\n",
    "asg_probe/models.py": "from .layers.attention import pad\nfrom . import files\n",
    "asg_probe/analysis/__init__.py": "",
    "asg_probe/analysis/layerwise.py": "from ..models import create_model\nfrom ..probes.solver import solve\n",
    "asg_probe/probes/__init__.py": "",
    "asg_probe/probes/solver.py": "import numpy\n",
    "asg_probe/cli.py": "from .analysis import layerwise\n",
    "train/__init__.py": "",
    "train/loop.py": "from asg_probe.models import create_model\nfrom . import tasks\n",
    "train/tasks.py": "import asg_probe\n",
}


def test_a_clean_synthetic_tree_passes(tmp_path):
    root = _tree(tmp_path, BASE)
    graph = import_graph(root)
    assert graph["asg_probe.cli"] == {"asg_probe.analysis.layerwise"}
    assert graph["asg_probe.analysis.layerwise"] == {"asg_probe.models", "asg_probe.probes.solver"}
    assert graph["train.loop"] == {"asg_probe.models", "train.tasks"}
    assert layering_violations(root) == [] and import_cycles(root) == []


def test_an_upward_import_inside_a_function_fails(tmp_path):
    root = _tree(tmp_path, {**BASE, "asg_probe/layers/grid.py": """
        def pad():
            from ..analysis.layerwise import create_model  # a lazy import is still a dependency
        """})
    assert layering_violations(root) == [
        "asg_probe.layers.grid (layers) imports asg_probe.analysis.layerwise (analysis), a higher layer"]


def test_an_upward_import_through_the_lazy_package_names_fails(tmp_path):
    root = _tree(tmp_path, {**BASE, "asg_probe/files.py": "from asg_probe import create_model\n"})
    assert layering_violations(root) == [
        "asg_probe.files (helpers) imports asg_probe.models (models), a higher layer"]


@pytest.mark.parametrize("statement", ["import train.loop", "from asg_train import tasks",
                                       "from train.tasks import x"])
def test_asg_probe_importing_training_code_fails(tmp_path, statement):
    root = _tree(tmp_path, {**BASE, "asg_probe/cli.py": f"def run():\n    {statement}\n"})
    problems = layering_violations(root)
    assert len(problems) == 1 and problems[0].startswith("asg_probe.cli imports training code (train")


def test_an_unranked_module_fails(tmp_path):
    root = _tree(tmp_path, {**BASE, "asg_probe/misc.py": "import os\n"})
    assert layering_violations(root) == ["asg_probe.misc has no layer: add it to RANKS in tests/test_layering.py"]


def test_a_cycle_is_found(tmp_path):
    root = _tree(tmp_path, {**BASE, "train/tasks.py": "def f():\n    from .loop import x\n"})
    assert import_cycles(root) == [["train.loop", "train.tasks"]]
