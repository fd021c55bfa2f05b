"""The tutorial notebooks run top to bottom and reproduce their saved outputs (nbval).

Each notebook runs in its own pytest process under nbval, in this Python environment
(``--nbval-current-env``), with ``notebooks/sanitize.cfg`` masking what legitimately differs
between runs (timings, temporary paths, addresses, float digits past the second decimal). The
same check by hand, from the repository root::

    python -m pytest --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg notebooks
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def test_every_tutorial_is_collected():
    numbers = [int(path.name[:2]) for path in NOTEBOOKS]
    assert numbers == list(range(1, 12)), [path.name for path in NOTEBOOKS]


def test_no_cell_is_skipped():
    """``NBVAL_SKIP`` would hide a broken cell; outputs that vary are masked or ignored instead."""
    for path in NOTEBOOKS:
        assert "NBVAL_SKIP" not in path.read_text(encoding="utf-8"), path.name


def test_saved_executed():
    """Readers on GitHub see the outputs, and nbval compares against them: every code cell ran."""
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        counts = [cell.get("execution_count") for cell in cells if cell["cell_type"] == "code"]
        assert None not in counts and counts == sorted(counts), f"{path.name}: execute it top to bottom before committing"


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_outputs(notebook):
    command = [sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env",
               "--nbval-sanitize-with", str(NOTEBOOK_DIR / "sanitize.cfg"),
               "-q", "-p", "no:cacheprovider", str(notebook)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"nbval failed for {notebook.name}:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
