"""README's quoted verdicts are what the code prints today.

README's verdict table (between ``<!-- verdicts`` and ``<!-- /verdicts -->``) quotes, for
every bundled model, the shuffle test's ``source`` at the last layer and the equivariance
certificate's verdict. Both are recomputed here, cheaply: the shuffle test on 16 held-out
scenes (its last-layer verdicts are the same at 16, 32 and 128 scenes: the smallest margin to
its 0.2 threshold is rope-mixed's slot R², 0.22 at 16 scenes, 0.35 at 128) and the certificate
on 2 (its errors are either ~1e-16 or ~1e-1: no image count moves them across the tolerance).
"""
import re
from pathlib import Path

import asg_probe
from asg_probe.scenes import SceneDataset

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_verdicts(text: str) -> dict:
    """``{model: (shuffle source, certificate)}`` from README's verdict table."""
    block = re.search(r"<!-- verdicts.*?-->(.*?)<!-- /verdicts -->", text, re.S)
    assert block, "README has no verdict table"
    rows = {}
    for line in block.group(1).strip().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("bundled model", "---"):
            continue
        rows[cells[0].strip("`")] = (cells[2], cells[3])
    return rows


def test_the_table_is_read():
    table = "<!-- verdicts -->\n| bundled model | a | b | c |\n| --- | --- | --- | --- |\n| `x` | y | content | CERTIFIED |\n<!-- /verdicts -->"
    assert readme_verdicts(table) == {"x": ("content", "CERTIFIED")}


def test_readme_verdicts_match_live_output():
    text = README.read_text(encoding="utf-8")
    quoted = readme_verdicts(text)
    assert set(quoted) == set(asg_probe.list_reference_models()), "every bundled model is quoted"
    images = SceneDataset(16, split="val").images()
    # the quick start's Python example quotes guidance's verdict up to its first "..."
    quick = re.search(r"check_equivariance\(model, images\[:8\]\)\.verdict\(\)\s+# '([^.]*)\.\.\.", text)
    assert quick, "README's quick start no longer quotes a verdict"
    live = {}
    for name in quoted:
        model = asg_probe.load_reference_model(name)
        source = asg_probe.shuffle_test(model, images, progress=False).rows[-1]["source"]
        cert = asg_probe.check_equivariance(model, images[:2])
        verdict = cert.verdict()
        assert verdict.startswith("CERTIFIED" if cert.certified else "NOT equivariant")
        if name == "guidance":
            assert verdict.startswith(quick.group(1)), (verdict, quick.group(1))
        live[name] = (source, "CERTIFIED" if cert.certified else "NOT equivariant")
    assert live == quoted
