"""One training step's forward: run the networks a stage needs, then its loss terms.

Teachers run under ``torch.no_grad()`` (they are frozen, in eval mode), students with gradients; every
network sees the same (already transformed) batch. Each network's features are ``{"logits": output,
**tapped features}``. The cross-entropy reads labelled images only (target ``-1`` marks transfer
images) and is averaged over them; a batch without any labelled image contributes 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relkd.distributed import global_graph
from relkd.graphs import RelationGraph
from relkd.models import FeatureTaps
from relkd.train.stages import Stage
from relkd.train.terms import LossTerm

__all__ = ["backward", "clips_to_ce", "cross_entropy", "forward", "needed_networks", "term_values"]

Features = dict[str, dict[str, Any]]


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over the labelled samples (``target >= 0``); 0 when there are none.

    **Shapes:** logits ``[B, C]``, target ``[B]`` -> scalar.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=-1, reduction="sum")
    return total / (target >= 0).sum().clamp(min=1)


def needed_networks(
    stage: Stage, terms: Mapping[str, LossTerm], students: Sequence[str], teachers: Sequence[str]
) -> tuple[list[str], list[str]]:
    """``(teachers, students)`` the stage must run: those its terms read, and every student when it has
    a cross-entropy term."""
    needed: set[str] = set(students) if stage.ce_weight else set()
    for use in stage.uses:
        spec = terms[use.term].spec
        needed |= {use.network} if use.network is not None else {spec.student, spec.teacher}
    return [t for t in teachers if t in needed], [s for s in students if s in needed]


def forward(
    networks: Mapping[str, nn.Module],
    taps: Mapping[str, FeatureTaps],
    inputs: Tensor,
    teachers: Sequence[str],
    students: Sequence[str],
) -> Features:
    """Run ``teachers`` (no grad) then ``students`` on ``inputs``; their features by network name."""
    features: Features = {}
    for name in teachers:
        with torch.no_grad():
            logits = networks[name](inputs)
        features[name] = {**taps[name].features, "logits": logits}
    for name in students:
        logits = networks[name](inputs)
        features[name] = {**taps[name].features, "logits": logits}
    return features


def term_values(
    stage: Stage,
    terms: Mapping[str, LossTerm],
    features: Features,
    batch: Mapping[str, Tensor],
    students: Sequence[str],
    teachers: Sequence[str],
) -> dict[str, Tensor]:
    """Unweighted values of the stage's terms: ``ce`` (summed over the students) when its weight is
    nonzero, then each term by name."""
    values = {}
    graphs: dict[tuple[int, bool], RelationGraph] = {}

    def shared(view: dict[str, Any], detach: bool) -> dict[str, Any]:
        # One graph per tapped tensor and side for the whole step, so that relational losses reading the
        # same features share its Gram matrix (over the global batch under data parallelism).
        out = {}
        for own, value in view.items():
            if isinstance(value, Tensor) and value.dim() >= 2:
                key = (id(value), detach)
                if key not in graphs:
                    graphs[key] = global_graph(value, detach=detach)
                value = graphs[key]
            out[own] = value
        return out

    if stage.ce_weight:
        values["ce"] = sum(cross_entropy(features[s]["logits"], batch["target"]) for s in students)
    for use in stage.uses:
        term = terms[use.term]
        spec = term.spec
        method = term.module.distill if use.call is None else getattr(term.module, use.call)
        if use.network is None:
            s_view = term.student_view(features[spec.student])
            t_view = term.teacher_view(features[spec.teacher])
            if use.call is None and term.module.accepts_graphs:
                s_view, t_view = shared(s_view, False), shared(t_view, True)
            values[use.term] = method(s_view, t_view, batch)
        else:
            view = term.teacher_view if use.network in teachers else term.student_view
            values[use.term] = method(view(features[use.network]), batch)
    return values


def clips_to_ce(weights: Mapping[str, float], clip_to_ce: bool) -> bool:
    """Whether :func:`backward` applies the clipping rule: asked for, with a cross-entropy term and at
    least one other term."""
    return clip_to_ce and "ce" in weights and any(k != "ce" for k in weights)


def backward(
    values: Mapping[str, Tensor],
    weights: Mapping[str, float],
    params: Sequence[nn.Parameter],
    scale: Callable[[Tensor], Tensor],
    clip_to_ce: bool = False,
    average: Callable[[list[Tensor]], None] = lambda grads: None,
    ramp: float = 1.0,
) -> Tensor:
    """Accumulate the gradient of ``sum_k weights[k] * values[k]`` into ``params`` and return the sum.

    With ``clip_to_ce``, each parameter's gradient from the other terms is clipped to the norm of its
    cross-entropy gradient (the KD-SVD / MHGD authors' rule):
    ``g = g_ce + g_kd * min(1, ramp * |g_ce| / |g_kd|)``.
    A parameter without a cross-entropy gradient keeps its distillation gradient unclipped.

    Args:
        values: unweighted term values (``ce`` included when the stage has it).
        weights: the weight of each term.
        params: the parameters being optimised.
        scale: the gradient scaler's ``scale`` (identity without fp16).
        clip_to_ce: apply the clipping rule.
        average: called (in place) on the cross-entropy gradients, then on the distillation
            gradients, before the rule compares them: under data parallelism the mean over ranks
            (:func:`relkd.distributed.all_reduce_mean_`), so that the rule sees the global-batch
            gradients. Not called without the rule (the caller averages ``p.grad`` then).
        ramp: the clipping norm is ``ramp * |g_ce|`` (the authors' ``sigmoid(epoch)`` warm-up).
    """
    total = sum(weights[k] * values[k].float() for k in weights)
    rest = [k for k in weights if k != "ce"]
    if not clips_to_ce(weights, clip_to_ce):
        scale(total).backward()
        return total
    ce = weights["ce"] * values["ce"].float()
    distill = sum(weights[k] * values[k].float() for k in rest)
    g_ce = torch.autograd.grad(scale(ce), params, retain_graph=True, allow_unused=True)
    g_kd = torch.autograd.grad(scale(distill), params, allow_unused=True)
    average([g for g in g_ce if g is not None])
    average([g for g in g_kd if g is not None])
    for p, a, b in zip(params, g_ce, g_kd, strict=True):
        if a is not None and b is not None:
            g = a + b * (ramp * a.norm() / b.norm().clamp_min(1e-30)).clamp(max=1.0)
        else:
            g = a if b is None else b
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    return total
