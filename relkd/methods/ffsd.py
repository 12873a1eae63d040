r"""FFSD: online distillation into a leader through feature fusion and self-distillation.

M common students :math:`s_1 \dots s_M`, a leader :math:`l` of the same architecture, a fusion module
:math:`\phi`, a trans-fusion head :math:`\tau` on the leader and self-distillation (SD) decoders
:math:`D` train together from scratch; only the leader is deployed. With :math:`F^{n}_k` the ``k``-th
tapped feature map of network ``n`` (:math:`F^{n}` its last one, before the pool), the attention map
:math:`a(F) = \frac{1}{C} \sum_c F_c^2` and :math:`n(\cdot)` the L2-normalised flattening,
:math:`\mathrm{KL}_T(t \| s) = T^2 \cdot \frac{1}{B} \sum_b \mathrm{KL}(\mathrm{softmax}(t_b/T) \|
\mathrm{softmax}(s_b/T))` and :math:`\mathrm{AT}(x, y) = \operatorname{mean}\big((n(a(x)) -
n(a(y)))^2\big)`, every target detached:

.. math::
    \mathcal{L}_{s_i} &= \mathrm{CE}(z_i, y) + \frac{1}{M-1} \sum_{j \ne i} \mathrm{KL}_T(z_j \| z_i)
        + [i > 1]\, \lambda_{div}(e) \Big( \operatorname{mean}\big((n(a(F^{i})) - r(F^{i-1}))^2\big)
        + \sum_k \mathrm{AT}\big(F^{i}_k, D^{i}_k(\rho(F^{i-1}))\big) \Big) \\
    \mathcal{L}_{\phi} &= \mathrm{CE}(z_\phi, y) + \mathrm{KL}_T\big(\tfrac{1}{M} \textstyle\sum_i z_i \,\|\,
        z_\phi\big), \qquad (z_\phi, G) = \phi\big([F^{1}, \dots, F^{M}]\big) \\
    \mathcal{L}_{l} &= \mathrm{CE}(z_l, y) + \mathrm{KL}_T(z_\phi \| z_l) + \lambda_{fus}(e) \Big(
        \mathrm{AT}(F^{l}, G) + \mathrm{AT}\big(\tau(F^{l}), [F^{1}, \dots, F^{M}]\big)
        + \sum_k \mathrm{AT}\big(F^{l}_k, D^{l}_k(G)\big) \Big) \\
    \mathcal{L}_{D^n} &= \lambda_{sd}(e) \sum_k \Big( \operatorname{mean}\big((n(D^{n}_k(F^{n})) -
        n(F^{n}_k))^2\big) + \mathrm{AT}\big(D^{n}_k(F^{n}), F^{n}_k\big) \Big)

for the decoders of the students :math:`i > 1` and of the leader. The diversity target :math:`r`
reflects the upper two thirds of the previous student's attention about half its norm: with
:math:`q = a(F)` flattened, :math:`\hat q = n(q)` and :math:`\theta` the :math:`\lfloor HW/3
\rfloor`-th smallest entry of :math:`\hat q`,

.. math::
    r(F) = \big(\tfrac{\lVert q \rVert}{2} - \hat q\big) \operatorname{sign}(\hat q - \theta)
        + \tfrac{\lVert q \rVert}{2}, \qquad
    \rho(F) = F + \frac{\lVert q \rVert}{C} \big(r(F) - \hat q\big)

(entries below :math:`\theta` are kept, entries above it become :math:`\lVert q \rVert - \hat q`, the
entry equal to it :math:`\lVert q \rVert / 2`); :math:`\rho` shifts the feature map by that change,
broadcast over the channels, and feeds the SD decoder of student ``i``. Each weight is warmed up,
:math:`\lambda(e) = \lambda \exp(-5 (1 - e/5)^2)` for :math:`e \le 5`, then :math:`\lambda`.

Li et al., "Distilling a Powerful Student Model via Online Knowledge Distillation", IEEE TNNLS 2022
(arXiv:2103.14473). We follow the authors' code (github.com/SJLeo/FFSD, ``CIFARTrainer.py``
``train_with_test``, ``diversity_loss``, ``diversity_target``, ``self_distillation_loss``,
``train_self_distillation_model``, ``lambda_warmup``; ``models/fusion_module.py``;
``models/self_distillation.py``; ``options/options.py``):

- Defaults: ``M = 2`` common students (``--model_num 2``), ``T = 2``, :math:`\lambda_{div} = 10^{-5}`,
  :math:`\lambda_{fus} = 10`, :math:`\lambda_{sd} = 1000`. The SD term of a common student is weighted
  by :math:`\lambda_{div}` and the leader's SD term by :math:`\lambda_{fus}`, as in the code;
  :math:`\lambda_{sd}` weighs only the decoders' own training. The KL terms are batch means.
- Warm-up: the code's epochs count from 1 (``--start_epoch 1``), so relkd's stage epoch ``e0``
  (0-based) uses :math:`e = e_0 + 1`: factors 0.041, 0.165, 0.449, 0.819 in the first four epochs,
  1 from the fifth on (``warmup_epochs`` is the code's ``alpha = 5``).
- Fusion module: a depthwise 3x3 convolution over the ``M C`` concatenated channels, BN, ReLU, a 1x1
  convolution to ``C`` channels, BN, ReLU (the map ``G``), an average pool and a linear classifier;
  convolutions He-normal (fan-out), BN at 1 and 0, the linear layer at torch's default. Its input,
  the students' last maps, is detached. The code pools with ``AvgPool2d(H)`` (square maps); we average
  over the whole map, the same for square maps.
- Trans-fusion head :math:`\tau`: a depthwise 3x3 convolution, BN, ReLU, a 1x1 convolution from ``C``
  to ``M C`` channels, BN, ReLU, on the leader's last map, initialised like the fusion module. The
  code builds it into the leader network (trained by the leader's optimiser); here it is a module of
  the step (``steps.<i>.trans_fusion``), so the deployed leader is the plain network.
- SD decoders: ConvTranspose(3x3, no bias) + BN + ReLU blocks from the last tapped map back to each
  earlier one, outputs matched to :math:`F_1 \dots F_{K-1}`, at torch's default initialisation. The
  code's ResNet/WRN decoders use stride 2 (output padding 1) and halve the channels at each block;
  its DenseNet/GoogLeNet decoders list their channels by hand. Ours take each block's output channels
  from the tapped map it reconstructs and its stride from the ratio of the spatial sizes measured on
  the probe batch (2 for the CIFAR ResNets and WRNs: the code's decoders; 1 where a stage keeps the
  size, e.g. ``lenet``'s ``stage3``). Targets for the networks come from a decoder in eval mode (its
  running BN statistics), its own training runs it in train mode, as in the code.
- Taps: the code hooks the stage outputs, the last of them the map before the pool (``layer1 ..
  layer3`` of the CIFAR ResNets, ``layer1, layer2, relu1`` of the WRNs, ``layer1 .. layer4`` on
  ImageNet). We take ``stage1``, ``stage2``, ``stage3``, ``feature_map``, each distinct tensor once
  (so ``stage1 .. stage3`` on the CIFAR ResNets and ``lenet``, ``stage1 .. stage3, stage4`` where
  ``feature_map`` is ``stage4``). relkd's WRN ``feature_map`` is before the final BN-ReLU, the code's
  after it.
- Updates: the code steps the students, then the fusion module, then the leader, then the decoders,
  each with its own optimiser, on gradients of one forward. Every target above is detached, so each
  loss reaches only its own module and one backward of the sum gives the same gradients; this step
  returns the losses and the engine makes one update. The code's optimisers: SGD (lr 0.1, momentum
  0.9, Nesterov, weight decay 1e-4) for the networks and the trans-fusion head, the same with weight
  decay 1e-5 for the fusion module, Adam (lr 1e-3, weight decay 1e-4) for the decoders, all multiplied
  by 0.1 at epochs 150 and 225 of 299 (``range(1, 300)``). **Deviation:** the stage has one optimiser
  (the recipe's) for all of them, so the fusion module's weight decay and the decoders' Adam are
  not reproduced.
- relkd's batches may hold unlabelled transfer rows (target ``-1``): the cross-entropies read the
  labelled rows (weighted by the stage's ``ce_weight``, 1 in the code), every other term all rows.

The paper was not re-checked for the trans-fusion and SD details: what is here is the code's.

Shapes:
    every network's tapped maps ``[B, C_k, H_k, W_k]`` (equal across the networks), logits ``[B, K]``;
    the fusion module ``[B, M C, H, W] -> ([B, K], [B, C, H, W])``; the trans-fusion head ``[B, C, H,
    W] -> [B, M C, H, W]``; a decoder ``[B, C, H, W] -> [[B, C_1, H_1, W_1], ..., [B, C_{K-1}, ...]]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relkd.graphs.ops import compute_dtype
from relkd.losses.at import attention_map, attention_transfer
from relkd.losses.kd import kd
from relkd.methods.base import Features, Step, StepContext, StepOutput, register_step
from relkd.methods.weighted_sum import cross_entropy
from relkd.models.weight_init import init_conv_bn

__all__ = [
    "FFSD",
    "FusionModule",
    "SDDecoder",
    "TransFusion",
    "diversity_loss",
    "reflected_attention",
    "reflected_features",
    "warmup",
]

CHAIN_TAPS = ("stage1", "stage2", "stage3", "feature_map")


def warmup(weight: float, epoch: int, epochs: int = 5) -> float:
    """``weight * exp(-5 (1 - epoch / epochs)^2)`` for ``epoch <= epochs``, else ``weight``; ``epoch``
    counts from 1 as in the authors' code (``epochs = 0`` disables the warm-up)."""
    if epochs <= 0 or epoch > epochs:
        return weight
    return weight * math.exp(-5.0 * (1.0 - epoch / epochs) ** 2)


