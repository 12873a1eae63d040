"""ResNets for 32x32 images: resnet8 ... resnet110, resnet8x4, resnet32x4 (the CRD benchmark zoo).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2: a 3x3 stem and three
stages of basic blocks at 32x32, 16x16 and 8x8, depth ``6n + 2``. The ``x4`` variants widen the
stages to (64, 128, 256) with a 32-channel stem, as in Tian et al., "Contrastive Representation
Distillation", ICLR 2020. Module names follow that benchmark's code, so its checkpoints load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from relkd.models.weight_init import init_conv_bn
from relkd.models.zoo import register

__all__ = ["BasicBlock", "CifarResNet"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution with padding 1 and no bias (a batch norm follows)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    r"""Two 3x3 convolutions with an identity (or 1x1 projection) shortcut:
    :math:`y = \mathrm{relu}(\mathrm{bn}(W_2\,\mathrm{relu}(\mathrm{bn}(W_1 x))) + P x)`.

    No operation is in place, so a tapped intermediate output is never overwritten later.

    **Shapes:** input :math:`(B, C_{in}, H, W)`, output :math:`(B, C_{out}, H/s, W/s)`.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    r"""A three-stage ResNet of basic blocks for small images.

    Args:
        depth: ``6n + 2``; each stage holds ``n`` blocks.
        widths: channels of the stem and the three stages, e.g. ``(16, 16, 32, 64)``.
        num_classes: outputs of the final linear layer ``fc``.
        in_channels: channels of the input image.

    **Shapes:** input :math:`(B, C_{in}, H, W)`, output :math:`(B, K)` with ``K = num_classes``;
    ``layer1`` .. ``layer3`` give :math:`(B, w_k, H/2^{k-1}, W/2^{k-1})`; ``fc:input`` (the
    penultimate tap) is :math:`(B, w_3)`.
    """

    default_taps: ClassVar[dict[str, str]] = {
        "stage1": "layer1",
        "stage2": "layer2",
        "stage3": "layer3",
        "feature_map": "layer3",
        "penultimate": "fc:input",
    }

    def __init__(
        self, depth: int, widths: Sequence[int], num_classes: int = 100, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must give the stem and 3 stages (4 values), got {widths}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(widths[0], widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[1], widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def _make(name: str, depth: int, widths: Sequence[int], doc: str) -> Callable[..., CifarResNet]:
    def build(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes=num_classes, in_channels=in_channels)

    build.__doc__ = f"{doc} (:class:`CifarResNet`, depth {depth}, widths {tuple(widths)})."
    build.__name__ = build.__qualname__ = name
    return build


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _name = f"resnet{_depth}"
    register(_name)(_make(_name, _depth, _NARROW, f"ResNet-{_depth} for 32x32 images"))
register("resnet8x4")(_make("resnet8x4", 8, _WIDE, "ResNet-8 with 4x wider stages"))
register("resnet32x4")(_make("resnet32x4", 32, _WIDE, "ResNet-32 with 4x wider stages"))
