r"""Module criticality (Chatterji, Neyshabur & Sedghi, "The intriguing role of module criticality in the
generalization of deep networks", ICLR 2020; used for transfer by Neyshabur, Sedghi & Zhang, "What is
being transferred in transfer learning?", NeurIPS 2020, Section 3.5).

Module ``i`` is rewound toward its initial value, the other modules keep their final values, and
Gaussian noise is added to the rewound module:

.. math::
    \theta_i^\alpha = (1 - \alpha)\,\theta_i^0 + \alpha\,\theta_i^F, \qquad
    u \sim \mathcal N(0, \sigma^2 I), \qquad
    e_i(\alpha, \sigma) = \mathbb E_u\, \mathrm{err}\big(\theta_i^\alpha + u,\ \Theta_{-i}^F\big),

with ``err`` the 0-1 error (the papers use the training set's). The papers' module criticality is

.. math::
    \mu_{i,\epsilon} = \min_{0 \le \alpha, \sigma \le 1} \Big\{ \frac{\alpha^2 \|\theta_i^F -
    \theta_i^0\|_F^2}{\sigma^2} : e_i(\alpha, \sigma) \le \epsilon \Big\},

small when the module can be rewound far (small ``alpha``) and still sits in a wide valley (large
``sigma``); the network's criticality is the sum over modules. Here the minimum runs over a grid of
``alpha`` and ``sigma > 0`` (``inf`` when no grid point keeps the error within ``epsilon``), the
expectation is a mean over ``samples`` seeded noise draws, ``epsilon`` bounds the error itself (pass
the final error plus a margin for "within a margin of the final error"), and ``rewind_alpha`` also
reports the smallest ``alpha`` that keeps the noiseless error within ``epsilon``: 0 for a module
that can be reset to its initial value, 1 for a critical one (``None`` when not even the final value
does). At ``alpha = 1, sigma = 0`` the network is the trained one. Only parameters are rewound; buffers
(BatchNorm running statistics) keep their final values.

Shapes:
    ``error`` of each module: ``[len(alphas), len(sigmas)]`` float64, fractions in ``[0, 1]``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from relkd.analysis._batches import error_and_loss, evaluating
from relkd.analysis.distance import State, module_parameters

__all__ = ["ALPHAS", "SIGMAS", "ModuleCriticality", "module_criticality"]

ALPHAS = tuple(i / 10 for i in range(11))
SIGMAS = (0.0, 0.01, 0.03, 0.1)


@dataclass
class ModuleCriticality:
    """The rewinding of one module.

    Attributes:
        module: its path.
        alphas, sigmas: the grid (``sigmas[0]`` is 0).
        error: ``[len(alphas), len(sigmas)]`` mean error at each grid point.
        distance: ``||theta_i^F - theta_i^0||`` over the module's parameters.
        eps: the error bound.
    """

    module: str
    alphas: list[float]
    sigmas: list[float]
    error: Tensor
    distance: float
    eps: float

    @property
    def rewind_alpha(self) -> float | None:
        """The smallest ``alpha`` whose noiseless error is at most ``eps`` (None if none is)."""
        ok = (self.error[:, 0] <= self.eps).nonzero().flatten()
        return self.alphas[int(ok[0])] if len(ok) else None

    @property
    def criticality(self) -> float:
        """``min alpha^2 ||theta^F - theta^0||^2 / sigma^2`` over the feasible grid points with
        ``sigma > 0`` (``inf`` when none is feasible)."""
        best = math.inf
        for i, alpha in enumerate(self.alphas):
            for j, sigma in enumerate(self.sigmas):
                if sigma > 0 and self.error[i, j] <= self.eps:
                    best = min(best, alpha**2 * self.distance**2 / sigma**2)
        return best

    def as_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "alphas": self.alphas,
            "sigmas": self.sigmas,
            "error": self.error.tolist(),
            "distance": self.distance,
            "eps": self.eps,
            "rewind_alpha": self.rewind_alpha,
            "criticality": None if math.isinf(self.criticality) else self.criticality,
        }


@torch.no_grad()
def module_criticality(
    model: nn.Module,
    init_state: State,
    loader: Iterable[Any],
    eps: float,
    *,
    modules: Sequence[str] | None = None,
    alphas: Sequence[float] = ALPHAS,
    sigmas: Sequence[float] = SIGMAS,
    samples: int = 1,
    seed: int = 0,
) -> dict[str, ModuleCriticality]:
    """Rewind each module of a trained ``model`` toward ``init_state`` on an ``alpha x sigma`` grid
    and measure the error on ``loader`` (see the module doc). ``model`` is left as it was.

    Args:
        model: the trained network.
        init_state: its initial parameters (a network of the same architecture or a state dict).
        loader: labelled batches (the papers use the training set); read once and kept.
        eps: the error bound, a fraction in ``[0, 1]``.
        modules: module paths; default the top-level children holding parameters
            (:func:`relkd.analysis.distance.module_parameters`).
        alphas: rewinding points in ``[0, 1]`` (sorted; 1 is the trained value).
        sigmas: noise standard deviations per parameter entry (sorted; 0 is added when missing).
        samples: noise draws averaged per grid point with ``sigma > 0``.
        seed: seed of the noise.

    Returns:
        ``{module: ModuleCriticality}`` in module order.
    """
    if not 0 <= eps <= 1:
        raise ValueError(f"eps bounds an error rate: expected a fraction in [0, 1], got {eps}")
    alphas = sorted(float(a) for a in alphas)
    sigmas = sorted({0.0, *(float(s) for s in sigmas)})
    if alphas[0] < 0 or alphas[-1] > 1 or sigmas[0] < 0:
        raise ValueError(f"expected alphas in [0, 1] and sigmas >= 0, got {alphas} and {sigmas}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    groups = module_parameters(model, modules)
    params = dict(model.named_parameters())
    init = dict(init_state.named_parameters()) if isinstance(init_state, nn.Module) else init_state
    missing = [n for names in groups.values() for n in names if n not in init]
    if missing:
        raise ValueError(f"init_state lacks parameters of the model: {missing[:5]}")
    final = {n: p.detach().clone() for n, p in params.items()}
    batches = list(loader)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    with evaluating(model), _restoring(params, final):
        for module, names in groups.items():
            start = {n: init[n].detach().to(final[n].device, final[n].dtype) for n in names}
            distance = math.sqrt(sum(float((final[n] - start[n]).double().pow(2).sum()) for n in names))
            error = torch.zeros(len(alphas), len(sigmas), dtype=torch.float64)
            for i, alpha in enumerate(alphas):
                rewound = {n: torch.lerp(start[n], final[n], alpha) for n in names}
                for j, sigma in enumerate(sigmas):
                    draws = 1 if sigma == 0 else samples
                    total = 0.0
                    for _ in range(draws):
                        for n in names:
                            value = rewound[n]
                            if sigma:
                                noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
                                value = value + sigma * noise.to(value.device)
                            params[n].copy_(value)
                        total += error_and_loss(model, batches)[0]
                    error[i, j] = total / draws
            for n in names:
                params[n].copy_(final[n])
            out[module] = ModuleCriticality(module, alphas, sigmas, error, distance, eps)
    return out


@contextlib.contextmanager
def _restoring(params: dict[str, nn.Parameter], final: dict[str, Tensor]) -> Iterator[None]:
    """Put the final values back however the block ends."""
    try:
        yield
    finally:
        with torch.no_grad():
            for n, value in final.items():
                params[n].copy_(value)
