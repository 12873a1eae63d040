"""ResNet-50 for 32x32 images, the cross-architecture teacher of the CRD benchmark (``resnet50``).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016: four stages of bottleneck
blocks (3, 4, 6, 3) at widths (64, 128, 256, 512) x 4, with a 3x3 stride-1 stem and no max pooling
so 32x32 inputs end at 4x4, as in the code of Tian et al., "Contrastive Representation
Distillation", ICLR 2020 (``ResNet50``; module names match, so its checkpoints load). For the
ImageNet ResNet-50 use ``"torchvision:resnet50"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from relkd.models.weight_init import init_conv_bn
from relkd.models.zoo import register

__all__ = ["Bottleneck", "BottleneckResNet"]


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus an identity or 1x1 projection shortcut.

    **Shapes:** input :math:`(B, C_{in}, H, W)`, output :math:`(B, 4 \\cdot planes, H/s, W/s)`.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class BottleneckResNet(nn.Module):
    """A four-stage bottleneck ResNet for small images.

    Args:
        num_blocks: blocks per stage, ``(3, 4, 6, 3)`` for ResNet-50.
        num_classes: outputs of the linear layer ``linear``.
        in_channels: channels of the input image.

    **Shapes:** input :math:`(B, C_{in}, H, W)`, output :math:`(B, K)` with ``K = num_classes``;
    ``layer1`` .. ``layer4`` give :math:`(B, 256 \\cdot 2^{i-1}, H/2^{i-1}, W/2^{i-1})`;
    ``linear:input`` is :math:`(B, 2048)`.
    """

    default_taps: ClassVar[dict[str, str]] = {
        "stage1": "layer1",
        "stage2": "layer2",
        "stage3": "layer3",
        "stage4": "layer4",
        "feature_map": "layer4",
        "penultimate": "linear:input",
    }

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"num_blocks must give 4 stages, got {num_blocks}")
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        planes = (64, 128, 256, 512)
        in_planes = 64
        stages = []
        for i, (p, n) in enumerate(zip(planes, num_blocks, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [Bottleneck(in_planes, p, stride)]
            blocks += [Bottleneck(p * Bottleneck.expansion, p) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = p * Bottleneck.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register("resnet50")
def resnet50(num_classes: int = 100, in_channels: int = 3) -> BottleneckResNet:
    """ResNet-50 for 32x32 images of the CRD benchmark (:class:`BottleneckResNet`)."""
    return BottleneckResNet((3, 4, 6, 3), num_classes, in_channels)
