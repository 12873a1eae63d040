"""The step protocol: a method owns its training step.

A step is a registered ``nn.Module`` (its parameters, e.g. a fusion module or a discriminator, are
trained and checkpointed with the networks) called once per training batch with a
:class:`StepContext` and returning a :class:`StepOutput`: the logits the step's training accuracy is
measured on and a dict of named losses. Every name keeps its own curve in the metrics, the tables and
``relkd plot``::

    @register_step("my_method")
    class MyMethod(Step):
        def forward(self, ctx: StepContext) -> StepOutput:
            student = ctx.run("student")                  # {"logits": ..., tapped features ...}
            teacher = ctx.run("teacher")                  # teachers run without gradients
            ce = cross_entropy(student["logits"], ctx.batch["target"])
            kl = ctx.term("kd", student, teacher)         # a loss term of the method's ``losses``
            return StepOutput(student["logits"], {"ce": ce, "kd": 0.9 * kl})

By default the engine sums the losses, backpropagates once and steps the optimiser. A step that
updates its networks in an order of its own (peers updated in turn, an inner loop) sets
``manual = True`` and calls :meth:`StepContext.update` itself; its losses are then only logged.

The context tells the epoch, the step, the stage and its terms, and every network by name, so
epoch-aware weights and warm-ups need no engine change. Losses of the default step read the context
through :meth:`relkd.losses.DistillLoss.on_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from relkd.distributed import global_graph
from relkd.graphs import RelationGraph
from relkd.methods.terms import LossTerm
from relkd.registry import Registry

__all__ = [
    "STEPS",
    "Features",
    "Step",
    "StepContext",
    "StepOutput",
    "StageInfo",
    "TermUse",
    "register_step",
]

STEPS = Registry("step")
register_step = STEPS.register

Features = dict[str, Any]


@dataclass
class TermUse:
    """How a stage uses a term: ``weight``; ``call`` a loss method instead of ``distill``; ``network``
    the network whose features alone that method receives."""

    term: str
    weight: float
    call: str | None = None
    network: str | None = None


@dataclass(frozen=True)
class StageInfo:
    """What a step knows of its stage: its name and position, its length and its terms.

    Attributes:
        name: the stage's name.
        index: its position among the run's stages (0-based).
        epochs: its length in epochs.
        start_epoch: the run's epoch (0-based) at which it starts.
        uses: the terms it uses, with their weights.
        ce_weight: the weight of the cross-entropy on labelled rows.
        options: the stage's ``step`` options beyond ``name`` (already given to the step's constructor).
    """

    name: str
    index: int
    epochs: int
    start_epoch: int
    uses: tuple[TermUse, ...]
    ce_weight: float
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class StepOutput:
    """What a step returns.

    Attributes:
        logits: the logits the training accuracy is measured on (``[B, C]``, rows with target ``-1``
            are not counted), or None.
        losses: named scalar losses. Without ``manual`` their sum is the objective; each is logged as
            ``loss/<name>``.
        metrics: named scalars logged as ``raw/<name>`` and not optimised (e.g. unweighted terms).
    """

    logits: Tensor | None
    losses: dict[str, Tensor]
    metrics: dict[str, Tensor] = field(default_factory=dict)


class StepContext:
    """Everything a step may read, and the calls it makes to run networks, terms and updates.

    Attributes:
        batch: the training batch after the batch transform: ``input``, ``target`` (``-1`` for
            unlabelled transfer rows), ``index`` (dataset positions) and whatever a transform adds.
        epoch: the run's epoch, 0-based, over all stages.
        step: the step within the epoch, 0-based.
        steps_per_epoch: steps in an epoch.
        stage: the running stage (:class:`StageInfo`).
        networks: every network by name, students trainable (possibly wrapped for data parallelism)
            and teachers frozen in eval mode.
        students, teachers: the names of each kind, in config order.
        terms: the method's loss terms by name.
    """

    def __init__(
        self,
        *,
        batch: dict[str, Tensor],
        epoch: int,
        step: int,
        steps_per_epoch: int,
        stage: StageInfo,
        networks: Mapping[str, nn.Module],
        students: Sequence[str],
        teachers: Sequence[str],
        terms: Mapping[str, LossTerm],
        taps: Mapping[str, Any],
        update: Callable[[Tensor], None] | None = None,
    ) -> None:
        self.batch = batch
        self.epoch, self.step, self.steps_per_epoch = epoch, step, steps_per_epoch
        self.stage = stage
        self.networks = networks
        self.students, self.teachers = list(students), list(teachers)
        self.terms = terms
        self._taps = taps
        self._update = update
        self._graphs: dict[tuple[int, bool], RelationGraph] = {}

    @property
    def stage_epoch(self) -> int:
        """The epoch within the running stage, 0-based."""
        return self.epoch - self.stage.start_epoch

    @property
    def progress(self) -> float:
        """Epochs done within the stage, fractional: ``stage_epoch + step / steps_per_epoch``."""
        return self.stage_epoch + self.step / max(1, self.steps_per_epoch)

    def run(self, name: str, inputs: Tensor | None = None) -> Features:
        """Network ``name`` on ``inputs`` (default ``batch["input"]``): ``{"logits": output, **taps}``.

        Teachers run under ``torch.no_grad()``; students keep the autograd graph.
        """
        if name not in self.networks:
            raise KeyError(f"no network {name!r}; this run has {', '.join(self.networks)}")
        x = self.batch["input"] if inputs is None else inputs
        if name in self.teachers:
            with torch.no_grad():
                logits = self.networks[name](x)
        else:
            logits = self.networks[name](x)
        taps = self._taps.get(name)
        return {**(taps.features if taps is not None else {}), "logits": logits}

    def term(self, name: str, student: Features, teacher: Features | None) -> Tensor:
        """The unweighted value of the term ``name`` on the two networks' features.

        Relational losses of one step share one :class:`RelationGraph` per tapped tensor and side
        (over the global batch under data parallelism), so each Gram matrix is computed once.
        """
        term = self.terms[name]
        s_view = term.student_view(student)
        t_view = None if teacher is None else term.teacher_view(teacher)
        if term.module.accepts_graphs and t_view is not None:
            s_view, t_view = self._shared(s_view, False), self._shared(t_view, True)
        term.module.on_step(self)
        return term.module.distill(s_view, t_view, self.batch)

    def call(self, name: str, method: str, network: str, features: Features) -> Tensor:
        """``terms[name].module.<method>(features of network, batch)``: a loss method that reads one
        network alone (e.g. ``pretrain_step`` on the teacher), under the term's tap names."""
        term = self.terms[name]
        view = term.teacher_view if network in self.teachers else term.student_view
        term.module.on_step(self)
        return getattr(term.module, method)(view(features), self.batch)

    def update(self, loss: Tensor) -> None:
        """One optimiser update on ``loss`` (manual steps only): zero the gradients, backpropagate
        (scaled under fp16), average over ranks, clip as the recipe says, step every optimiser.
        Parameters without a gradient from ``loss`` are left as they are."""
        if self._update is None:
            raise RuntimeError("StepContext.update is for steps with manual = True")
        self._update(loss)

    def _shared(self, view: Mapping[str, Any], detach: bool) -> dict[str, Any]:
        out = {}
        for own, value in view.items():
            if isinstance(value, Tensor) and value.dim() >= 2:
                key = (id(value), detach)
                if key not in self._graphs:
                    self._graphs[key] = global_graph(value, detach=detach)
                value = self._graphs[key]
            out[own] = value
        return out


