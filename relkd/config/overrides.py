"""Command-line overrides ``key.sub=value`` and the deep merge of config mappings.

The value is parsed as YAML (``train.epochs=5`` is an integer, ``seeds=[0,1]`` a list,
``teacher=null`` null, ``data.root=/data/cifar`` a string). A numeric key indexes a list
(``methods.mhgd.stages.0.epochs=2``). Keys are checked later by the schema, so a typo is an error that
names the key and suggests the valid one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from relkd.config.validate import ConfigError

__all__ = ["apply_overrides", "deep_merge", "parse_override"]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=5"`` -> ``(["train", "epochs"], 5)``.

    Raises:
        ConfigError: no ``=``, or an empty key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {text!r} is not of the form key.sub=value (e.g. train.epochs=5 or seeds=[0,1])"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``config`` with each ``key.sub=value`` set in order (intermediate mappings created).

    Raises:
        ConfigError: a malformed override, or one that descends into a value that is not a mapping
            or list.
    """
    out = copy.deepcopy(config)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = out
        for depth, key in enumerate(keys[:-1]):
            node = _child(node, key, ".".join(keys[:depth]) or "the config", text)
        _set(node, keys[-1], value, ".".join(keys[:-1]) or "the config", text)
    return out


def _child(node: Any, key: str, parent: str, text: str) -> Any:
    """``node[key]`` (``parent`` is ``node``'s path, for messages); a missing mapping is created."""
    if isinstance(node, list):
        return node[_index(node, key, parent, text)]
    if not isinstance(node, dict):
        raise ConfigError(f"override {text!r}: {parent} is {node!r}, not a mapping; set it as a whole")
    if node.get(key) is None:
        node[key] = {}
    return node[key]


def _set(node: Any, key: str, value: Any, parent: str, text: str) -> None:
    if isinstance(node, list):
        node[_index(node, key, parent, text)] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise ConfigError(f"override {text!r}: {parent} is {node!r}, not a mapping; set it as a whole")


def _index(node: list, key: str, path: str, text: str) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ConfigError(
            f"override {text!r}: {path} indexes a list of {len(node)} items; use 0..{len(node) - 1}"
        )
    return int(key)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any] | None) -> dict[str, Any]:
    """``base`` with ``update`` merged in: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in (update or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
