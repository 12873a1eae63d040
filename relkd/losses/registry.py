"""The loss registry: ``relkd.losses.build("rkd", **kw)``, ``relkd.losses.available()``."""

from __future__ import annotations

from typing import Any

from relkd.registry import Registry

LOSSES = Registry("loss")
register = LOSSES.register


def build(name: str, /, **kwargs: Any):
    """Build a registered loss module by name, e.g. ``build("cc", gamma=0.4)``."""
    return LOSSES.build(name, **kwargs)


def available(pattern: str = "*") -> list[str]:
    """Names of the registered losses (shell-style ``pattern``)."""
    return LOSSES.available(pattern)