class Step(nn.Module):
    """Base class of the registered steps.

    Attributes:
        manual: the step calls :meth:`StepContext.update` itself; without it the engine sums the
            returned losses, backpropagates once and steps the optimiser. A step may set it per
            instance in its constructor (e.g. from an option); the engine reads the instance's.
        deploy: networks the method deploys when its config does not say (default: every student).
        taps: features to hook on every network of the run, besides those the terms read.
        ddp_wrap: under data parallelism the students may be wrapped in ``DistributedDataParallel``
            (the engine then leaves their gradients to it); otherwise the engine averages every
            gradient itself after the backward.

    A constructor may ask for what the engine knows by naming it: ``students`` and ``teachers``
    (network names), ``features`` (``{network: {tap: probe-batch tensor}}``, to size modules),
    ``num_classes``, ``terms`` (the term specs) and ``stage`` (:class:`StageInfo`).
    """

    manual: ClassVar[bool] = False
    deploy: ClassVar[tuple[str, ...] | None] = None
    taps: ClassVar[tuple[str, ...]] = ()
    ddp_wrap: ClassVar[bool] = False

    def forward(self, ctx: StepContext) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def networks_needed(self, stage: StageInfo, terms: Mapping[str, LossTerm], students: Sequence[str],
                        teachers: Sequence[str]) -> tuple[list[str], list[str]]:  # fmt: skip
        """``(teachers, students)`` the step runs in ``stage`` (default: all)."""
        return list(teachers), list(students)


def sigmoid(x: float) -> float:
    """``1 / (1 + exp(-x))``, the ramp of the KD-SVD/MHGD authors' clipping rule."""
    return 1.0 / (1.0 + math.exp(-x))