def _raw_attention(features: Tensor) -> Tensor:
    if features.dim() != 4:
        raise ValueError(f"ffsd: expected a feature map [B, C, H, W], got shape {tuple(features.shape)}")
    return features.to(compute_dtype(features.dtype)).pow(2).mean(1).flatten(1)


def reflected_attention(features: Tensor) -> Tensor:
    """The diversity target ``r(F)`` of the module docstring: ``[B, C, H, W] -> [B, H W]``."""
    q = _raw_attention(features)
    k = q.shape[1] // 3
    if k < 1:
        raise ValueError(
            f"ffsd: the diversity target needs a last feature map of at least 3 positions, got "
            f"{tuple(features.shape[2:])}"
        )
    norm = q.norm(dim=1, keepdim=True)
    unit = F.normalize(q, dim=1)
    threshold = unit.kthvalue(k, dim=1, keepdim=True).values
    return (norm / 2 - unit) * torch.sign(unit - threshold) + norm / 2


def reflected_features(features: Tensor) -> Tensor:
    """``rho(F)``: the feature map shifted, uniformly over its channels, by the change from its
    normalised attention to :func:`reflected_attention`, times ``||a(F)|| / C``. Same shape as ``F``."""
    q = _raw_attention(features)
    change = (reflected_attention(features) - F.normalize(q, dim=1)) * q.norm(dim=1, keepdim=True)
    b, c, h, w = features.shape
    return features + (change / c).view(b, 1, h, w).to(features.dtype)


