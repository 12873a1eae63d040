"""Wide ResNets for 32x32 images: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (the CRD benchmark zoo).

Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016: pre-activation basic blocks, depth
``6n + 4``, stage widths ``(16k, 32k, 64k)`` for widening factor ``k``. Module names follow the
code of Tian et al., "Contrastive Representation Distillation", ICLR 2020, so its checkpoints load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from relkd.models.weight_init import init_conv_bn
from relkd.models.zoo import register

__all__ = ["WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    r"""Pre-activation block: :math:`y = P x + W_2\,\mathrm{relu}(\mathrm{bn}(W_1\,
    \mathrm{relu}(\mathrm{bn}(x))))`; when the width or stride changes, the shortcut :math:`P` is a
    1x1 convolution applied to the activated input.

    **Shapes:** input :math:`(B, C_{in}, H, W)`, output :math:`(B, C_{out}, H/s, W/s)`.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equalInOut = in_planes == out_planes and stride == 1
        self.convShortcut: nn.Module | None = None
        if not self.equalInOut:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: ``n`` wide blocks, the first changing width and stride (held in ``.layer``)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            WideBasicBlock(in_planes, out_planes, stride, drop_rate),
            *(WideBasicBlock(out_planes, out_planes, 1, drop_rate) for _ in range(n - 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``.

    Args:
        depth: ``6n + 4``; each of the three stages holds ``n`` blocks.
        widen_factor: ``k``; stage widths are ``(16k, 32k, 64k)``.
        num_classes: outputs of the final linear layer ``fc``.
        in_channels: channels of the input image.
        drop_rate: dropout between the two convolutions of each block (0 in the benchmark).

    **Shapes:** input :math:`(B, C_{in}, H, W)`, output :math:`(B, K)` with ``K = num_classes``;
    ``block1`` .. ``block3`` give the stages' (pre-activation) outputs
    :math:`(B, 16k \\cdot 2^{i-1}, H/2^{i-1}, W/2^{i-1})`; ``fc:input`` is :math:`(B, 64k)`.
    """

    default_taps: ClassVar[dict[str, str]] = {
        "stage1": "block1",
        "stage2": "block2",
        "stage3": "block3",
        "feature_map": "block3",  # as RepDistiller's feat[-2]: before the final BN-ReLU
        "penultimate": "fc:input",
    }

    def __init__(
        self,
        depth: int,
        widen_factor: int = 1,
        num_classes: int = 100,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.avgpool(self.relu(self.bn1(x)))
        return self.fc(torch.flatten(x, 1))


def _make(depth: int, widen_factor: int) -> Callable[..., WideResNet]:
    def build(num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes, in_channels, drop_rate)

    build.__doc__ = f"WRN-{depth}-{widen_factor} (:class:`WideResNet`)."
    build.__name__ = build.__qualname__ = f"wrn_{depth}_{widen_factor}"
    return build


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register(f"wrn_{_depth}_{_k}")(_make(_depth, _k))
