"""Built-in configs shipped with the package.

* ``default.yaml``: the experiment ``relkd run`` runs without a config.
* ``methods/<method>.yaml``: one file per distillation method (its loss terms, weights, recipe
  changes and stages). A suite names them (``methods: [kd, rkd]`` or ``methods: all``); adding a method
  to relkd is one loss file plus one file here.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG_DIR", "METHODS_DIR", "builtin_config", "method_names", "method_path"]

CONFIG_DIR = Path(__file__).resolve().parent
METHODS_DIR = CONFIG_DIR / "methods"


def builtin_config(name: str) -> Path | None:
    """The path of the built-in suite config ``name`` (``"default"``), or None."""
    path = CONFIG_DIR / f"{name}.yaml"
    return path if path.is_file() else None


def method_names() -> list[str]:
    """Names of the built-in method configs, ``baseline`` first, then alphabetical."""
    names = sorted(p.stem for p in METHODS_DIR.glob("*.yaml"))
    return sorted(names, key=lambda n: n != "baseline")


def method_path(name: str) -> Path | None:
    """The path of the built-in method config ``name``, or None."""
    path = METHODS_DIR / f"{name}.yaml"
    return path if path.is_file() else None
