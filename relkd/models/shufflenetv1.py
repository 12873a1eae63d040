"""ShuffleNetV1 (g = 3) for 32x32 images, as in the CRD benchmark zoo (``shufflenetv1``).

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices",
CVPR 2018, adapted to 32x32 inputs as in the code of Tian et al., "Contrastive Representation
Distillation", ICLR 2020 (``ShuffleV1``): a 1x1 stem of 24 channels without max pooling, stages of
(4, 8, 4) units at widths (240, 480, 960). Module names match that code, so its checkpoints load.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from relkd.models.zoo import register

__all__ = ["ShuffleNetV1", "ShuffleUnit", "channel_shuffle"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: ``[a1 a2 b1 b2] -> [a1 b1 a2 b2]``.

    **Shapes:** :math:`(B, C, H, W) \\to (B, C, H, W)`, ``C`` divisible by ``groups``.
    """
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """Group 1x1 conv, channel shuffle, depthwise 3x3, group 1x1 conv; at stride 2 the result is
    concatenated with a 3x3 average pool of the input, otherwise added to it.

    **Shapes:** input :math:`(B, C_{in}, H, W)`, output :math:`(B, C_{in} + C_{out}, H/2, W/2)` at
    stride 2, :math:`(B, C_{out}, H, W)` at stride 1 (then ``C_in == C_out``).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        # The paper leaves the first pointwise convolution ungrouped when its input is the stem.
        self.groups_in = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.groups_in, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.groups_in)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 with three stages, each opened by a stride-2 unit.

    Args:
        num_classes: outputs of the linear layer ``linear``.
        in_channels: channels of the input image.
        out_planes: widths of the three stages.
        num_blocks: units per stage.
        groups: groups of the pointwise convolutions.

    **Shapes:** input :math:`(B, C_{in}, H, W)`, output :math:`(B, K)` with ``K = num_classes``;
    ``layer1`` .. ``layer3`` give :math:`(B, 240, H/2, W/2)`, :math:`(B, 480, H/4, W/4)`,
    :math:`(B, 960, H/8, W/8)`; ``linear:input`` is :math:`(B, 960)`.
    """

    default_taps: ClassVar[dict[str, str]] = {
        "stage1": "layer1",
        "stage2": "layer2",
        "stage3": "layer3",
        "feature_map": "layer3",
        "penultimate": "linear:input",
    }

    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.layer1 = self._make_layer(24, out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[0], out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[1], out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)

    @staticmethod
    def _make_layer(in_planes: int, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        # The stride-2 unit concatenates its input, so its branch produces only the difference.
        layers = [ShuffleUnit(in_planes, out_planes - in_planes, 2, groups)]
        layers += [ShuffleUnit(out_planes, out_planes, 1, groups) for _ in range(num_blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register("shufflenetv1", "shufflev1")
def shufflenetv1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    """ShuffleNetV1 (g = 3) of the CRD benchmark (:class:`ShuffleNetV1`)."""
    return ShuffleNetV1(num_classes, in_channels)
