"""The engine's backward pass: one objective, or the KD-SVD/MHGD authors' clip-to-CE rule."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["backward", "clip_to_ce_backward", "clips_to_ce"]


def clips_to_ce(losses: Mapping[str, Tensor], clip_to_ce: bool) -> bool:
    """Whether :func:`backward` applies the clipping rule: asked for, with a cross-entropy loss
    (``ce``) and at least one other loss."""
    return clip_to_ce and "ce" in losses and any(k != "ce" for k in losses)


def backward(
    losses: Mapping[str, Tensor],
    params: Sequence[nn.Parameter],
    scale: Callable[[Tensor], Tensor],
    clip_to_ce: bool = False,
    average: Callable[[list[Tensor]], None] = lambda grads: None,
    ramp: float = 1.0,
) -> Tensor:
    """Accumulate the gradient of ``sum(losses.values())`` into ``params`` and return the sum.

    With ``clip_to_ce``, each parameter's gradient from the losses other than ``ce`` is clipped to the
    norm of its cross-entropy gradient (the KD-SVD / MHGD authors' rule):
    ``g = g_ce + g_kd * min(1, ramp * |g_ce| / |g_kd|)``.
    A parameter without a cross-entropy gradient keeps its distillation gradient unclipped.

    Args:
        losses: the weighted losses (``ce``, the weighted cross-entropy, among them for the rule).
        params: the parameters being optimised.
        scale: the gradient scaler's ``scale`` (identity without fp16).
        clip_to_ce: apply the clipping rule.
        average: called (in place) on the cross-entropy gradients, then on the distillation
            gradients, before the rule compares them: under data parallelism the mean over ranks
            (:func:`relkd.distributed.all_reduce_mean_`), so that the rule sees the global-batch
            gradients. Not called without the rule (the caller averages ``p.grad`` then).
        ramp: the clipping norm is ``ramp * |g_ce|`` (the authors' ``sigmoid(epoch)`` warm-up).
    """
    total = sum(losses.values())
    if not clips_to_ce(losses, clip_to_ce):
        scale(total).backward()
        return total
    ce = losses["ce"]
    distill = sum(v for k, v in losses.items() if k != "ce")
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


def clip_to_ce_backward(
    ce: Tensor, distill: Tensor, parameters: Iterable[nn.Parameter], ramp: float = 1.0
) -> Tensor:
    """The KD-SVD / MHGD authors' update rule, for one's own training loop.

    Accumulates into each parameter's ``.grad`` the cross-entropy gradient plus the distillation
    gradient clipped to the cross-entropy gradient's norm, ``g = g_ce + g_kd * min(1, ramp * |g_ce| /
    |g_kd|)`` (a parameter without a cross-entropy gradient, e.g. a loss's own, keeps its distillation
    gradient). The authors' ``ramp`` is ``sigmoid(epoch)`` (``relkd.methods.sigmoid``), 0-based epoch of
    the distillation. Call it where ``loss.backward()`` would be, then step the optimiser::

        optimizer.zero_grad()
        clip_to_ce_backward(F.cross_entropy(logits, y), mhgd(s_maps, t_maps), model.parameters(),
                            ramp=sigmoid(epoch))
        optimizer.step()

    Returns:
        The sum ``ce + distill`` (for logging).
    """
    params = [p for p in parameters if p.requires_grad]
    return backward({"ce": ce, "distill": distill}, params, lambda x: x, clip_to_ce=True, ramp=ramp)
