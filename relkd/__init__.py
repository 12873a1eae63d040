"""relkd: graph-based relational knowledge distillation for PyTorch."""

from relkd._debug import is_debug, set_debug
from relkd.graphs import RelationGraph

__version__ = "0.1.0"
__all__ = ["RelationGraph", "set_debug", "is_debug", "__version__"]
