"""Turn plain YAML data into typed dataclasses, with errors that name the key and the fix.

``from_data(SuiteConfig, raw)`` walks the dataclass fields: an unknown key is an error naming its full
path and the closest valid key (``data.batchsize: unknown key. Did you mean 'batch_size'?``), a value
of the wrong type is an error naming the path, the expected type and the value. The same checker
validates keyword arguments against a constructor's signature (:func:`check_kwargs`), so loss,
optimiser and schedule options in a config are checked before anything is trained.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from relkd.registry import suggest

__all__ = ["ConfigError", "check_kwargs", "check_value", "from_data", "join"]


class ConfigError(ValueError):
    """A config value that is missing, unknown or of the wrong type; the message names its key."""


def join(path: str, key: str | int) -> str:
    """``join("data", "root") == "data.root"``; the empty path is the root."""
    return f"{path}.{key}" if path else str(key)


def unknown_key(path: str, key: str, valid: Sequence[str]) -> ConfigError:
    hint = suggest(key, valid) or f" Valid keys: {', '.join(sorted(valid))}."
    return ConfigError(f"{join(path, key)}: unknown key.{hint}")


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        return "a list"
    if origin in (dict, Mapping) or tp in (dict,):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _wrong(path: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def check_value(path: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (and converted where lossless: int -> float,
    list -> tuple, mapping -> dataclass). Annotations it does not understand accept anything."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            try:
                return check_value(path, value, option)
            except ConfigError as e:
                errors.append(e)
        # A mapping meant for a dataclass option: its own error names the bad key, which helps more.
        nested = [e for e in errors if not str(e).startswith(f"{path}: expected")]
        raise nested[0] if nested else _wrong(path, tp, value)
    if tp is type(None):
        if value is not None:
            raise _wrong(path, tp, value)
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise _wrong(path, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(path, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(path, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _wrong(path, tp, value)
        return value
    if dataclasses.is_dataclass(tp):
        return from_data(tp, value, path)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong(path, tp, value)
        item = args[0] if args else Any
        out = [check_value(join(path, i), v, item) for i, v in enumerate(value)]
        return tuple(out) if tp is tuple or origin is tuple else out
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _wrong(path, tp, value)
        item = args[1] if len(args) == 2 else Any
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                hint = (
                    " (YAML reads on, off, yes and no as booleans: quote such a key)"
                    if isinstance(k, bool)
                    else ""
                )
                raise ConfigError(f"{join(path, str(k))}: keys must be strings, got {k!r}{hint}")
            out[k] = check_value(join(path, k), v, item)
        return out
    return value


def from_data(cls: type, data: Any, path: str = "") -> Any:
    """Build the dataclass ``cls`` from a mapping, checking every key and type.

    Raises:
        ConfigError: unknown key (with the closest valid one), missing required key, wrong type.
    """
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key(path, str(key), list(fields))
        kwargs[key] = check_value(join(path, key), value, hints[key])
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in kwargs and no_default:
            raise ConfigError(f"{join(path, name)}: missing; this key is required")
    return cls(**kwargs)


def check_kwargs(
    path: str,
    kwargs: Mapping[str, Any],
    fn: Callable[..., Any],
    skip: Sequence[str] = (),
) -> dict[str, Any]:
    """Check ``kwargs`` against ``fn``'s signature: names (with did-you-mean) and annotated types.

    Args:
        path: the config key holding ``kwargs``, for messages.
        kwargs: the options given in the config.
        fn: a function or class whose parameters are the valid options.
        skip: parameters the caller fills in itself; giving one in the config is allowed.

    Raises:
        ConfigError: an option ``fn`` does not take, or of the wrong type.
    """
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations only lose the type check, not the name check
        hints = {}
    names = [
        n
        for n, p in params.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    out = {}
    for key, value in kwargs.items():
        if key not in names and not takes_any:
            valid = [n for n in names if n not in skip] + list(skip)
            raise unknown_key(path, key, valid)
        out[key] = check_value(join(path, key), value, hints.get(key, Any))
    return out
