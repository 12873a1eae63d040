"""Loss terms: registered losses built from a method's config, with their sizes filled in.

A term of ``losses:`` reads its loss's ``taps`` from a student and a teacher network::

    losses:
      rkd: {weight: 1.0}                                  # RKDLoss on the penultimate embeddings
      rkd_mid: {loss: rkd, taps: [stage2]}                # the same loss on another tap, both sides
      hint: {loss: fitnet, taps: {student: [stage2], teacher: [stage3]}}

The engine fills in the constructor arguments a loss declares and the config leaves out (found with
``inspect.signature``): ``student_dim`` / ``teacher_dim`` (values per sample of the first tap, measured
on a probe batch), ``student_channels`` / ``teacher_channels`` (``shape[1]`` of every tap),
``student_shape`` / ``teacher_shape`` (the first tap's shape without the batch dimension),
``num_data`` (size of the full training set), ``targets`` (all its labels) and ``num_classes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from relkd.losses import LOSSES, DistillLoss
from relkd.losses.sizes import INJECTED, measured_sizes

__all__ = ["INJECTED", "TERM_KEYS", "LossTerm", "TermSpec", "build_term", "parse_terms", "tap_names"]

# Keys of a term that the engine reads; every other key goes to the loss's constructor.
TERM_KEYS: dict[str, Any] = {
    "loss": str,
    "weight": float,
    "taps": list[str] | dict[str, list[str]],
    "student": str,
    "teacher": str,
}


@dataclass
class TermSpec:
    """A term before its module exists: what to build and which features it reads.

    Attributes:
        name: the term's key in ``losses`` (and its log name, ``loss/<name>``).
        loss: the registered loss name; cls: its class; options: constructor options from the config.
        weight: default weight of the term in the total loss.
        student, teacher: names of the networks it reads (``teacher`` is None for a loss that reads
            the student alone).
        student_taps, teacher_taps: the features it reads from each, in the order of ``taps``.
        taps: the loss module's own tap names (what ``distill`` indexes).
    """

    name: str
    loss: str
    cls: type
    options: dict[str, Any]
    weight: float
    student: str
    teacher: str | None
    student_taps: tuple[str, ...]
    teacher_taps: tuple[str, ...]
    taps: tuple[str, ...]


@dataclass
class LossTerm:
    """A built term: :class:`TermSpec` plus the loss module."""

    spec: TermSpec
    module: DistillLoss

    @property
    def name(self) -> str:
        return self.spec.name

    def student_view(self, features: Mapping[str, Any]) -> dict[str, Any]:
        """The student's features under the loss's own tap names."""
        return {own: features[tap] for own, tap in zip(self.spec.taps, self.spec.student_taps, strict=True)}

    def teacher_view(self, features: Mapping[str, Any]) -> dict[str, Any]:
        """The teacher's features under the loss's own tap names."""
        return {own: features[tap] for own, tap in zip(self.spec.taps, self.spec.teacher_taps, strict=True)}


def _only(names: Sequence[str], role: str, term: str) -> str:
    if len(names) != 1:
        raise ValueError(
            f"term {term!r}: there are {len(names)} {role}s ({', '.join(names)}); name one with '{role}:'"
        )
    return names[0]


def parse_terms(
    losses: Mapping[str, Mapping[str, Any]], students: Sequence[str], teachers: Sequence[str]
) -> dict[str, TermSpec]:
    """Specs of a method's ``losses`` mapping (validated by :mod:`relkd.config`).

    Raises:
        ValueError: a term names a network that does not exist.
    """
    specs = {}
    for name, options in losses.items():
        loss = options.get("loss", name)
        cls = LOSSES.get(loss)
        student = options.get("student") or _only(students, "student", name)
        teacher = None
        if cls.needs_teacher:
            teacher = options.get("teacher") or _only(teachers, "teacher", name)
        for role, net, known in (("student", student, students), ("teacher", teacher, teachers)):
            if net is not None and net not in known:
                raise ValueError(
                    f"term {name!r}: no {role} network {net!r}; the {role}s are {', '.join(known)}"
                )
        taps = options.get("taps")
        own = tuple(cls.taps)
        if taps is None:
            s_taps = t_taps = own
        elif isinstance(taps, Mapping):
            s_taps, t_taps = tuple(taps.get("student", own)), tuple(taps.get("teacher", own))
        else:
            own = s_taps = t_taps = tuple(taps)
        specs[name] = TermSpec(
            name=name,
            loss=loss,
            cls=cls,
            options={k: v for k, v in options.items() if k not in TERM_KEYS},
            weight=float(options.get("weight", 1.0)),
            student=student,
            teacher=teacher,
            student_taps=s_taps,
            teacher_taps=t_taps,
            taps=own,
        )
    return specs


def build_term(
    spec: TermSpec,
    student_features: Mapping[str, Tensor],
    teacher_features: Mapping[str, Tensor] | None,
    num_data: int,
    targets: Tensor,
    num_classes: int | None = None,
) -> LossTerm:
    """Build the loss of ``spec``, filling in the sizes it asks for from probe-batch features.

    Args:
        spec: the term.
        student_features, teacher_features: ``{tap: [B, ...]}`` of a probe batch, holding at least
            the term's taps (``"logits"`` included when it reads them).
        num_data: size of the full training set.
        targets: ``[num_data]`` labels of the full training set.
    """
    kwargs = measured_sizes(
        spec.cls,
        student_features,
        teacher_features,
        spec.student_taps,
        spec.teacher_taps,
        given=spec.options,
        num_data=num_data,
        targets=targets,
        num_classes=num_classes,
    )
    module = LOSSES.build(spec.loss, **kwargs, **spec.options)
    if tuple(module.taps) != spec.taps:
        module.taps = spec.taps
    return LossTerm(spec, module)


def tap_names(
    specs: Mapping[str, TermSpec], stages: Sequence[Any], students: Sequence[str], teachers: Sequence[str]
) -> dict[str, list[str]]:
    """The features to hook on each network (``"logits"`` excluded: it is the output), in first-use order:
    every term's taps on its two networks, and a stage's ``network:`` calls on that network."""
    names: dict[str, dict[str, None]] = {n: {} for n in [*students, *teachers]}
    for spec in specs.values():
        names[spec.student].update(dict.fromkeys(spec.student_taps))
        if spec.teacher is not None:
            names[spec.teacher].update(dict.fromkeys(spec.teacher_taps))
    for stage in stages:
        for use in stage.uses:
            if use.network is not None:
                spec = specs[use.term]
                own = spec.teacher_taps if use.network in teachers else spec.student_taps
                names[use.network].update(dict.fromkeys(own))
    return {n: [t for t in taps if t != "logits"] for n, taps in names.items()}
