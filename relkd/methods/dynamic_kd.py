r"""Dynamic knowledge distillation (Li et al., "Dynamic Knowledge Distillation for Pre-trained Language
Models", EMNLP 2021): the student's uncertainty decides which teacher, which data and which objective.

The student's uncertainty on example b is its normalised prediction entropy

.. math::
    u_b = H\big(\mathrm{softmax}(z^s_b)\big) / \log C \in [0, 1].

Three strategies (``mode``), each the authors' (lancopku/DynamicKD ``models/student.py``):

* ``teacher`` (``UncertaintyTeacherKD...``), two teachers ``small`` and ``large``, ``routing``:
  ``hard``: sort the batch by :math:`u` (descending); the more uncertain half learns from the small
  teacher, the rest from the large one, each half's KD averaged over its own rows;
  ``soft``: :math:`\alpha_{small}\, KD_{small} + \alpha_{large}\, KD_{large}` with
  :math:`\alpha_{small} = \bar u` (the batch mean) and :math:`\alpha_{large} = 1 - \bar u`;
  ``soft_instance``: per-example weights :math:`u_b` and :math:`1 - u_b`, averaged over the batch.
  ``hard`` multiplies each half by ``small_weight`` / ``large_weight`` (``teacher.sh``: 1 and 1).
* ``data`` (``DynamicDataKD...``): rank the batch by ``selection`` and distil on the first
  ``ratio`` of it only (the teacher runs on those rows alone); ``margin``: smallest
  :math:`p_1 - p_2` first (``data.sh``'s default, ratio 0.5); ``entropy``: largest entropy first;
  ``confidence``: smallest max-probability first; ``random``; ``none`` keeps every row.
* ``objective`` (``DynamicObjectiveKD...``, strategy ``uncertainty``):
  :math:`\mathrm{CE} + \alpha_{kd} \frac1B \sum_b (1 - u_b) KD_b + \alpha_{rep} \frac1B \sum_b u_b
  \mathrm{Rep}_b`, the representation loss of the ``rep`` term
  (:func:`relkd.losses.hidden_mse.normalized_hidden_mse`), :math:`\alpha_{kd} = \alpha_{rep} = 1`
  (``objective.sh``).

The KD term is the authors' default, ``kd: mse``: the mean squared error between the student's and
the teacher's logits (per example, the mean over classes; over the batch, the mean over ``B x C``), or
``kd: kl``: :math:`T^2 \mathrm{KL}(p^T_t \| p^T_s)` with ``T`` = 5. The cross-entropy (the stage's
``ce_weight``, 1 in the scripts) reads the labelled rows of the whole batch.

Where we differ from the authors' code. Their weights :math:`u_b` are not detached, so the gradient
also flows through the student's entropy in ``soft``, ``soft_instance`` and ``objective``; the
default follows them, ``detach: true`` treats the weights as constants (the paper's description).
The ``hard`` split with an odd batch gives the extra row to the large teacher, as ``indices[B // 2:]``
does.

**Shapes:** logits ``[B, C]``; the ``rep`` term's states ``[B, layers + 1, L, D]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from relkd.methods.base import Step, StepContext, StepOutput, register_step
from relkd.methods.weighted_sum import cross_entropy

__all__ = ["DynamicKD", "kd_per_example", "select", "uncertainty"]

MODES = ("teacher", "data", "objective")
ROUTINGS = ("hard", "soft", "soft_instance")
SELECTIONS = ("margin", "entropy", "confidence", "random", "none")
KD = ("mse", "kl")


def uncertainty(logits: Tensor) -> Tensor:
    """``[B]`` normalised entropy :math:`H(\\mathrm{softmax}(z)) / \\log C` of logits ``[B, C]``
    (1 for uniform logits, 0 in the limit of a one-hot prediction)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"uncertainty: expected logits [B, C] with C >= 2, got {tuple(logits.shape)}")
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1) / math.log(logits.shape[1])


def kd_per_example(student: Tensor, teacher: Tensor, kind: str = "mse", T: float = 5.0) -> Tensor:
    """``[B]`` KD values: the mean squared logit difference over classes (``mse``), or
    :math:`T^2 \\mathrm{KL}(p^T_t \\| p^T_s)` (``kl``); the teacher is a constant."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"kd: expected logits of one shape [B, C], got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    teacher = teacher.detach().float()
    if kind == "mse":
        return (student.float() - teacher).pow(2).mean(1)
    if kind == "kl":
        log_s, log_t = F.log_softmax(student.float() / T, 1), F.log_softmax(teacher / T, 1)
        return T * T * (log_t.exp() * (log_t - log_s)).sum(1)
    raise ValueError(f"kd must be one of {KD}, got {kind!r}")


def select(logits: Tensor, selection: str, ratio: float) -> Tensor:
    """Positions of the batch to distil on: the first ``int(B * ratio)`` in ``selection``'s order (every
    row for ``none``), from the student's logits ``[B, C]``."""
    b = logits.shape[0]
    p = F.softmax(logits.detach().float(), dim=1)
    if selection == "none":
        return torch.arange(b, device=logits.device)
    if selection == "margin":
        top = p.topk(2, dim=1).values
        order = torch.argsort(top[:, 0] - top[:, 1])
    elif selection == "entropy":
        order = torch.argsort(uncertainty(logits.detach()), descending=True)
    elif selection == "confidence":
        order = torch.argsort(p.max(1).values)
    elif selection == "random":
        order = torch.randperm(b, device=logits.device)
    else:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return order[: int(b * ratio)]


