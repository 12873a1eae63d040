r"""How far apart two networks of one architecture are, module by module: the ℓ2 distance of their
parameters (Neyshabur, Sedghi & Zhang, "What is being transferred in transfer learning?", NeurIPS
2020, Section 3.4: fine-tuned networks stay close to the pre-trained weights and to each other).

.. math::
    d_m(\theta, \theta') = \Big(\sum_{p \in m} \|\theta_p - \theta'_p\|_F^2\Big)^{1/2},

over the parameters ``p`` of module ``m`` (buffers such as BatchNorm's running statistics are not
parameters and are left out); with the default modules, ``total`` is the distance over every
parameter.

Modules are the model's top-level children that hold parameters (``stage1``, ``hidden``, ``fc`` of a
LeNet; ``conv1``, ``bn1``, ``layer1`` ... of a ResNet) unless module paths are given; parameters
owned by the root module directly are grouped as ``""``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from relkd.models.taps import find_module

__all__ = ["module_parameters", "parameter_distance"]

State = nn.Module | Mapping[str, Tensor]


def module_parameters(model: nn.Module, modules: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``{module path: [names of its parameters in model.named_parameters()]}``.

    Raises:
        KeyError: a path names no module (the message names the closest ones).
        ValueError: a module holds no parameter.
    """
    if modules is None:
        own = [n for n, _ in model.named_parameters(recurse=False)]
        groups = {"": own} if own else {}
        for name, child in model.named_children():
            names = [f"{name}.{n}" for n, _ in child.named_parameters()]
            if names:
                groups[name] = names
        return groups
    groups = {}
    for path in modules:
        prefix = f"{path}." if path else ""
        names = [prefix + n for n, _ in find_module(model, path).named_parameters()]
        if not names:
            raise ValueError(f"module {path!r} of {type(model).__name__} holds no parameter")
        groups[path] = names
    return groups


def _tensors(state: State) -> Mapping[str, Tensor]:
    return dict(state.named_parameters()) if isinstance(state, nn.Module) else state


@torch.no_grad()
def parameter_distance(
    model: nn.Module, other: State, modules: Sequence[str] | None = None
) -> dict[str, float]:
    """ℓ2 distance between ``model``'s parameters and ``other``'s (a network of the same architecture
    or its state dict), per module; with the default modules also ``total`` (given modules may
    overlap, so they get none).

    Raises:
        ValueError: ``other`` lacks a parameter or holds it with another shape.
    """
    groups = module_parameters(model, modules)
    mine, theirs = dict(model.named_parameters()), _tensors(other)
    out = {}
    total = torch.zeros((), dtype=torch.float64)
    for module, names in groups.items():
        sq = torch.zeros((), dtype=torch.float64)
        for name in names:
            if name not in theirs or theirs[name].shape != mine[name].shape:
                got = tuple(theirs[name].shape) if name in theirs else "nothing"
                raise ValueError(
                    f"parameter_distance: expected {name} of shape {tuple(mine[name].shape)} on both sides, "
                    f"got {got}"
                )
            diff = mine[name].detach().double() - theirs[name].detach().double().to(mine[name].device)
            sq += diff.pow(2).sum().cpu()
        out[module] = float(sq.sqrt())
        total += sq
    if modules is None:
        out["total"] = float(total.sqrt())
    return out
