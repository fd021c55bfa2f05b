"""Every ViT family in asg_probe.compat.ARCHITECTURES runs layerwise and attention distance.

Each is built with random weights at a small size (2 blocks, narrow, small input) and
probed on a few photographs. Architectures asg_probe cannot read yet are expected to
fail *strictly*: the test flips to a failure the day they work, so the list and
README's table get updated. README's table is printed by ``python -m asg_probe.compat
--markdown`` from the same list; the last test checks README still matches the list.
"""
import re
from pathlib import Path

import pytest

from asg_probe.compat import ARCHITECTURES, check, expected, key

README = Path(__file__).resolve().parents[1] / "README.md"


def _param(arch):
    marks = [pytest.mark.xfail(strict=True, reason=arch.pending)] if arch.pending else []
    return pytest.param(arch, id=key(arch), marks=marks)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("compat")


@pytest.mark.parametrize("arch", [_param(a) for a in ARCHITECTURES])
def test_architecture_runs_layerwise_and_attention_distance(arch, workdir):
    assert check(arch, workdir) == expected(arch)


def test_readme_table_lists_every_architecture():
    text = README.read_text()
    match = re.search(r"<!-- compat-table -->\n(.*?)\n<!-- /compat-table -->", text, re.S)
    assert match, "README has no compatibility table between <!-- compat-table --> markers"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in match.group(1).splitlines()[2:]]
    assert [(r[0], r[1], r[2].strip("`")) for r in rows] == [(a.family, a.source, a.name) for a in ARCHITECTURES], \
        "README's table is stale: regenerate it with python -m asg_probe.compat --markdown"
    for row, arch in zip(rows, ARCHITECTURES):
        if not arch.pending:  # these run in the test above, so README must show them working
            assert row[3] == "✓" and row[4] == ("refuses (one line)" if arch.no_attention else "✓"), row