@register_step("dynamic_kd")
class DynamicKD(Step):
    """See the module docstring.

    Args:
        mode: ``teacher``, ``data`` or ``objective``.
        routing: ``hard``, ``soft`` or ``soft_instance`` (mode ``teacher``).
        small, large: the two teachers' names (mode ``teacher``; default the method's first and second).
        small_weight, large_weight: the ``hard`` halves' weights.
        selection, ratio: the data selection (mode ``data``).
        rep: the representation term of mode ``objective`` (a ``normalized_hidden_mse`` term).
        kd: ``mse`` or ``kl``; T: the ``kl`` temperature.
        kd_weight, rep_weight: :math:`\\alpha_{kd}`, :math:`\\alpha_{rep}`.
        detach: treat the uncertainty weights as constants.
    """

    def __init__(
        self,
        mode: str = "objective",
        routing: str = "hard",
        small: str | None = None,
        large: str | None = None,
        small_weight: float = 1.0,
        large_weight: float = 1.0,
        selection: str = "margin",
        ratio: float = 0.5,
        rep: str = "rep",
        kd: str = "mse",
        T: float = 5.0,
        kd_weight: float = 1.0,
        rep_weight: float = 1.0,
        detach: bool = False,
        students: Sequence[str] = (),
        teachers: Sequence[str] = (),
        terms: dict | None = None,
    ) -> None:
        super().__init__()
        for name, value, allowed in (("mode", mode, MODES), ("routing", routing, ROUTINGS),
                                     ("selection", selection, SELECTIONS), ("kd", kd, KD)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"dynamic_kd: {name} must be one of {allowed}, got {value!r}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"dynamic_kd: ratio must be in (0, 1], got {ratio}")
        teachers = list(teachers)
        if mode == "teacher":
            if len(teachers) < 2 and (small is None or large is None):
                raise ValueError(f"dynamic_kd mode teacher needs two teachers, got {teachers}")
            small, large = small or teachers[0], large or teachers[1]
            for t in (small, large):
                if t not in teachers:
                    raise ValueError(
                        f"dynamic_kd: {t!r} is not a teacher of this method ({', '.join(teachers)})"
                    )
        elif not teachers:
            raise ValueError("dynamic_kd needs a teacher")
        if mode == "objective" and terms is not None and rep not in terms:
            raise KeyError(
                f"dynamic_kd mode objective reads the term {rep!r}; the losses are {', '.join(terms)}"
            )
        self.mode, self.routing, self.small, self.large = mode, routing, small, large
        self.teacher = teachers[0] if teachers else None
        self.small_weight, self.large_weight = float(small_weight), float(large_weight)
        self.selection, self.ratio, self.rep = selection, float(ratio), rep
        self.kd, self.T = kd, float(T)
        self.kd_weight, self.rep_weight, self.detach = float(kd_weight), float(rep_weight), detach

    def networks_needed(self, stage, terms, students, teachers):
        if self.mode == "teacher":
            return [self.small, self.large], list(students)
        return [self.teacher], list(students)

    def _weights(self, logits: Tensor) -> Tensor:
        u = uncertainty(logits)
        return u.detach() if self.detach else u

    def forward(self, ctx: StepContext) -> StepOutput:
        student = ctx.run(ctx.students[0])
        logits = student["logits"]
        losses: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {}
        if ctx.stage.ce_weight:
            losses["ce"] = ctx.stage.ce_weight * cross_entropy(logits, ctx.batch["target"])
        kd = self.kd_weight * self._kd(ctx, student, logits, losses, metrics)
        losses["kd"] = kd
        return StepOutput(logits, losses, metrics)

    def _kd(self, ctx: StepContext, student: dict, logits: Tensor, losses: dict, metrics: dict) -> Tensor:
        if self.mode == "data":
            rows = select(logits, self.selection, self.ratio)
            teacher = ctx.run(self.teacher, ctx.batch["input"][rows])["logits"]
            metrics["selected"] = torch.tensor(float(rows.numel()))
            return kd_per_example(logits[rows], teacher, self.kd, self.T).mean()
        if self.mode == "teacher":
            small = ctx.run(self.small)["logits"]
            large = ctx.run(self.large)["logits"]
            kd_small = kd_per_example(logits, small, self.kd, self.T)
            kd_large = kd_per_example(logits, large, self.kd, self.T)
            u = self._weights(logits)
            metrics["uncertainty"] = u.detach().mean()
            if self.routing == "hard":
                order = torch.argsort(u.detach(), descending=True)
                half = logits.shape[0] // 2
                to_small, to_large = order[:half], order[half:]
                part_small = kd_small[to_small].mean() if half else kd_small.sum() * 0
                return self.small_weight * part_small + self.large_weight * kd_large[to_large].mean()
            if self.routing == "soft":
                alpha = u.mean()
                return alpha * kd_small.mean() + (1 - alpha) * kd_large.mean()
            return (u * kd_small + (1 - u) * kd_large).mean()
        teacher = ctx.run(self.teacher)
        u = self._weights(logits)
        metrics["uncertainty"] = u.detach().mean()
        kd_b = kd_per_example(logits, teacher["logits"], self.kd, self.T)
        term = ctx.terms[self.rep]
        term.module.on_step(ctx)
        rep_b = term.module.per_sample(term.student_view(student), term.teacher_view(teacher))
        losses["rep"] = self.rep_weight * (u * rep_b).mean()
        metrics["rep"] = rep_b.detach().mean()
        return ((1 - u) * kd_b).mean()