def diversity_loss(current: Tensor, previous: Tensor) -> Tensor:
    """``mean((n(a(current)) - r(previous))^2)``, ``previous`` a constant: two maps ``[B, C, H, W]``
    of equal spatial size -> scalar."""
    if current.shape[0] != previous.shape[0] or current.shape[2:] != previous.shape[2:]:
        raise ValueError(
            f"ffsd: expected feature maps of the same batch and spatial size, got {tuple(current.shape)} "
            f"and {tuple(previous.shape)}"
        )
    target = reflected_attention(previous.detach())
    return (attention_map(current.to(target.dtype)) - target).pow(2).mean()


def _normalized_mse(x: Tensor, target: Tensor) -> Tensor:
    dtype = compute_dtype(x.dtype)
    diff = F.normalize(x.to(dtype).flatten(1), dim=1) - F.normalize(
        target.detach().to(dtype).flatten(1), dim=1
    )
    return diff.pow(2).mean()


def _conv_bn_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU())


class FusionModule(nn.Module):
    """Fuse the concatenated last maps of ``models`` networks of ``channels`` channels into one map of
    ``channels`` channels and its logits (see the module docstring).

    **Shapes:** ``[B, models * channels, H, W] -> ([B, num_classes], [B, channels, H, W])``.
    """

    def __init__(self, channels: int, models: int, num_classes: int) -> None:
        super().__init__()
        width = channels * models
        self.mix = _conv_bn_relu(nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), width)
        self.reduce = _conv_bn_relu(nn.Conv2d(width, channels, 1, bias=False), channels)
        self.fc = nn.Linear(channels, num_classes)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        fused = self.reduce(self.mix(x))
        return self.fc(fused.mean((2, 3))), fused


class TransFusion(nn.Module):
    """The leader's head that widens its last map to the fusion module's input width.

    **Shapes:** ``[B, channels, H, W] -> [B, models * channels, H, W]``.
    """

    def __init__(self, channels: int, models: int) -> None:
        super().__init__()
        self.mix = _conv_bn_relu(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False), channels
        )
        self.widen = _conv_bn_relu(nn.Conv2d(channels, channels * models, 1, bias=False), channels * models)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.widen(self.mix(x))


