"""Optimisers and learning-rate schedules from torch, by name.

Config::

    optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}   # the CIFAR-100 recipe
    schedule: {name: multistep, milestones: [150, 180, 210], gamma: 0.1}
    warmup_epochs: 0

Every option besides ``name`` goes to the torch class (``torch.optim.SGD``, ``AdamW``, ...;
``MultiStepLR``, ``CosineAnnealingLR``, ...), whose signature validates it. Schedules step once per
epoch. With ``warmup_epochs = w > 0`` the learning rate rises linearly from 1% over ``w`` epochs
(``LinearLR``), then the schedule starts (``SequentialLR``): its epochs, milestones included, count
from the end of the warm-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched

from relkd.registry import Registry

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_schedule"]

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")

for _name, _cls in {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}.items():
    OPTIMIZERS.register(_name)(_cls)


@SCHEDULES.register("constant")
def constant(optimizer: Optimizer, epochs: int) -> sched.LRScheduler:
    """The optimiser's learning rate throughout."""
    return sched.ConstantLR(optimizer, factor=1.0, total_iters=0)


@SCHEDULES.register("multistep")
def multistep(
    optimizer: Optimizer, epochs: int, milestones: list[int] = (), gamma: float = 0.1
) -> sched.LRScheduler:
    """Multiply the learning rate by ``gamma`` at each epoch in ``milestones``."""
    return sched.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)


@SCHEDULES.register("step")
def step(optimizer: Optimizer, epochs: int, step_size: int = 30, gamma: float = 0.1) -> sched.LRScheduler:
    """Multiply the learning rate by ``gamma`` every ``step_size`` epochs."""
    return sched.StepLR(optimizer, step_size=step_size, gamma=gamma)


@SCHEDULES.register("cosine")
def cosine(optimizer: Optimizer, epochs: int, eta_min: float = 0.0) -> sched.LRScheduler:
    """Cosine annealing from the learning rate to ``eta_min`` over the stage's epochs."""
    return sched.CosineAnnealingLR(optimizer, T_max=max(1, epochs), eta_min=eta_min)


def build_optimizer(params: Iterable[torch.nn.Parameter], spec: Mapping[str, Any]) -> Optimizer:
    """``OPTIMIZERS[spec["name"]](params, **options)``.

    Raises:
        ValueError: no parameter to optimise.
    """
    params = list(params)
    if not params:
        raise ValueError(
            "the stage has no trainable parameter: check its 'trainable' and 'frozen' module paths"
        )
    options = {k: v for k, v in spec.items() if k != "name"}
    return OPTIMIZERS.build(spec["name"], params=params, **options)


def build_schedule(
    optimizer: Optimizer, spec: Mapping[str, Any], epochs: int, warmup_epochs: int = 0
) -> sched.LRScheduler:
    """The schedule ``spec`` over ``epochs`` epochs, after ``warmup_epochs`` of linear warm-up."""
    options = {k: v for k, v in spec.items() if k != "name"}
    if warmup_epochs <= 0:
        return SCHEDULES.get(spec["name"])(optimizer, epochs, **options)
    warmup = sched.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup_epochs)
    main = SCHEDULES.get(spec["name"])(optimizer, max(1, epochs - warmup_epochs), **options)
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[warmup_epochs])
