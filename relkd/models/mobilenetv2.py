"""MobileNetV2 for 32x32 images, the half-width variant of the CRD benchmark zoo (``mobilenetv2``).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, as adapted in
the code of Tian et al., "Contrastive Representation Distillation", ICLR 2020 (``mobile_half``:
width multiplier 0.5, expansion 6, a 1280-channel last convolution). Differences from the paper
kept for comparability: every block, the first included, has the 1x1 expansion convolution, and
strides are (2 in the stem, then 1, 1, 2, 2, 1, 2, 1) so 32x32 inputs end at 2x2. Module names match
that code, so its checkpoints load.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from relkd.models.weight_init import init_conv_bn
from relkd.models.zoo import register

__all__ = ["InvertedResidual", "MobileNetV2"]

# (expansion or None for the model's, output channels at width 1, blocks, first stride)
_SETTING = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def _conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; a residual when shapes allow.

    **Shapes:** input :math:`(B, C_{in}, H, W)`, output :math:`(B, C_{out}, H/s, W/s)`.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier.

    Args:
        num_classes: outputs of the linear layer ``classifier.0``.
        in_channels: channels of the input image.
        width_mult: multiplies the channels of the stem and of every block (not the last
            1280-channel convolution unless above 1).
        expand_ratio: expansion of the inverted residual blocks after the first group.

    **Shapes:** input :math:`(B, C_{in}, H, W)`, output :math:`(B, K)` with ``K = num_classes``;
    stage taps ``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6`` give :math:`H/2`, :math:`H/4`,
    :math:`H/8`, :math:`H/16` resolution (12, 16, 48, 160 channels at width 0.5);
    ``classifier:input`` is :math:`(B, 1280)`.
    """

    default_taps: ClassVar[dict[str, str]] = {
        "stage1": "blocks.1",
        "stage2": "blocks.2",
        "stage3": "blocks.4",
        "stage4": "blocks.6",
        "feature_map": "blocks.6",  # as RepDistiller's feat[-2]: before the 1x1 conv2 and the pool
        "penultimate": "classifier:input",
    }

    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        width_mult: float = 0.5,
        expand_ratio: int = 6,
    ) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTING:
            out = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(channels, out, stride, t or expand_ratio))
                channels = out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        init_conv_bn(self)
        nn.init.normal_(self.classifier[0].weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = self.avgpool(self.conv2(x))
        return self.classifier(torch.flatten(x, 1))


@register("mobilenetv2", "mobile_half")
def mobilenetv2(num_classes: int = 100, in_channels: int = 3, width_mult: float = 0.5) -> MobileNetV2:
    """MobileNetV2 at width 0.5, the CRD benchmark's ``mobile_half`` (:class:`MobileNetV2`)."""
    return MobileNetV2(num_classes, in_channels, width_mult)
