r"""CKDN: conditional knowledge distillation from a privileged clean view through a shared encoder.

Zheng, Yang, Fu, Zha & Luo, "Learning Conditional Knowledge Distillation for Degraded-Reference Image
Quality Assessment", ICCV 2021. A network must work from a *degraded* view :math:`x_d` (at test time
nothing else exists); while training, a *privileged* clean view :math:`x_r` of the same instance is also
known. Both views go through the **same** network :math:`f = h \circ g`: the privileged path is the
teacher, the degraded path the student, and the encoder's features of the degraded view are pulled
towards those of the clean view:

.. math::
    L = w_{ce}\,\ell\big(f(x_d), y\big) + w_p\,\ell\big(f(x_r), y\big)
        + w_f\, \frac1B \sum_b \Big(\frac{1}{D} \sum_{k} \big(g(x_d)_{bk} - g(x_r)_{bk}\big)^2\Big)^2,

with :math:`\ell` the task loss (cross-entropy, or the squared error of a quality score), :math:`g` the
features at ``tap``. Only the degraded path is deployed.

The official code (github.com/researchmm/CKDN, ``ckdn.py`` ``ResNet.forward`` and ``train.py``
``loss_fn``; read for this file) scores a restored image :math:`r` against the degraded image :math:`d`
it was restored from: an encoder Q of restored images, an encoder D shared by the degraded and the
pristine image, :math:`s_{dr} = \sigma(h(Q(r) - D(d)))` and :math:`s_{fr} = \sigma(h(Q(r) - D(ref)))` through
one later stage and head, and the feature term on D's outputs. Its numbers, the defaults here:

* ``feature_weight`` 30, on ``mean_b((mean_k (D(d) - D(ref))^2)^2)``: the per-image mean squared
  difference *squared* again (``diff`` is the per-image MSE and ``loss_fn`` takes ``(o4**2).mean() *
  30``): ``feature_reduction: code``; ``mse`` is the plain mean squared difference;
* both paths' squared errors with weight 1 (``d1 + d2``; ``ce_weight`` and ``privileged_weight``);
* gradients reach both paths' features (nothing is detached; ``detach_privileged: true`` makes the
  clean view a constant target instead);
* the first 10 of 30 epochs train an auxiliary head alone (``phase: elo``):
  :math:`\tfrac12 (s_{nr} - t)^2` with :math:`s_{nr} = \sigma(h'(Q(r_1) - Q(r_2)))` for two
  restorations of one reference and the Elo target :math:`t = 1 / (1 + 10^{2.5 (y_1 - y_2)})`
  (:func:`elo_target`; PIPAL's scores divided by 1000, the Elo 400 scale: ``elo_scale`` 2.5).

The paper's own loss text was not checked against the code here; the defaults follow the code.

Generic part. Any classification run can use it: the batch transform ``degrade`` makes the two views
(``privileged`` = the clean input, ``input`` = a blurred, noisy copy) and the step trains one student on
both with the cross-entropy; the IQA data set (:mod:`relkd.data.iqa`) gives ``input`` = (restored,
degraded) and the transform ``reference_view`` builds ``privileged`` = (restored, pristine). Both views
run in **one** forward of the concatenated batch, so BatchNorm's batch statistics are taken over both
(as in CKDN's shared later stage; its encoders see the two views in separate calls).

:class:`DRIQANet` (model ``ckdn_iqa``) is CKDN's network at MNIST scale.

**Shapes:** views ``[B, C, H, W]``; outputs ``[B, K]`` (``K = 1``: a score); features ``[B, ...]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relkd.data.iqa import swap_reference
from relkd.methods.base import StageInfo, Step, StepContext, StepOutput, register_step
from relkd.methods.transforms import Batch, Transform, register_transform
from relkd.methods.weighted_sum import cross_entropy
from relkd.models import FeatureTaps, register, resolve_taps

__all__ = [
    "CKDN",
    "FEATURE_REDUCTIONS",
    "FUNCTIONAL",
    "DRIQANet",
    "degrade",
    "elo_target",
    "feature_distance",
    "reference_view",
]

FUNCTIONAL = ("elo_target", "feature_distance")
FEATURE_REDUCTIONS = ("code", "mse")
PHASES = ("distill", "elo")
TASKS = ("ce", "mse")


def elo_target(score: Tensor, other: Tensor, scale: float = 2.5) -> Tensor:
    r"""CKDN's pairwise target :math:`1 / (1 + 10^{\text{scale}\,(y_1 - y_2)})`: the Elo expectation that the
    second image wins (0.5 for equal scores; ``t(a, b) + t(b, a) = 1``). **Shapes:** ``[B]`` -> ``[B]``."""
    if score.shape != other.shape:
        raise ValueError(
            f"expected two score vectors of the same shape, got {list(score.shape)} and {list(other.shape)}"
        )
    return torch.sigmoid(-scale * math.log(10.0) * (score - other))


def feature_distance(degraded: Tensor, privileged: Tensor, reduction: str = "code") -> Tensor:
    r"""The feature term between the two views' features ``[B, ...]``.

    ``code``: :math:`\frac1B \sum_b \big(\frac1D \sum_k (a_{bk} - b_{bk})^2\big)^2` (CKDN's released loss);
    ``mse``: :math:`\frac{1}{BD} \sum_{b,k} (a_{bk} - b_{bk})^2`. Gradients reach both arguments.

    Raises:
        ValueError: different shapes, no batch, or an unknown reduction.
    """
    if degraded.shape != privileged.shape or degraded.dim() < 2 or degraded.shape[0] < 1:
        raise ValueError(
            "expected degraded and privileged features of the same shape [B, ...] with B >= 1, got "
            f"{list(degraded.shape)} and {list(privileged.shape)}"
        )
    if reduction not in FEATURE_REDUCTIONS:
        raise ValueError(
            f"feature_reduction must be one of {', '.join(FEATURE_REDUCTIONS)}, got {reduction!r}"
        )
    wide = torch.float64 if degraded.dtype == torch.float64 else torch.float32
    per_image = (degraded.to(wide) - privileged.to(wide)).pow(2).flatten(1).mean(1)
    return per_image.pow(2).mean() if reduction == "code" else per_image.mean()


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    r = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


@register_transform("degrade")
def degrade(blur: float = 1.0, noise: float = 0.5) -> Transform:
    """Two views of every image: ``privileged`` the input as it comes, ``input`` a degraded copy, a Gaussian
    blur of std ``blur`` pixels (replicated borders; 0: none) plus Gaussian noise of std ``noise`` in the
    input's normalised units (0: none), drawn from the global RNG. The blur is linear with weights
    summing to 1, so blurring normalised inputs equals normalising blurred pixels."""
    if blur < 0 or noise < 0:
        raise ValueError(f"degrade: blur and noise must be >= 0, got {blur} and {noise}")

    def transform(batch: Batch, ctx: Any) -> Batch:
        x = batch["input"]
        degraded = _gaussian_blur(x, blur) if blur > 0 else x
        if noise > 0:
            degraded = degraded + noise * torch.randn_like(degraded)
        return {**batch, "input": degraded, "privileged": x}

    return transform


@register_transform("reference_view")
def reference_view(key: str = "reference", replace: bool = False) -> Transform:
    """``privileged`` = the input with its last channels replaced by ``batch[key]``
    (:func:`relkd.data.iqa.swap_reference`): on the IQA data set, (restored, degraded) becomes
    (restored, pristine). ``replace: true`` also makes it the ``input`` (a full-reference model)."""

    def transform(batch: Batch, ctx: Any) -> Batch:
        if key not in batch:
            raise KeyError(f"reference_view: the batch has no {key!r} (it has {', '.join(batch)})")
        privileged = swap_reference(batch["input"], batch[key])
        return {**batch, "privileged": privileged, **({"input": privileged} if replace else {})}

    return transform


@register_step("ckdn")
class CKDN(Step):
    """Conditional KD through a shared network (see the module docstring).

    Args:
        phase: ``distill`` (both paths and the feature term) or ``elo`` (CKDN's first epochs: the
            network's ``pairwise`` head on two items of one reference, Elo targets).
        task: ``ce`` (cross-entropy with ``target``, labelled rows) or ``mse`` (squared error of the
            output's first column with ``batch[score_key]``).
        tap: the features of the feature term (a tap name or module path of the student).
        privileged_weight: weight of the task loss on the privileged path (1).
        feature_weight: weight of the feature term (30).
        feature_reduction: ``code`` or ``mse`` (:func:`feature_distance`).
        detach_privileged: the privileged features are a constant in the feature term.
        score_key: the batch key of the quality score (``task: mse``; ``elo`` also reads ``pair`` and
            ``pair_<score_key>``).
        elo_weight, elo_scale: the ``elo`` phase's weight (1/2) and Elo scale (2.5).
        students, stage: filled in by the engine; the run has one student.

    The stage's ``ce_weight`` weights the degraded path's task loss. Losses: ``task``, ``privileged``,
    ``feature`` (``elo`` in that phase); metrics: their unweighted values. The logits (training
    accuracy) are the degraded path's under ``ce``, none under ``mse``.
    """

    def __init__(
        self,
        phase: str = "distill",
        task: str = "ce",
        tap: str = "stage1",
        privileged_weight: float = 1.0,
        feature_weight: float = 30.0,
        feature_reduction: str = "code",
        detach_privileged: bool = False,
        score_key: str = "score",
        elo_weight: float = 0.5,
        elo_scale: float = 2.5,
        students: Sequence[str] = (),
        stage: StageInfo | None = None,
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("phase", phase, PHASES),
            ("task", task, TASKS),
            ("feature_reduction", feature_reduction, FEATURE_REDUCTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"ckdn: {name} must be one of {', '.join(allowed)}, got {value!r}")
        if len(students) != 1:
            raise ValueError(f"ckdn trains one network on two views, got students {list(students)}")
        self.student, self.phase, self.task, self.tap = students[0], phase, task, tap
        self.privileged_weight, self.feature_weight = float(privileged_weight), float(feature_weight)
        self.feature_reduction, self.detach_privileged = feature_reduction, bool(detach_privileged)
        self.score_key, self.elo_weight, self.elo_scale = score_key, float(elo_weight), float(elo_scale)

    def extra_repr(self) -> str:
        return (
            f"phase={self.phase!r}, task={self.task!r}, tap={self.tap!r}, "
            f"privileged_weight={self.privileged_weight}, "
            f"feature_weight={self.feature_weight}, feature_reduction={self.feature_reduction!r}"
        )

    def _task(self, out: Tensor, batch: Batch) -> Tensor:
        if self.task == "ce":
            return cross_entropy(out, batch["target"])
        if self.score_key not in batch:
            raise KeyError(
                f"ckdn: task mse reads batch[{self.score_key!r}]; the batch has {', '.join(batch)}"
            )
        return (out.float().reshape(out.shape[0], -1)[:, 0] - batch[self.score_key].float()).pow(2).mean()

    def _elo(self, ctx: StepContext) -> StepOutput:
        net = ctx.networks[self.student]
        pairwise = getattr(net, "pairwise", None)
        if pairwise is None:
            raise TypeError(
                f"ckdn phase elo needs a network with a pairwise(x, pair) head; {type(net).__name__} has none"
            )
        batch = ctx.batch
        other = f"pair_{self.score_key}"
        if "pair" not in batch or other not in batch:
            raise KeyError(
                f"ckdn phase elo reads batch['pair'] and batch[{other!r}]; the batch has {', '.join(batch)}"
            )
        s_nr = pairwise(batch["input"], batch["pair"]).float().reshape(-1)
        target = elo_target(batch[self.score_key].float(), batch[other].float(), self.elo_scale)
        value = (s_nr - target).pow(2).mean()
        return StepOutput(None, {"elo": self.elo_weight * value}, metrics={"elo": value.detach()})

    def forward(self, ctx: StepContext) -> StepOutput:
        if self.phase == "elo":
            return self._elo(ctx)
        batch = ctx.batch
        x = batch["input"]
        both = bool(self.privileged_weight or self.feature_weight)
        if both and "privileged" not in batch:
            raise KeyError(
                "ckdn reads the privileged view batch['privileged']: make it with a batch transform "
                "(train.batch_transform: {name: degrade} or {name: reference_view})"
            )
        # The network itself, not a compiled wrapper (train.compile): it is hooked for this one call.
        net = getattr(ctx.networks[self.student], "_orig_mod", ctx.networks[self.student])
        inputs = torch.cat([x, batch["privileged"]]) if both else x
        with FeatureTaps(net, resolve_taps(net, [self.tap])) as taps:
            out = net(inputs)
            features = taps[self.tap] if self.feature_weight else None
        b = x.shape[0]
        degraded = out[:b]
        values = {"task": self._task(degraded, batch)}
        losses = {"task": ctx.stage.ce_weight * values["task"]}
        if self.privileged_weight:
            values["privileged"] = self._task(out[b:], batch)
            losses["privileged"] = self.privileged_weight * values["privileged"]
        if self.feature_weight:
            clean = features[b:].detach() if self.detach_privileged else features[b:]
            values["feature"] = feature_distance(features[:b], clean, self.feature_reduction)
            losses["feature"] = self.feature_weight * values["feature"]
        logits = degraded if self.task == "ce" else None
        return StepOutput(logits, losses, metrics={k: v.detach() for k, v in values.items()})


def _conv(a: int, b: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(a, b, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(b),
        nn.ReLU(inplace=True),
    ]


def _head(width: int, outputs: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(width, 2 * width),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(2 * width, 2 * width),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(2 * width, outputs),
    )


class DRIQANet(nn.Module):
    r"""CKDN's degraded-reference IQA network at MNIST scale.

    The input stacks a restored image and its reference (degraded, or pristine on the privileged path)
    on the channel axis. An encoder of restored images Q and an encoder D of references (each two
    3x3 conv-BN-ReLU layers of ``width`` channels and a 2x2 max-pool; CKDN: a 7x7 stride-2 conv, a max-pool
    and ResNet-50's first stage), their difference :math:`Q(r) - D(d)` through a shared stage (two
    conv-BN-ReLU of ``2 width``, the first with stride 2; CKDN: ResNet-50's second stage), global average
    pooling and a three-layer MLP head with dropout (CKDN: 512-2048-2048-1, dropout 0.5), then a sigmoid:
    the score. :meth:`pairwise` is CKDN's auxiliary path, :math:`\sigma(h'(Q(r_1) - Q(r_2)))` through an
    auxiliary stage and head of the same shapes. Taps: ``stage1`` is D's output (the feature term's),
    ``stage2`` the shared stage's, ``penultimate`` the pooled features.

    Args:
        num_classes: outputs of the head (1: a score).
        in_channels: channels of the stacked input, twice an image's.
        width: channels of the encoders.
        dropout: of the heads (CKDN's 0.5).

    **Shapes:** input ``[B, 2c, H, W]`` -> ``[B, num_classes]`` in (0, 1).
    """

    default_taps: ClassVar[dict[str, str]] = {
        "stage1": "reference_encoder",
        "stage2": "shared",
        "feature_map": "shared",
        "penultimate": "head.0:input",
    }

    def __init__(
        self, num_classes: int = 1, in_channels: int = 2, width: int = 16, dropout: float = 0.5
    ) -> None:
        super().__init__()
        if in_channels % 2 or in_channels < 2:
            raise ValueError(
                f"expected an input of two stacked images (an even number of channels), got {in_channels}"
            )
        self.image_channels = c = in_channels // 2
        self.restored_encoder = nn.Sequential(*_conv(c, width), *_conv(width, width), nn.MaxPool2d(2))
        self.reference_encoder = nn.Sequential(*_conv(c, width), *_conv(width, width), nn.MaxPool2d(2))
        self.shared = nn.Sequential(*_conv(width, 2 * width, 2), *_conv(2 * width, 2 * width))
        self.auxiliary = nn.Sequential(*_conv(width, 2 * width, 2), *_conv(2 * width, 2 * width))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = _head(2 * width, num_classes, dropout)
        self.auxiliary_head = _head(2 * width, 1, dropout)

    def forward(self, x: Tensor) -> Tensor:
        c = self.image_channels
        f = self.restored_encoder(x[:, :c]) - self.reference_encoder(x[:, c:])
        return torch.sigmoid(self.head(self.pool(self.shared(f))))

    def pairwise(self, x: Tensor, pair: Tensor) -> Tensor:
        """CKDN's auxiliary score of two restored images (the first channels of ``x`` and ``pair``):
        ``[B, 1]``, trained towards :func:`elo_target`."""
        c = self.image_channels
        f = self.restored_encoder(x[:, :c]) - self.restored_encoder(pair[:, :c])
        return torch.sigmoid(self.auxiliary_head(self.pool(self.auxiliary(f))))


@register("ckdn_iqa")
def ckdn_iqa(num_classes: int = 1, in_channels: int = 2, width: int = 16, dropout: float = 0.5) -> DRIQANet:
    """A :class:`DRIQANet` (CKDN's DR-IQA network at MNIST scale)."""
    return DRIQANet(num_classes, in_channels, width, dropout)
