"""The install files agree with each other, and the README's examples run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_names_every_runtime_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            names |= {_name(d) for d in dep.get("pip", [])}
        else:
            names.add(_name(dep))
    required = {_name(d) for d in project["dependencies"] + project["optional-dependencies"]["dev"]}
    assert required <= names, f"environment.yml lacks {sorted(required - names)}"


def test_no_upper_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        assert "<" not in dep and "==" not in dep, dep


def test_readme_blocks_for_ci_exist():
    text = (ROOT / "README.md").read_text()
    assert "<!-- ci:install -->" in text and "<!-- ci:test -->" in text
    assert 'pip install -e ".[dev,text]"' in text


@pytest.mark.slow
def test_own_training_loop_example_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "own_training_loop.py")],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    accs = [float(v) for v in re.findall(r"accuracy: ([0-9.]+)", out.stdout)]
    assert len(accs) == 2 and min(accs) > 0.8, out.stdout
