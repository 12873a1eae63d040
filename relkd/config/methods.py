"""Expand a suite's ``methods`` into one mapping per method.

``methods`` may be:

* ``all``: every built-in method of images (``relkd/configs/methods/*.yaml``; text methods say
  ``modality: text`` and are named one by one); a built-in method whose loss is
  not registered is an error (every built-in loss registers itself on import of ``relkd.losses``);
* a list of built-in names or YAML paths: ``[baseline, kd, my_methods/fancy.yaml]``;
* a mapping ``{name: value}`` where the value is a built-in name or YAML path, null (the built-in
  method of that name), or a method mapping, which may start from another with ``extends: kd``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from relkd import configs
from relkd.config.overrides import deep_merge
from relkd.config.validate import ConfigError
from relkd.losses import LOSSES
from relkd.registry import suggest

__all__ = ["expand_methods", "load_method", "missing_losses"]


def load_method(ref: str, path: str, base_dir: Path | None = None) -> dict[str, Any]:
    """The method mapping of a built-in name or a YAML file (relative to ``base_dir``).

    Raises:
        ConfigError: neither a built-in method nor an existing file; names the close built-ins.
    """
    builtin = configs.method_path(ref)
    file = Path(ref).expanduser()
    if not file.is_absolute() and base_dir is not None:
        file = base_dir / file
    source = builtin if builtin is not None else file if file.is_file() else None
    if source is None:
        raise ConfigError(
            f"{path}: {ref!r} is neither a built-in method nor a YAML file."
            f"{suggest(ref, configs.method_names())} Built-in methods: {', '.join(configs.method_names())}"
        )
    data = yaml.safe_load(source.read_text()) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: {source} must hold a mapping (losses, train, stages), got {data!r}")
    return _resolve_extends(dict(data), path, source.parent)


def _resolve_extends(method: dict[str, Any], path: str, base_dir: Path | None) -> dict[str, Any]:
    parent = method.pop("extends", None)
    if parent is None:
        return method
    if not isinstance(parent, str):
        raise ConfigError(f"{path}.extends: expected a method name or YAML path, got {parent!r}")
    return deep_merge(load_method(parent, f"{path}.extends", base_dir), method)


def missing_losses(method: Mapping[str, Any]) -> list[str]:
    """The registry names of the method's losses that are not registered."""
    terms = method.get("losses") or {}
    if not isinstance(terms, Mapping):
        return []
    names = [(t or {}).get("loss", name) if isinstance(t, Mapping) else name for name, t in terms.items()]
    return [n for n in names if isinstance(n, str) and n not in LOSSES]


def expand_methods(methods: Any, base_dir: Path | None = None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``(mapping of method name -> method mapping, notes about skipped methods)``.

    Raises:
        ConfigError: an unknown built-in name or missing file, or a value of the wrong type.
    """
    notes: list[str] = []
    if methods is None:
        return {"baseline": load_method("baseline", "methods.baseline")}, notes
    if methods == "all":
        out = {}
        for name in configs.method_names():
            method = load_method(name, f"methods.{name}")
            if method.get("modality", "image") != "image":
                continue
            missing = missing_losses(method)
            if missing:
                raise ConfigError(
                    f"methods: the built-in method {name!r} needs the loss {', '.join(map(repr, missing))}, "
                    "which is not registered: the relkd installation is incomplete (reinstall it)"
                )
            out[name] = method
        return out, notes
    if isinstance(methods, str):
        methods = [methods]
    if isinstance(methods, list):
        methods = {Path(str(ref)).stem: ref for ref in methods}
    if not isinstance(methods, Mapping):
        raise ConfigError(
            f"methods: expected 'all', a list of method names or a mapping of methods, got {methods!r}"
        )
    out = {}
    for name, value in methods.items():
        path = f"methods.{name}"
        if value is None:
            value = name
        if isinstance(value, str):
            out[name] = load_method(value, path, base_dir)
        elif isinstance(value, Mapping):
            out[name] = _resolve_extends(dict(value), path, base_dir)
        else:
            raise ConfigError(f"{path}: expected a method name, a YAML path or a mapping, got {value!r}")
    return out, notes
