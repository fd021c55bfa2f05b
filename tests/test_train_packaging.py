"""The training package installs as ``asg_train`` from the folder ``train/``; no top-level ``train``."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_lists_every_package_and_maps_asg_train_to_the_train_folder():
    tools = _pyproject()["tool"]["setuptools"]
    assert tools["package-dir"] == {"asg_train": "train"}
    # a renamed folder cannot be found by packages.find, so the list is explicit: it must not miss one
    expected = sorted(find_packages(where=str(ROOT), include=["asg_probe", "asg_probe.*"])) + ["asg_train"]
    assert sorted(tools["packages"]) == sorted(expected)
    assert "train" not in tools["packages"]
    assert tools["package-data"]["asg_train"] == ["configs/*.yaml"]
    assert _pyproject()["project"]["scripts"]["asg-train"] == "asg_train.cli:main"


def test_installed_name_outside_the_repository(tmp_path):
    code = ("import importlib.util as u, importlib.resources as r, asg_train; "
            "print(u.find_spec('train') is None, (r.files('asg_train') / 'configs' / 'default.yaml').is_file())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "True"]
    helped = subprocess.run([sys.executable, "-m", "asg_train", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: asg-train")


def test_training_code_imports_itself_only_relatively():
    # inside the package, `import train...` would work from the repository root only
    offenders = [p.name for p in (ROOT / "train").glob("*.py")
                 if any(line.lstrip().startswith(("import train", "from train")) for line in p.read_text().splitlines())]
    assert not offenders