class SDDecoder(nn.Module):
    """Reconstruct a network's earlier tapped maps from its last one (see the module docstring).

    Args:
        shapes: ``(C, H, W)`` of the tapped maps, earliest first, the last one the decoder's input.

    **Shapes:** ``[B, *shapes[-1]] -> [[B, *shapes[0]], ..., [B, *shapes[-2]]]`` (earliest first).

    Raises:
        ValueError: fewer than two maps, or an earlier map whose size is not a whole multiple of the
            next one's (the same in both dimensions).
    """

    def __init__(self, shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if len(shapes) < 2:
            raise ValueError(f"ffsd: a decoder needs at least two tapped maps, got {len(shapes)}")
        blocks = []
        for (c_out, h_out, w_out), (c_in, h_in, w_in) in reversed(
            list(zip(shapes[:-1], shapes[1:], strict=True))
        ):
            stride = h_out // h_in
            if stride < 1 or (h_out, w_out) != (stride * h_in, stride * w_in):
                raise ValueError(
                    f"ffsd: cannot decode a {h_in}x{w_in} map into the earlier {h_out}x{w_out} one: the "
                    "earlier map must be a whole multiple of the later one, the same in both dimensions"
                )
            conv = nn.ConvTranspose2d(
                c_in, c_out, 3, stride, padding=1, output_padding=stride - 1, bias=False
            )
            blocks.append(_conv_bn_relu(conv, c_out))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs[::-1]

    @torch.no_grad()
    def targets(self, x: Tensor) -> list[Tensor]:
        """The outputs in eval mode (running BN statistics, which it leaves as they are), as constants."""
        mode = self.training
        self.eval()
        try:
            return self(x)
        finally:
            self.train(mode)


@register_step("ffsd")
class FFSD(Step):
    r"""The FFSD step (see the module docstring): common students, fusion module, leader and SD decoders
    in one update; the logits are the leader's.

    Args:
        students: the run's students (injected): every one but ``leader`` is a common student, in
            config order.
        features: the probe batch's features (injected), to size the modules.
        num_classes: the number of classes (injected; else read from the probe logits).
        terms: the method's loss terms (injected); FFSD computes its own and takes none.
        leader: the student that is the leader.
        T: the temperature of every KL term.
        lambda_diversity: :math:`\lambda_{div}`, weight of the diversity and SD terms of the students
            after the first.
        lambda_fusion: :math:`\lambda_{fus}`, weight of the leader's fusion, trans-fusion and SD terms.
        lambda_self_distillation: :math:`\lambda_{sd}`, weight of the decoders' own losses.
        warmup_epochs: the warm-up's length ``alpha`` (0: none).

    Raises:
        ValueError: no leader among the students, fewer than two common students, loss terms given, a
            non-positive ``T``, networks whose tapped maps are not ``[B, C, H, W]`` or differ.
    """

    taps = CHAIN_TAPS
    deploy = ("leader",)

    def __init__(
        self,
        students: Sequence[str],
        features: Mapping[str, Features],
        num_classes: int | None = None,
        terms: Mapping[str, Any] | None = None,
        leader: str = "leader",
        T: float = 2.0,
        lambda_diversity: float = 1e-5,
        lambda_fusion: float = 10.0,
        lambda_self_distillation: float = 1000.0,
        warmup_epochs: int = 5,
    ) -> None:
        super().__init__()
        if leader not in students:
            raise ValueError(
                f"ffsd: the leader {leader!r} is not a student of the run ({', '.join(students)})"
            )
        common = [s for s in students if s != leader]
        if len(common) < 2:
            raise ValueError(f"ffsd: needs at least two common students besides the leader, got {common}")
        if terms:
            raise ValueError(f"ffsd computes its own losses; remove the method's losses ({', '.join(terms)})")
        if T <= 0:
            raise ValueError(f"ffsd: the temperature T must be positive, got {T}")
        self.leader, self.common = leader, common
        self.T, self.warmup_epochs = T, warmup_epochs
        self.lambdas = (lambda_diversity, lambda_fusion, lambda_self_distillation)
        probe = features[leader]
        self.chain = [
            t for i, t in enumerate(CHAIN_TAPS) if all(probe[t] is not probe[u] for u in CHAIN_TAPS[i + 1 :])
        ]
        shapes = self._shapes(features, [*common, leader])
        channels = shapes[-1][0]
        if shapes[-1][1] * shapes[-1][2] < 3:
            raise ValueError(
                f"ffsd: the diversity target needs a last feature map of at least 3 positions, got "
                f"{shapes[-1][1]}x{shapes[-1][2]} ({self.chain[-1]})"
            )
        classes = num_classes or probe["logits"].shape[1]
        self.fusion = FusionModule(channels, len(common), classes)
        self.trans_fusion = TransFusion(channels, len(common))
        self.decoders = nn.ModuleDict({n: SDDecoder(shapes) for n in [*common[1:], leader]})

    def _shapes(self, features: Mapping[str, Features], networks: Sequence[str]) -> list[tuple[int, ...]]:
        shapes = None
        for name in networks:
            maps = [features[name][t] for t in self.chain]
            for tap, value in zip(self.chain, maps, strict=True):
                if not isinstance(value, Tensor) or value.dim() != 4:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(
                        f"ffsd needs feature maps [B, C, H, W]; {name}'s {tap!r} is {shape}: use "
                        "convolutional students"
                    )
            own = [tuple(m.shape[1:]) for m in maps]
            if shapes is not None and own != shapes:
                raise ValueError(
                    f"ffsd: every student needs the same architecture; {name}'s maps {own} differ from "
                    f"{networks[0]}'s {shapes}"
                )
            shapes = own
        return shapes

    def weights(self, stage_epoch: int) -> tuple[float, float, float]:
        """``(lambda_diversity, lambda_fusion, lambda_self_distillation)`` warmed up for the stage's
        0-based epoch ``stage_epoch`` (the code's epoch ``stage_epoch + 1``)."""
        return tuple(warmup(w, stage_epoch + 1, self.warmup_epochs) for w in self.lambdas)

    def forward(self, ctx: StepContext) -> StepOutput:
        leader, common, T = self.leader, self.common, self.T
        nets = {n: ctx.run(n) for n in [leader, *common]}
        maps = {n: [nets[n][t] for t in self.chain] for n in nets}
        logits = {n: nets[n]["logits"] for n in nets}
        target = ctx.batch["target"]
        ce_weight = ctx.stage.ce_weight
        lam_div, lam_fusion, lam_sd = self.weights(ctx.stage_epoch)
        losses: dict[str, Tensor] = {}
        raw: dict[str, Tensor] = {}

        def add(key: str, weight: float, value: Tensor) -> None:
            raw[key] = value
            losses[key] = weight * value

        peers = len(common) - 1
        for i, name in enumerate(common):
            losses[f"{name}.ce"] = ce_weight * cross_entropy(logits[name], target)
            others = (logits[o] for o in common if o != name)
            losses[f"{name}.kl"] = sum(kd(logits[name], other, T) for other in others) / peers
            if i == 0:
                continue
            previous = maps[common[i - 1]][-1].detach()
            add(f"{name}.diversity", lam_div, diversity_loss(maps[name][-1], previous))
            decoded = self.decoders[name].targets(reflected_features(previous))
            add(f"{name}.sd", lam_div, attention_transfer(maps[name][:-1], decoded))

        stacked = torch.cat([maps[n][-1].detach() for n in common], dim=1)
        fusion_logits, fused = self.fusion(stacked)
        ensemble = torch.stack([logits[n].detach() for n in common]).mean(0)
        losses["fusion.ce"] = ce_weight * cross_entropy(fusion_logits, target)
        losses["fusion.kl"] = kd(fusion_logits, ensemble, T)

        own = maps[leader]
        losses["leader.ce"] = ce_weight * cross_entropy(logits[leader], target)
        losses["leader.kl"] = kd(logits[leader], fusion_logits.detach(), T)
        add("leader.fusion", lam_fusion, attention_transfer(own[-1], fused))
        add("leader.trans_fusion", lam_fusion, attention_transfer(self.trans_fusion(own[-1]), stacked))
        decoded = self.decoders[leader].targets(fused.detach())
        add("leader.sd", lam_fusion, attention_transfer(own[:-1], decoded))

        for name, decoder in self.decoders.items():
            pairs = zip(decoder(maps[name][-1].detach()), maps[name][:-1], strict=True)
            add(
                f"decoder.{name}",
                lam_sd,
                sum(_normalized_mse(d, f) + attention_transfer(d, f) for d, f in pairs),
            )

        losses = {k: v.to(compute_dtype(v.dtype)) for k, v in losses.items()}
        return StepOutput(logits[leader], losses, metrics=raw)
