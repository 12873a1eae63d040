"""Load a suite config: YAML file -> ``extends`` -> methods -> overrides -> merges -> checked dataclasses.

Order of precedence, lowest first: the schema's defaults, a parent config (``extends: base.yaml``),
the file itself, the file's own ``overrides`` list, the command-line overrides. Overrides are
``key.sub=value`` strings applied after the built-in methods are expanded, so a file with
``methods: all`` can still change one of them (``overrides: ["methods.mhgd.stages.0.epochs=2"]``);
a method list given on the command line (``methods=[mhgd]``) keeps the file's changes to the methods
it names.

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
from relkd.config.methods import expand_methods, load_method
from relkd.config.overrides import apply_overrides, deep_merge, parse_override
from relkd.config.schema import SuiteConfig, TrainConfig
from relkd.config.validate import ConfigError, from_data
from relkd.registry import suggest

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
        if override in overrides and parse_override(override)[0] == "methods":
            # a new method list from the command line keeps the file's own changes to those methods
            for change in in_file:
                name = parse_override(change)[0].split(".")[1:2]
                if change.startswith("methods.") and name and name[0] in data["methods"]:
                    data = apply_overrides(data, [change])
    _short_forms(data)
    train = merge_train(dataclasses.asdict(TrainConfig()), _mapping(data, "train"))
    data["train"] = train
    suite_data = _mapping(data, "data")
    data["students"] = {
        name: _model(spec, f"students.{name}") for name, spec in _mapping(data, "students").items()
    }
    declared = _mapping(data, "teachers")
    teachers: dict[str, Any] = {}
    for name, spec in declared.items():
        teachers[name] = _teacher(
            spec, f"teachers.{name}", suite_data, train, {**data["students"], **teachers}, base_dir
        )
    loss_args = _mapping(data, "loss_args")
    methods = {}
    for name, method in data["methods"].items():
        method = dict(method)
        path = f"methods.{name}"
        method["train"] = merge_train(train, _mapping(method, "train", f"{path}."))
        terms = _mapping(method, "losses", f"{path}.")
        method["losses"] = {
            term: _with_loss_args(options, loss_args, term, f"{path}.losses.{term}")
            for term, options in terms.items()
        }
        method["students"] = _method_students(method.get("students"), data["students"], path)
        method["teachers"] = _method_teachers(
            method.get("teachers"),
            list(declared),
            teachers,
            suite_data,
            train,
            data["students"],
            path,
            base_dir,
        )
        methods[name] = method
    data["methods"] = methods
    data["teachers"] = teachers
    return data, notes


def _short_forms(data: dict[str, Any]) -> None:
    """``student:`` / ``teacher:`` -> ``students: {student: ...}`` / ``teachers: {teacher: ...}``."""
    for short, long in (("student", "students"), ("teacher", "teachers")):
        if short not in data:
            continue
        if long in data:
            raise ConfigError(f"{short}: give {short} (one network) or {long} (several by name), not both")
        value = data.pop(short)
        data[long] = {} if value is None else {short: value}


def _model(spec: Any, path: str) -> dict[str, Any]:
    if isinstance(spec, str):
        return {"model": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{path}: expected a model name or a mapping {{model, args}}, got {spec!r}")
    return dict(spec)


def _teacher(
    spec: Any,
    path: str,
    suite_data: Mapping[str, Any],
    train: Mapping[str, Any],
    networks: Mapping[str, Mapping[str, Any]],
    base_dir: Path | None,
) -> dict[str, Any]:
    """A teacher's complete mapping: its data and recipe merged onto the suite's, ``like`` (a suite
    network whose model and args it takes) and ``method`` resolved."""
    teacher = _model(spec, path)
    like = teacher.get("like")
    if like is not None:
        if not isinstance(like, str) or like not in networks:
            raise ConfigError(
                f"{path}.like: expected the name of a network of the suite "
                f"({', '.join(networks) or 'none'}), got {like!r}"
            )
        for key in ("model", "args"):
            teacher.setdefault(key, copy.deepcopy(networks[like].get(key, {} if key == "args" else "")))
    teacher["data"] = deep_merge(suite_data, _mapping(teacher, "data", f"{path}."))
    teacher["train"] = merge_train(train, _mapping(teacher, "train", f"{path}."))
    method = teacher.get("method")
    if method is not None:
        if isinstance(method, str):
            method = load_method(method, f"{path}.method", base_dir)
        elif isinstance(method, Mapping):
            method = dict(method)
        else:
            raise ConfigError(f"{path}.method: expected a method name or mapping, got {method!r}")
        for key in ("students", "teachers"):
            if method.get(key):
                raise ConfigError(
                    f"{path}.method.{key}: a teacher's training method has no networks of its own"
                )
        method["train"] = merge_train(teacher["train"], _mapping(method, "train", f"{path}.method."))
        teacher["method"] = method
    return teacher


def _method_students(spec: Any, students: Mapping[str, Any], path: str) -> dict[str, Any]:
    if spec is None:
        return copy.deepcopy(dict(students))
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(
            f"{path}.students: expected a mapping {{name: suite student or {{model, args}}}}, got {spec!r}"
        )
    out = {}
    for name, value in spec.items():
        if isinstance(value, str):
            if value not in students:
                raise ConfigError(
                    f"{path}.students.{name}: {value!r} is not a student of the suite."
                    f"{suggest(value, students)} The suite's students: {', '.join(students) or 'none'}"
                )
            out[name] = copy.deepcopy(students[value])
        else:
            out[name] = _model(value, f"{path}.students.{name}")
    return out


def _method_teachers(
    spec: Any,
    declared: list[str],
    teachers: dict[str, Any],
    suite_data: Mapping[str, Any],
    train: Mapping[str, Any],
    students: Mapping[str, Any],
    path: str,
    base_dir: Path | None,
) -> dict[str, str]:
    """``{network name: suite teacher name}``; a teacher defined by the method joins ``teachers``."""
    if spec is None:
        return {name: name for name in declared}
    if isinstance(spec, list):
        spec = {name: name for name in spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{path}.teachers: expected null, a list of teacher names or a mapping, got {spec!r}"
        )
    out = {}
    for name, value in spec.items():
        where = f"{path}.teachers.{name}"
        if isinstance(value, str):
            if value not in teachers:
                raise ConfigError(
                    f"{where}: {value!r} is not a teacher of the suite.{suggest(value, teachers)} "
                    f"The suite's teachers: {', '.join(teachers) or 'none (teacher: null)'}"
                )
            out[name] = value
            continue
        own = _teacher(value, where, suite_data, train, {**students, **teachers}, base_dir)
        if name in teachers and teachers[name] != own:
            raise ConfigError(
                f"{where}: a different teacher named {name!r} is already defined; give this one another name"
            )
        teachers[name] = own
        out[name] = name
    return out


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
    _import_plugins(raw, overrides)
    data, notes = resolve(raw, overrides, base_dir)
    config = from_data(SuiteConfig, data)
    check_suite(config)
    return config, notes


def _import_plugins(raw: Mapping[str, Any], overrides: Sequence[str]) -> None:
    """Load installed plugins and import the config's ``imports`` (also when given as an override)
    before anything names what they register."""
    from relkd.plugins import import_modules, load_entry_points

    load_entry_points()
    imports = apply_overrides(
        {"imports": raw.get("imports") or []}, [o for o in overrides if o.startswith("imports")]
    )
    modules = imports.get("imports") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"imports: expected a list of module names, got {modules!r}")
    import_modules(modules)


def to_data(config: SuiteConfig) -> dict[str, Any]:
    """The config as plain YAML-ready data (loading it gives the same config)."""
    return dataclasses.asdict(config)
