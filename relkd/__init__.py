"""relkd: graph-based relational knowledge distillation for PyTorch."""

from typing import Any

__version__ = "0.2.0"
__all__ = ["RelationGraph", "compile", "set_debug", "is_debug", "__version__"]


def compile(obj: Any, **options: Any) -> Any:  # noqa: A001  (relkd.compile, after torch.compile)
    """Compile a loss, a network or a function with ``torch.compile``.

    A module is compiled in place (``nn.Module.compile``) and returned, so its ``state_dict`` keys, its
    checkpoints and its forward hooks stay as they are; a function is returned compiled. ``options`` go
    to ``torch.compile`` (``fullgraph``, ``dynamic``, ``mode``, ``backend``); ``dynamic`` defaults to
    False: shapes are specialised, and a new batch size compiles once more (on the CPU the kernels
    compiled for symbolic sizes ran the relational losses up to 1.7x slower than eager ones, the
    specialised ones faster). relkd's losses compile to one graph each (no graph break), and inside a
    compiled graph the RKD angle's per-chunk body is compiled as well, so each loss's ``B x B`` chain
    runs fused.

    Example:
        >>> loss = relkd.compile(relkd.losses.build("pkt"))
        >>> value = loss(student_features, teacher_features)
    """
    import torch

    _quiet_inductor()
    options.setdefault("dynamic", False)
    if isinstance(obj, torch.nn.Module):
        obj.compile(**options)
        return obj
    return torch.compile(obj, **options)


def _quiet_inductor() -> None:
    """Silence inductor's own use of a deprecated torch helper, which warns once per compiled graph
    (a warning about torch's internals, not about the user's code)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch\._prims_common\.check", category=FutureWarning)


def __getattr__(name: str) -> Any:
    # Loaded on first use, so that `relkd --help` does not wait for torch.
    if name == "RelationGraph":
        from relkd.graphs import RelationGraph

        return RelationGraph
    if name in ("set_debug", "is_debug"):
        from relkd import _debug

        return getattr(_debug, name)
    raise AttributeError(f"module 'relkd' has no attribute {name!r}")
