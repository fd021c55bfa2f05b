"""The install story stays consistent: pyproject, environment.yml, README, CI, light import."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip_section if not r.startswith("-e")}
    assert listed == wanted, f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^TEST_COMMAND='(.+)'$", ci, re.M).group(1)
    assert command in readme, "the test command in .ci/run must be the one written in README.md"
    assert "pytest" in command


def test_import_stays_light():
    code = ("import sys, asg_probe; asg_probe.create_model; "
            "heavy = [m for m in ('umap', 'ipywidgets', 'captum', 'sklearn', 'matplotlib') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`import asg_probe` pulled in: {out}"


def test_train_never_imported_by_the_library():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "asg_probe").rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+train\b", p.read_text(), re.M)]
    assert not offenders, f"asg_probe must not import train/: {offenders}"


def test_readme_and_environment_say_how_to_install_the_cpu_build():
    index = "--index-url https://download.pytorch.org/whl/cpu"
    readme = (ROOT / "README.md").read_text()
    env_text = (ROOT / "environment.yml").read_text()
    assert index in readme and "https://download.pytorch.org/whl/cpu" in env_text
    assert "cpuonly" in readme and "cpuonly" in env_text
    # the CPU option is a comment: the default environment still resolves to the default wheels
    env = yaml.safe_load(env_text)
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert not any("download.pytorch.org" in line for line in pip_section)
