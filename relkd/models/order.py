"""Which modules of a network run between two taps: found by running it once, for any architecture.

A staged recipe trains a network part by part ("the student up to the guided layer", "stage k only")
without knowing how the model is written: :func:`modules_between` runs the network on an example batch
with hooks on every module and returns the modules that hold parameters or buffers and ran in the
span, in the order they ran. A tap spec (``"layer2"``, ``"fc:input"``; see :mod:`relkd.models.taps`)
marks a boundary: after the tapped module's forward for ``path`` / ``path:output``, just before it for
``path:input``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from relkd.models.taps import find_module, parse_spec

__all__ = ["modules_between"]


class _DirectParameters(nn.Module):
    """The parameters and buffers a module holds itself (not its children's), as a module of their own:
    the learned tokens and position embeddings that a container such as a ViT keeps next to its
    blocks."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        for name, p in owner.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.owner_type = type(owner).__name__

    def extra_repr(self) -> str:
        return f"direct parameters of a {self.owner_type}"


def _holds_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )


@torch.no_grad()
def modules_between(
    network: nn.Module, example: Tensor, start: str | None, end: str | None
) -> list[nn.Module]:
    """The stateful modules of ``network`` that run after the boundary ``start`` and up to ``end``.

    Args:
        network: any model.
        example: an input batch it accepts (a few samples suffice).
        start: a tap spec, or None for the beginning of the forward.
        end: a tap spec, or None for its end.

    Returns:
        Leaf modules holding parameters or buffers (e.g. ``Conv2d``, ``BatchNorm2d``), in the order they
        first ran; a container's own parameters come as one module of them.

    Raises:
        KeyError: a tap names no module (the message lists the closest paths).
        ValueError: ``end`` comes before ``start`` in the forward.
    """
    events: list[tuple[str, str]] = []  # ("pre" | "post", module path)
    handles = []
    for path, module in network.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, p=path: events.append(("pre", p))))
        handles.append(module.register_forward_hook(lambda m, a, o, p=path: events.append(("post", p))))
    was_training = network.training
    network.eval()
    try:
        network(example)
    finally:
        network.train(was_training)
        for h in handles:
            h.remove()

    def boundary(spec: str | None, default: int) -> int:
        if spec is None:
            return default
        path, where = parse_spec(spec)
        find_module(network, path)  # a clear error naming the closest paths
        kind = "pre" if where == "input" else "post"
        hits = [i for i, e in enumerate(events) if e == (kind, path)]
        if not hits:
            raise KeyError(f"tap {spec!r}: the module {path!r} did not run in the forward")
        return hits[0] + (0 if kind == "pre" else 1)

    lo, hi = boundary(start, 0), boundary(end, len(events))
    if hi < lo:
        raise ValueError(f"tap {end!r} comes before tap {start!r} in the forward")
    modules = dict(network.named_modules())
    chosen: dict[str, nn.Module] = {}
    for kind, path in events[lo:hi]:
        module = modules[path]
        if kind != "pre" or path in chosen or not _holds_state(module):
            continue
        has_children = any(True for _ in module.children())
        chosen[path] = _DirectParameters(module) if has_children else module
    return list(chosen.values())
