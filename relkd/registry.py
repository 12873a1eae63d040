"""Name -> constructor registries (losses, models, datasets).

A registry replaces if/elif chains: each constructor registers itself under a name, configs name it,
and the engine builds what the config names without knowing any method.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["Registry", "suggest"]


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ``did you mean ...?`` hint naming the choices closest to ``name`` ('' if none is close)."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


class Registry:
    """A named table of constructors.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("mlp")
    ... def mlp(num_classes=10): ...
    >>> MODELS.build("mlp", num_classes=3)
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None, *aliases: str) -> Callable[[Callable], Callable]:
        def deco(obj: Callable) -> Callable:
            for key in (name or obj.__name__, *aliases):
                key = key.lower()
                if key in self._entries and self._entries[key] is not obj:
                    raise KeyError(f"{self.kind} {key!r} is already registered")
                self._entries[key] = obj
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (and nothing else); unknown names are an error."""
        key = name.lower()
        if key not in self._entries:
            raise KeyError(f"{self.kind} {name!r} is not registered")
        del self._entries[key]

    @contextlib.contextmanager
    def temporarily(self, name: str, obj: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
        """Register ``obj`` as ``name`` inside a ``with`` block only (tests, experiments)."""
        self.register(name)(obj)
        try:
            yield obj
        finally:
            self.unregister(name)

    def get(self, name: str) -> Callable[..., Any]:
        key = name.lower()
        if key not in self._entries:
            raise KeyError(
                f"unknown {self.kind} {name!r}.{suggest(key, self._entries)} "
                f"Available: {', '.join(self.available())}"
            )
        return self._entries[key]

    def build(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def available(self, pattern: str = "*") -> list[str]:
        return sorted(k for k in self._entries if fnmatch.fnmatch(k, pattern))

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.available()})"
