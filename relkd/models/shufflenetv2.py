"""ShuffleNetV2 (1x) for 32x32 images, as in the CRD benchmark zoo (``shufflenetv2``).

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", ECCV 2018,
adapted to 32x32 inputs as in the code of Tian et al., "Contrastive Representation Distillation",
ICLR 2020 (``ShuffleV2``): a 1x1 stem of 24 channels without max pooling, stages of a downsampling
unit plus (3, 7, 3) basic units at widths (116, 232, 464), a 1024-channel 1x1 convolution. Module
names match that code, so its checkpoints load.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from relkd.models.shufflenetv1 import channel_shuffle
from relkd.models.zoo import register

__all__ = ["DownUnit", "ShuffleNetV2", "SplitUnit"]


class SplitUnit(nn.Module):
    """Keep half of the channels; send the other half through 1x1, depthwise 3x3, 1x1; shuffle.

    **Shapes:** :math:`(B, C, H, W) \\to (B, C, H, W)`.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        c = in_channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1] // 2
        kept, branch = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class DownUnit(nn.Module):
    """Two stride-2 branches (depthwise-pointwise, pointwise-depthwise-pointwise), concatenated and
    shuffled.

    **Shapes:** :math:`(B, C_{in}, H, W) \\to (B, C_{out}, H/2, W/2)`.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 with three stages.

    Args:
        num_classes: outputs of the linear layer ``linear``.
        in_channels: channels of the input image.
        out_channels: widths of the three stages and of the last 1x1 convolution.
        num_blocks: basic units per stage (after its downsampling unit).

    **Shapes:** input :math:`(B, C_{in}, H, W)`, output :math:`(B, K)` with ``K = num_classes``;
    ``layer1`` .. ``layer3`` give :math:`(B, 116, H/2, W/2)`, :math:`(B, 232, H/4, W/4)`,
    :math:`(B, 464, H/8, W/8)`; ``linear:input`` is :math:`(B, 1024)`.
    """

    default_taps: ClassVar[dict[str, str]] = {
        "stage1": "layer1",
        "stage2": "layer2",
        "stage3": "layer3",
        "feature_map": "layer3",  # as RepDistiller's feat[-2]: before the 1x1 conv2 and the pool
        "penultimate": "linear:input",
    }

    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
        num_blocks: tuple[int, int, int] = (3, 7, 3),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.layer1 = self._make_layer(24, out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[0], out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[1], out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)

    @staticmethod
    def _make_layer(in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
        units = [DownUnit(in_channels, out_channels)]
        units += [SplitUnit(out_channels) for _ in range(num_blocks)]
        return nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register("shufflenetv2", "shufflev2")
def shufflenetv2(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV2:
    """ShuffleNetV2 (1x) of the CRD benchmark (:class:`ShuffleNetV2`)."""
    return ShuffleNetV2(num_classes, in_channels)
