"""Load a suite config: YAML file -> ``extends`` -> methods -> overrides -> merges -> checked dataclasses.

Order of precedence, lowest first: the schema's defaults, a parent config (``extends: base.yaml``),
the file itself, the file's own ``overrides`` list, the command-line overrides. Overrides are
``key.sub=value`` strings applied after the built-in methods are expanded, so a file with
``methods: all`` can still change one of them (``overrides: ["methods.mhgd.stages.0.epochs=2"]``).

Within the result, refining sections are merged onto the sections they refine: ``teacher.data``
onto ``data``; ``teacher.train`` and ``methods.<m>.train`` onto ``train``, itself merged onto the
schema's defaults (see :func:`merge_train` for optimisers). ``loss_args.<loss>`` sets options of
every term of that loss, over the method's own.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from relkd import configs
from relkd.config.checks import check_suite
from relkd.config.methods import expand_methods
from relkd.config.overrides import apply_overrides, deep_merge
from relkd.config.schema import SuiteConfig, TrainConfig
from relkd.config.validate import ConfigError, from_data

__all__ = ["load_config", "merge_train", "read_config", "resolve", "to_data"]

COMPONENTS = ("optimizer", "schedule", "batch_transform")


def read_config(source: str | Path | None) -> tuple[dict[str, Any], Path | None]:
    """The raw mapping of a YAML file or built-in config name (None: ``default``), its ``extends``
    chain merged, and the folder that relative paths in it are relative to.

    Raises:
        ConfigError: no such file or built-in config, or a file that is not a YAML mapping.
    """
    if source is None:
        source = "default"
    path = Path(source).expanduser()
    if not path.is_file():
        builtin = configs.builtin_config(str(source))
        if builtin is None:
            raise ConfigError(
                f"config {str(source)!r}: no such file, and not a built-in config (built-in: default)"
            )
        path = builtin
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top, got {type(data).__name__}")
    data = dict(data)
    parent = data.pop("extends", None)
    if parent is not None:
        base_path = Path(parent) if Path(parent).is_absolute() else path.parent / parent
        base, _ = read_config(base_path if base_path.is_file() else parent)
        data = deep_merge(base, data)
    return data, path.parent


def resolve(
    raw: Mapping[str, Any], overrides: Sequence[str] = (), base_dir: Path | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The complete config mapping (methods expanded, sections merged) and notes on skipped methods."""
    data = copy.deepcopy(dict(raw))
    in_file = data.pop("overrides", None) or []
    if not isinstance(in_file, list) or not all(isinstance(o, str) for o in in_file):
        raise ConfigError(f"overrides: expected a list of 'key.sub=value' strings, got {in_file!r}")
    data["methods"], notes = expand_methods(data.get("methods"), base_dir)
    # One override at a time: `methods=[kd]` followed by `methods.kd.train.epochs=3` must work.
    for override in [*in_file, *overrides]:
        data = apply_overrides(data, [override])
        data["methods"], more = expand_methods(data.get("methods"), base_dir)
        notes += [n for n in more if n not in notes]
    for key in ("student", "teacher"):
        if isinstance(data.get(key), str):
            data[key] = {"model": data[key]}
    train = merge_train(dataclasses.asdict(TrainConfig()), _mapping(data, "train"))
    data["train"] = train
    teacher = data.get("teacher")
    if isinstance(teacher, Mapping):
        teacher = dict(teacher)
        teacher["data"] = deep_merge(_mapping(data, "data"), _mapping(teacher, "data", "teacher."))
        teacher["train"] = merge_train(train, _mapping(teacher, "train", "teacher."))
        data["teacher"] = teacher
    loss_args = _mapping(data, "loss_args")
    methods = {}
    for name, method in data["methods"].items():
        method = dict(method)
        method["train"] = merge_train(train, _mapping(method, "train", f"methods.{name}."))
        terms = _mapping(method, "losses", f"methods.{name}.")
        method["losses"] = {
            term: _with_loss_args(options, loss_args, term, f"methods.{name}.losses.{term}")
            for term, options in terms.items()
        }
        methods[name] = method
    data["methods"] = methods
    return data, notes


def merge_train(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe refined by ``update``. A component (``optimizer``, ``schedule``, ``batch_transform``)
    that names another ``name`` replaces the base's; without ``name`` it changes the base's options."""
    out = deep_merge(base, {k: v for k, v in update.items() if k not in COMPONENTS})
    for key in COMPONENTS:
        value = update.get(key)
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            same = value.get("name", base[key].get("name")) == base[key].get("name")
            out[key] = deep_merge(base[key], value) if same else copy.deepcopy(dict(value))
        elif key in update:
            out[key] = copy.deepcopy(value)
    return out


def _mapping(data: Mapping[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{prefix}{key}: expected a mapping, got {value!r}")
    return dict(value)


def _with_loss_args(options: Any, loss_args: Mapping[str, Any], term: str, path: str) -> dict[str, Any]:
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"{path}: expected a mapping of the term's options (weight, loss options), got {options!r}"
        )
    return {**options, **(loss_args.get(options.get("loss", term)) or {})}


def load_config(
    source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> tuple[SuiteConfig, list[str]]:
    """Read, resolve and check a suite config.

    Args:
        source: a YAML path, a built-in config name, a mapping, or None for the default experiment.
        overrides: ``key.sub=value`` strings applied after the file.

    Returns:
        The config and notes (methods skipped because their loss is not registered).

    Raises:
        ConfigError: anything wrong, naming the key (and the closest valid one).
    """
    if isinstance(source, Mapping):
        raw, base_dir = dict(source), None
    else:
        raw, base_dir = read_config(source)
    data, notes = resolve(raw, overrides, base_dir)
    config = from_data(SuiteConfig, data)
    check_suite(config)
    return config, notes


def to_data(config: SuiteConfig) -> dict[str, Any]:
    """The config as plain YAML-ready data (loading it gives the same config)."""
    return dataclasses.asdict(config)
