"""Evaluators: what a finished network is judged by beyond test top-1.

An evaluator is a registered factory: its config options go to the constructor, and the object is
called once per deployed network at the end of a run with an :class:`EvalContext`, returning named
numbers. They are stored in ``result.json`` under the network and become extra columns of the results
table (``<evaluator>/<metric>``)::

    evaluate:
      cross_retrieval: {gallery: teacher}

    @register_evaluator("my_metric")
    class MyMetric:
        def __init__(self, k: int = 5) -> None: ...
        def __call__(self, ctx: EvalContext) -> dict[str, float]: ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from relkd.registry import Registry

__all__ = ["EVALUATORS", "EvalContext", "build_evaluator", "register_evaluator"]

EVALUATORS = Registry("evaluator")
register_evaluator = EVALUATORS.register


@dataclass
class EvalContext:
    """What an evaluator sees.

    Attributes:
        network: the name of the deployed network being measured.
        networks: every network of the run by name (students and teachers), on ``device``.
        loaders: evaluation data by split: ``test`` always, ``train`` (the training images without
            augmentation) when the run has it; batches are ``{"input", "target", "index"}``.
        device: where the networks are.
        autocast: the run's autocast context (bf16/fp16 on CUDA when asked for).
        teachers: the names of the run's teachers, in config order.
    """

    network: str
    networks: Mapping[str, nn.Module]
    loaders: Mapping[str, Iterable[dict[str, Tensor]]]
    device: torch.device
    autocast: Callable[[], Any] = contextlib.nullcontext
    teachers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def model(self) -> nn.Module:
        """The network being measured."""
        return self.networks[self.network]


def build_evaluator(
    name: str, options: Mapping[str, Any] | None = None
) -> Callable[[EvalContext], Mapping[str, float]]:
    """The evaluator ``name`` built with ``options``."""
    return EVALUATORS.build(name, **dict(options or {}))
