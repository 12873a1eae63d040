"""The registry of graph convolutions an encoder can stack: ``relkd.gnn.available()`` lists them.

Each entry is a factory ``(in_dim, out_dim, **kwargs) -> MessagePassing`` registered by name, so an
encoder (or a config) names its layer instead of importing it.
"""

from __future__ import annotations

from relkd.registry import Registry

__all__ = ["CONVS", "register", "available"]

CONVS = Registry("gnn layer")
register = CONVS.register


def available(pattern: str = "*") -> list[str]:
    """Names of the registered graph convolutions (shell-style ``pattern``)."""
    return CONVS.available(pattern)
