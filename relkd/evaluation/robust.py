r"""Adversarial robustness: the :math:`L_\infty` PGD attack with a pluggable objective, and robust accuracy.

Projected gradient descent (Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models
Resistant to Adversarial Attacks", ICLR 2018) maximises an objective :math:`J` of the network's
output over the :math:`\varepsilon`-ball around the clean image :math:`p` inside the pixel box:

.. math::
    p^{(0)} = \text{start}(p), \qquad
    p^{(k+1)} = \Pi_{\|p' - p\|_\infty \le \varepsilon,\; p' \in [0, 1]}
        \Big(p^{(k)} + \alpha \,\mathrm{sign}\, \nabla_{p} J\big(f(\mathrm{norm}(p^{(k)}))\big)\Big),

where the projection clamps each pixel to :math:`[\max(p - \varepsilon, 0), \min(p + \varepsilon, 1)]`
(the intersection of the two intervals, so the order of the two clamps of the official codes does not
matter). The objective is the cross-entropy with the labels for evaluation
(:func:`ce_objective`) and, for RSLAD, the KL divergence from the teacher's soft labels on the clean
image (:func:`kl_objective`).

**Pixel space.** relkd's networks read normalised inputs :math:`x = (p - \mu_c) / \sigma_c` (per
channel, the data set's mean and std, :class:`relkd.data.DataBundle`). The attack takes and returns
normalised inputs, but works on pixels: :math:`p = x \sigma_c + \mu_c`, the step, the ball and the box
are applied to :math:`p`, and the network sees :math:`\mathrm{norm}(p^{(k)})`. Because
:math:`\sigma_c > 0`, :math:`\mathrm{sign}\,\nabla_p J = \mathrm{sign}\,\nabla_x J`, so this is exactly
the attack on an unnormalised network with ``epsilon`` and ``step_size`` in pixel units
(``8/255`` means 8 grey levels of 255). The constraints hold exactly on :math:`p`; the returned
:math:`\mathrm{norm}(p')` maps back to :math:`p'` within float rounding (a few ulp).
:class:`PixelSpace` holds the map; :meth:`PixelSpace.of` reads it from a loader's data set.

**The attacked network is left as it was.** Every module runs in eval mode during the attack (BatchNorm
uses and keeps its running statistics, dropout is off), and each module's own mode is restored after;
gradients are taken with respect to the input only (:func:`torch.autograd.grad`), so no parameter's
``.grad`` changes. (The RSLAD authors' ``attack_pgd`` calls ``loss.backward()``, which accumulates into
the parameters' gradients; their training loop zeroes them before it matters.)

Random starts, as the official codes draw them: ``uniform`` draws :math:`U(-\varepsilon, \varepsilon)`
per pixel and clamps to :math:`[0, 1]` (Madry et al.; the RSLAD authors' evaluation ``attack_pgd``);
``normal`` adds :math:`0.001\,N(0, 1)` and projects nothing before the first step (RSLAD's
``rslad_inner_loss``); ``none`` starts at the clean image. Draws come from ``generator`` (a CPU
generator, so a seeded evaluation gives the same draws on every device) or, without one, from the
global RNG of the input's device (checkpointed by the engine, so resumed training stays exact).

**Robust accuracy** (:func:`robust_accuracy`, the evaluator ``robust``): the percentage of labelled test
images still classified correctly after a PGD attack on the cross-entropy; with several ``restarts`` an
image counts only if every restart fails. As in the RSLAD authors' evaluation, the prediction on
:math:`x'` alone decides (a clean mistake is not counted separately). Defaults are that evaluation's:
PGD-20, :math:`\varepsilon = 8/255`, step 0.003, uniform start, one restart.

**Shapes:** inputs ``[B, C, ...]`` (any rank >= 2, channels on axis 1); the objective maps the
network's output ``[B, K]`` to a scalar.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from relkd import distributed as D
from relkd.evaluation.base import EvalContext, register_evaluator

__all__ = [
    "STARTS",
    "PixelSpace",
    "RobustAccuracy",
    "ce_objective",
    "eval_mode",
    "kl_objective",
    "pgd",
    "robust_accuracy",
]

Objective = Callable[[Tensor], Tensor]
STARTS = ("uniform", "normal", "none")


@dataclass(frozen=True)
class PixelSpace:
    """The map between a network's normalised inputs and pixels in ``[0, 1]``: ``x = (p - mean) / std``.

    Attributes:
        mean, std: one value per channel (or a single value for every channel); ``std > 0``.
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(
                f"expected as many means as stds (one per channel), got {self.mean} and {self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"the normalisation std must be positive, got {self.std}")

    @classmethod
    def of(cls, source: Any) -> PixelSpace | None:
        """The normalisation of a loader's data set (or of a data set): its ``mean`` and ``std``
        attributes, as relkd's in-memory and synthetic data sets have; None when it has none."""
        dataset = getattr(source, "dataset", source)
        mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
        if mean is None or std is None:
            return None
        values = [torch.as_tensor(v, dtype=torch.float64).flatten().tolist() for v in (mean, std)]
        return cls(tuple(values[0]), tuple(values[1]))

    def _view(self, values: tuple[float, ...], x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"expected inputs of shape [B, C, ...], got {list(x.shape)}")
        if len(values) not in (1, x.shape[1]):
            raise ValueError(
                f"the inputs have {x.shape[1]} channels but the normalisation has {len(values)} values"
            )
        shape = (1, len(values)) + (1,) * (x.dim() - 2)
        return torch.tensor(values, dtype=x.dtype, device=x.device).view(shape)

    def to_pixels(self, x: Tensor) -> Tensor:
        """``x * std + mean``: normalised inputs to pixels."""
        return x * self._view(self.std, x) + self._view(self.mean, x)

    def to_inputs(self, p: Tensor) -> Tensor:
        """``(p - mean) / std``: pixels to normalised inputs."""
        return (p - self._view(self.mean, p)) / self._view(self.std, p)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` in eval mode inside the block; each module's own mode restored after
    (a frozen part in eval mode inside a training network stays so)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 at least (logits under bf16/fp16 autocast), float64 kept."""
    return x if x.dtype == torch.float64 else x.float()


def ce_objective(target: Tensor) -> Objective:
    """The summed cross-entropy with ``target`` ``[B]`` (rows with target ``-1`` contribute nothing)."""

    def objective(logits: Tensor) -> Tensor:
        return F.cross_entropy(_wide(logits), target, ignore_index=-1, reduction="sum")

    return objective


def kl_objective(teacher_probs: Tensor) -> Objective:
    r"""The summed :math:`\sum_{b,c} p_t \,(\log p_t - \log \mathrm{softmax}(z))`: KL from the teacher's
    probabilities ``[B, K]`` (constants) to the network's, as RSLAD's inner maximisation
    (``nn.KLDivLoss(reduce=False)`` summed; :math:`0 \log 0 = 0`)."""
    p = _wide(teacher_probs.detach())
    entropy_term = torch.xlogy(p, p)

    def objective(logits: Tensor) -> Tensor:
        log_q = F.log_softmax(_wide(logits), dim=1)
        return (entropy_term - p * log_q).sum()

    return objective


def _start(
    clean: Tensor, epsilon: float, kind: str, init_std: float, generator: torch.Generator | None
) -> Tensor:
    if kind == "none":
        return clean.clone()
    if generator is not None:
        draw = torch.rand if kind == "uniform" else torch.randn
        noise = draw(clean.shape, generator=generator, dtype=clean.dtype).to(clean.device)
    else:
        noise = torch.rand_like(clean) if kind == "uniform" else torch.randn_like(clean)
    if kind == "uniform":
        return (clean + (2 * noise - 1) * epsilon).clamp(0.0, 1.0)
    return clean + init_std * noise


def _check(epsilon: float, step_size: float, steps: int, random_start: str) -> None:
    if epsilon < 0 or step_size < 0:
        raise ValueError(f"epsilon and step_size must be >= 0 (pixel units), got {epsilon} and {step_size}")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
    if random_start not in STARTS:
        raise ValueError(f"random_start must be one of {', '.join(STARTS)}, got {random_start!r}")


def pgd(
    model: nn.Module,
    inputs: Tensor,
    objective: Objective,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    random_start: str = "uniform",
    init_std: float = 0.001,
    pixels: PixelSpace | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The :math:`L_\infty` PGD attack on ``model`` (see the module docstring).

    Args:
        model: the attacked network, run in eval mode; its parameters, gradients, buffers and modes
            are the same after the call.
        inputs: the clean normalised inputs ``[B, C, ...]``.
        objective: maps the network's output to the scalar the attack increases.
        epsilon: radius of the ball, in pixel units.
        step_size: :math:`\alpha`, in pixel units.
        steps: number of steps (0 returns the projected start).
        random_start: ``uniform``, ``normal`` or ``none``.
        init_std: standard deviation of the ``normal`` start, in pixel units.
        pixels: the normalisation of ``inputs`` (None: inputs are pixels already).
        generator: a CPU generator for the random start (None: the global RNG).

    Returns:
        The adversarial inputs, normalised like ``inputs``, detached: ``[B, C, ...]``.
    """
    _check(epsilon, step_size, steps, random_start)
    space = pixels or PixelSpace()
    clean = space.to_pixels(inputs.detach())
    low = (clean - epsilon).clamp(min=0.0)
    high = (clean + epsilon).clamp(max=1.0)
    adv = _start(clean, epsilon, random_start, init_std, generator)
    with eval_mode(model), torch.enable_grad():
        for _ in range(int(steps)):
            adv = adv.detach().requires_grad_(True)
            loss = objective(model(space.to_inputs(adv)))
            (grad,) = torch.autograd.grad(loss, [adv], allow_unused=True)
            step = torch.zeros_like(adv) if grad is None else step_size * grad.sign()
            adv = torch.minimum(torch.maximum(adv.detach() + step, low), high)
    adv = torch.minimum(torch.maximum(adv.detach(), low), high)
    return space.to_inputs(adv)


def robust_accuracy(
    model: nn.Module,
    loader: Iterable[dict[str, Tensor]],
    *,
    epsilon: float = 8 / 255,
    step_size: float = 0.003,
    steps: int = 20,
    restarts: int = 1,
    random_start: str = "uniform",
    pixels: PixelSpace | None = None,
    seed: int = 0,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, float]:
    """Accuracy (percent) of ``model`` under the PGD attack on the cross-entropy, over ``loader``.

    Args:
        model: the network (left as it was).
        loader: batches ``{"input", "target"}``; rows with target ``-1`` are skipped.
        epsilon, step_size, steps, random_start: the attack (pixel units).
        restarts: attacks per image; it counts as robust only if every one fails.
        pixels: the inputs' normalisation (None: inputs are pixels).
        seed: seeds the random starts (a CPU generator), so the number is reproducible.
        autocast: context for the forwards (the run's autocast).

    Returns:
        ``{"acc1": robust accuracy, "clean_acc1": accuracy on the clean images}``; under data
        parallelism the counts are summed over ranks.

    Raises:
        ValueError: bad attack options, ``restarts < 1``, or no labelled image.
    """
    _check(epsilon, step_size, steps, random_start)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    generator = torch.Generator().manual_seed(seed)
    device = next(iter(model.parameters()), torch.empty(0)).device
    counts = torch.zeros(3, device=device)  # robust, clean, labelled
    with eval_mode(model):
        for batch in loader:
            labelled = batch["target"] >= 0
            x, y = batch["input"][labelled], batch["target"][labelled]
            if y.numel() == 0:
                continue
            with torch.no_grad(), autocast():
                correct = model(x).argmax(1) == y
            robust = torch.ones_like(correct)
            for _ in range(restarts):
                with autocast():
                    adv = pgd(
                        model,
                        x,
                        ce_objective(y),
                        epsilon=epsilon,
                        step_size=step_size,
                        steps=steps,
                        random_start=random_start,
                        pixels=pixels,
                        generator=generator,
                    )
                with torch.no_grad(), autocast():
                    robust &= model(adv).argmax(1) == y
            counts[0] += robust.sum()
            counts[1] += correct.sum()
            counts[2] += y.numel()
    if D.is_distributed():
        dist.all_reduce(counts)
    robust_hits, clean_hits, total = counts.tolist()
    if total == 0:
        raise ValueError("robust accuracy needs labelled images (target >= 0); the loader gave none")
    return {"acc1": 100.0 * robust_hits / total, "clean_acc1": 100.0 * clean_hits / total}


@register_evaluator("robust")
class RobustAccuracy:
    """The evaluator ``robust``: :func:`robust_accuracy` of each deployed network, column
    ``robust/acc1`` (and ``robust/clean_acc1``, the same images unattacked)::

        evaluate:
          robust: {epsilon: 0.2, step_size: 0.025, steps: 20, restarts: 1}

    Args:
        epsilon, step_size, steps, restarts, random_start, seed: as :func:`robust_accuracy`; the
            defaults are the RSLAD authors' evaluation (PGD-20, 8/255, step 0.003, uniform start).
        split: the evaluation split to attack (``test``).
        mean, std: the inputs' normalisation; default the split's data set's own
            (:meth:`PixelSpace.of`).
    """

    def __init__(
        self,
        epsilon: float = 8 / 255,
        step_size: float = 0.003,
        steps: int = 20,
        restarts: int = 1,
        random_start: str = "uniform",
        seed: int = 0,
        split: str = "test",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        _check(epsilon, step_size, steps, random_start)
        if restarts < 1:
            raise ValueError(f"robust: restarts must be >= 1, got {restarts}")
        if (mean is None) != (std is None):
            raise ValueError("robust: give both mean and std, or neither (the data set's are used)")
        self.options = {
            "epsilon": float(epsilon),
            "step_size": float(step_size),
            "steps": int(steps),
            "restarts": int(restarts),
            "random_start": random_start,
            "seed": int(seed),
        }
        self.split = split
        self.pixels = None if mean is None else PixelSpace(tuple(mean), tuple(std))

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        if self.split not in ctx.loaders:
            raise KeyError(
                f"robust: no evaluation split {self.split!r}; the run has {', '.join(ctx.loaders)}"
            )
        loader = ctx.loaders[self.split]
        pixels = self.pixels or PixelSpace.of(loader)
        if pixels is None:
            raise ValueError(
                f"robust: the {self.split} data set does not say its normalisation (mean, std); give "
                "the evaluator mean and std so that epsilon is measured in pixels"
            )
        return robust_accuracy(ctx.model, loader, pixels=pixels, autocast=ctx.autocast, **self.options)
