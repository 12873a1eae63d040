"""relkd: graph-based relational knowledge distillation for PyTorch."""

from typing import Any

__version__ = "0.2.0"
__all__ = ["RelationGraph", "set_debug", "is_debug", "__version__"]


def __getattr__(name: str) -> Any:
    # Loaded on first use, so that `relkd --help` does not wait for torch.
    if name == "RelationGraph":
        from relkd.graphs import RelationGraph

        return RelationGraph
    if name in ("set_debug", "is_debug"):
        from relkd import _debug

        return getattr(_debug, name)
    raise AttributeError(f"module 'relkd' has no attribute {name!r}")
