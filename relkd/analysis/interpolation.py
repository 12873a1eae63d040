r"""The performance barrier on the straight line between two networks of one architecture
(Neyshabur, Sedghi & Zhang, "What is being transferred in transfer learning?", NeurIPS 2020,
Section 3.4: two networks fine-tuned from the same pre-trained weights are connected by a path of low
error, two trained from random initialisations are not).

.. math::
    \theta(\lambda) = (1 - \lambda)\,\theta_a + \lambda\,\theta_b, \qquad
    \mathrm{barrier} = \max_\lambda \Big[\mathrm{err}(\theta(\lambda))
    - \big((1 - \lambda)\,\mathrm{err}(\theta(0)) + \lambda\,\mathrm{err}(\theta(1))\big)\Big],

the height of the error curve above the chord between its ends (0 when the path is no worse than the
endpoints, as for a convex basin); the same is reported for the cross-entropy.

**BatchNorm.** The authors' code (google-research/understanding-transfer-learning,
``ckpt_interpolation.py``: ``interpolate_state_dicts``) interpolates every state-dict tensor, the
running statistics included. Their networks are BN-free (Fixup ResNets), where that is exact. With
BatchNorm the interpolated running statistics are not the statistics of the interpolated network's
activations, and the curve can show a barrier that is an artefact of them. ``bn="recompute"``
(default) therefore resets every BatchNorm layer's statistics at each point and re-estimates them in
train mode on training batches (a cumulative average, no gradient); ``bn="interpolate"`` is the
authors' way. On a BN-free network the two are the same and no training batches are needed. Integer
buffers (``num_batches_tracked``) are taken from the first network.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from relkd.analysis._batches import device_of, evaluate_error, unpack

__all__ = [
    "BN_MODES",
    "InterpolationCurve",
    "has_batchnorm",
    "interpolate",
    "interpolate_state",
    "recompute_batchnorm",
]

BN_MODES = ("recompute", "interpolate")


def interpolate_state(a: Mapping[str, Tensor], b: Mapping[str, Tensor], lam: float) -> dict[str, Tensor]:
    """``(1 - lam) a + lam b`` for every floating-point tensor; other tensors from ``a``.

    Raises:
        ValueError: the two states differ in keys or shapes (not one architecture).
    """
    if a.keys() != b.keys():
        extra = sorted(set(a) ^ set(b))
        raise ValueError(f"expected two networks of one architecture; the state dicts differ in {extra[:5]}")
    out = {}
    for key, ta in a.items():
        tb = b[key]
        if ta.shape != tb.shape:
            raise ValueError(
                f"expected two networks of one architecture; {key} has shapes {tuple(ta.shape)} and "
                f"{tuple(tb.shape)}"
            )
        out[key] = torch.lerp(ta, tb.to(ta.device, ta.dtype), lam) if ta.is_floating_point() else ta.clone()
    return out


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any module keeps running statistics (BatchNorm, InstanceNorm with tracking)."""
    return any(
        isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats for m in model.modules()
    )


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, loader: Iterable[Any], max_batches: int | None = None) -> None:
    """Reset every BatchNorm layer's running statistics and re-estimate them on ``loader``'s batches
    (train-mode forwards without gradient, a cumulative average over the batches); the model's mode
    and the layers' momenta are restored."""
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    device = device_of(model)
    seen = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            model(unpack(batch)[0].to(device))
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    if not seen:
        raise ValueError("recompute_batchnorm: the loader yielded no batch")


@dataclass
class InterpolationCurve:
    """Error and loss along ``theta(lambda)``; ``lambdas`` ascending from 0 to 1.

    Attributes:
        lambdas: the points, 0 and 1 included.
        error: fraction misclassified at each point.
        loss: mean cross-entropy (nats) at each point.
        bn: how BatchNorm statistics were set (``recompute`` or ``interpolate``; ``none`` without BN).
    """

    lambdas: list[float]
    error: list[float]
    loss: list[float]
    bn: str = "none"
    barrier: float = field(init=False)
    loss_barrier: float = field(init=False)

    def __post_init__(self) -> None:
        self.barrier = _height(self.lambdas, self.error)
        self.loss_barrier = _height(self.lambdas, self.loss)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lambdas": self.lambdas,
            "error": self.error,
            "loss": self.loss,
            "barrier": self.barrier,
            "loss_barrier": self.loss_barrier,
            "bn": self.bn,
        }


def _height(lambdas: Sequence[float], values: Sequence[float]) -> float:
    first, last = values[0], values[-1]
    return max(v - ((1 - lam) * first + lam * last) for lam, v in zip(lambdas, values, strict=True))


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    lambdas: Sequence[float],
    loader: Iterable[Any],
    *,
    bn: str = "recompute",
    bn_loader: Iterable[Any] | None = None,
    bn_batches: int | None = None,
) -> InterpolationCurve:
    """Error and loss of ``theta(lambda)`` on ``loader`` for each ``lambda`` (0 and 1 are added when
    missing), and the barrier (see the module doc). Neither network is changed.

    Args:
        model_a, model_b: two networks of one architecture (``lambda = 0`` is ``model_a``).
        lambdas: points in ``[0, 1]``.
        loader: the batches the error is measured on (e.g. the test set).
        bn: ``recompute`` (BatchNorm statistics re-estimated at every point on ``bn_loader``) or
            ``interpolate`` (the authors' code: running statistics interpolated like weights).
        bn_loader: training batches for ``recompute`` (unused without BatchNorm).
        bn_batches: use only the first this many of them.

    Raises:
        ValueError: different architectures, a ``lambda`` outside ``[0, 1]``, an unknown ``bn``, or
            ``recompute`` on a network with BatchNorm without ``bn_loader``.
    """
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {list(BN_MODES)}, got {bn!r}")
    grid = sorted({0.0, 1.0, *(float(lam) for lam in lambdas)})
    if grid[0] < 0 or grid[-1] > 1:
        raise ValueError(f"lambdas must lie in [0, 1], got {sorted(lambdas)}")
    with_bn = has_batchnorm(model_a)
    if with_bn and bn == "recompute" and bn_loader is None:
        raise ValueError(
            "the networks have BatchNorm: pass bn_loader (training batches) to re-estimate its statistics "
            "at each point, or bn='interpolate' for the authors' interpolated running statistics"
        )
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    probe = copy.deepcopy(model_a)
    batches = list(loader)
    bn_data = list(bn_loader) if with_bn and bn == "recompute" else None
    errors, losses = [], []
    for lam in grid:
        probe.load_state_dict(interpolate_state(state_a, state_b, lam))
        if bn_data is not None:
            recompute_batchnorm(probe, bn_data, bn_batches)
        err, loss = evaluate_error(probe, batches)
        errors.append(err)
        losses.append(loss)
    return InterpolationCurve(grid, errors, losses, bn if with_bn else "none")
