r"""PGD adversarial training: the network trained on its own worst-case inputs.

.. math::
    \min_\theta \; \mathbb{E}_{(x, y)} \Big[\max_{\|p(x') - p(x)\|_\infty \le \varepsilon,\; p(x') \in [0,1]}
        \mathrm{CE}\big(f_\theta(x'), y\big)\Big],

the inner maximum approximated by PGD on the cross-entropy (:func:`relkd.evaluation.robust.pgd`, in
pixel space; see :mod:`relkd.evaluation.robust` for the normalisation). Madry, Makelov, Schmidt, Tsipras
& Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018. Each step attacks
the labelled rows of the batch, then minimises the mean cross-entropy on the adversarial images alone
(no clean term), weighted by the stage's ``ce_weight``; rows without a label (``-1``) are left out.

Defaults are the authors' CIFAR-10 code (github.com/MadryLab/cifar10_challenge ``config.json``):
:math:`\varepsilon = 8/255`, 10 steps of :math:`2/255`, a uniform random start, loss ``xent``. Their
MNIST code (``mnist_challenge``) uses :math:`\varepsilon = 0.3` and 40 steps of 0.01: set the options.
Their recipe (momentum SGD 0.9, lr 0.1 then 0.01 and 0.001 at 40k and 60k of 80k steps, batch 128,
weight decay 2e-4) is the suite's to set.

Where we differ from the authors. Their TensorFlow graph computes the attack with the network built
in training mode: BatchNorm normalises with the attacked batch's statistics and updates its moving
averages at every attack forward. Here the network is attacked in eval mode (running statistics,
untouched), as the RSLAD and TRADES authors' PyTorch codes do, so that only the training forward on
the adversarial batch moves the statistics. For a network without BatchNorm or dropout the two agree.

In relkd this is also how a robust teacher is made: ``teachers: {robust: {like: teacher, method:
pgd_at}}`` trains it once, before the methods that distil from it (RSLAD).

**Shapes:** inputs ``[B, C, H, W]`` (normalised), targets ``[B]``; the loss a scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from relkd.evaluation.robust import STARTS, PixelSpace, ce_objective, pgd
from relkd.methods.base import StageInfo, Step, StepContext, StepOutput, register_step
from relkd.methods.weighted_sum import cross_entropy

__all__ = ["PGDAT"]


@register_step("pgd_at")
class PGDAT(Step):
    """PGD adversarial training of the run's student (see the module docstring).

    Args:
        epsilon: radius of the attack's ball, pixel units (8/255).
        step_size: its step, pixel units (2/255).
        steps: its number of steps (10).
        random_start: ``uniform`` (the authors'), ``normal`` or ``none``.
        mean, std: the inputs' per-channel normalisation; default the data set's (injected as
            ``pixels`` by the engine).
        students, stage, pixels: filled in by the engine; the run has one student.

    Its loss is ``adv_ce``, the stage's ``ce_weight`` times the cross-entropy on the adversarial
    images; its logits (training accuracy) are the student's on them (zeros on unlabelled rows, which
    are not counted).
    """

    def __init__(
        self,
        epsilon: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        random_start: str = "uniform",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        students: Sequence[str] = (),
        stage: StageInfo | None = None,
        pixels: PixelSpace | None = None,
    ) -> None:
        super().__init__()
        if len(students) != 1:
            raise ValueError(f"pgd_at trains one network, got students {list(students)}")
        if random_start not in STARTS:
            raise ValueError(f"pgd_at: random_start must be one of {', '.join(STARTS)}, got {random_start!r}")
        if epsilon < 0 or step_size < 0 or steps < 0:
            raise ValueError(
                f"pgd_at: epsilon, step_size and steps must be >= 0, got {epsilon}, {step_size}, {steps}"
            )
        if stage is not None and not stage.ce_weight:
            raise ValueError(
                "pgd_at minimises the cross-entropy on adversarial images: ce_weight must not be 0"
            )
        if (mean is None) != (std is None):
            raise ValueError("pgd_at: give both mean and std, or neither (the data set's are used)")
        self.student = students[0]
        self.attack = {
            "epsilon": float(epsilon),
            "step_size": float(step_size),
            "steps": int(steps),
            "random_start": random_start,
        }
        self.pixels = PixelSpace(tuple(mean), tuple(std)) if mean is not None else pixels

    def extra_repr(self) -> str:
        return f"student={self.student!r}, attack={self.attack}"

    def forward(self, ctx: StepContext) -> StepOutput:
        if self.pixels is None:
            raise ValueError(
                "pgd_at attacks in pixel space but the data set does not say its normalisation; give the "
                "step mean and std"
            )
        target: Tensor = ctx.batch["target"]
        rows = (target >= 0).nonzero().flatten()
        x, y = ctx.batch["input"][rows], target[rows]
        x_adv = pgd(ctx.networks[self.student], x, ce_objective(y), pixels=self.pixels, **self.attack)
        logits = ctx.run(self.student, x_adv)["logits"]
        loss = ctx.stage.ce_weight * cross_entropy(logits, y)
        full = logits.new_zeros((target.shape[0], logits.shape[1]))
        full[rows] = logits.detach()
        return StepOutput(full, {"adv_ce": loss})
