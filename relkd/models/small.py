"""Small models for 8x8 digits and 28x28 Fashion-MNIST: ``mlp``, ``lenet``, ``small_resnet``.

Each takes a ``width`` so that a teacher can be a wider copy of its student, and defaults to
one-channel inputs and 10 classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from relkd.models.resnet_cifar import CifarResNet
from relkd.models.zoo import register

__all__ = ["MLP", "LeNet", "lenet", "mlp", "small_resnet"]


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden layers of ``width`` units with ReLU, then a linear ``fc``.

    Args:
        in_shape: shape of one input without the batch dimension, e.g. ``(1, 8, 8)`` or ``(64,)``.
        num_classes: outputs of ``fc``.
        width: units of each hidden layer.
        depth: number of hidden layers; hidden layer ``i`` (from 1) is the tap ``stage{i}``.
        dropout: dropout probability after each hidden layer.

    **Shapes:** input :math:`(B, *in\\_shape)`, output :math:`(B, K)` with ``K = num_classes``;
    ``layers.{i}`` and ``fc:input`` are :math:`(B, width)`.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int = 10,
        width: int = 128,
        depth: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1 hidden layer, got {depth}")
        self.flatten = nn.Flatten()
        sizes = [math.prod(in_shape)] + [width] * depth
        self.layers = nn.Sequential(
            *(
                nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout))
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            )
        )
        self.fc = nn.Linear(width, num_classes)
        self.default_taps = {f"stage{i + 1}": f"layers.{i}" for i in range(depth)}
        # No spatial map: the last hidden layer stands for it (the same vector as the penultimate tap).
        self.default_taps["feature_map"] = f"layers.{depth - 1}"
        self.default_taps["penultimate"] = "fc:input"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.flatten(x)))


class LeNet(nn.Module):
    """A LeNet-style CNN (LeCun et al., "Gradient-Based Learning Applied to Document Recognition",
    Proc. IEEE 1998) with 3x3 convolutions so that 8x8 inputs fit: three conv-ReLU stages of
    ``width``, ``2 width``, ``4 width`` channels (the first two max-pooled), an adaptive average
    pool to 2x2, a hidden layer of ``8 width`` units, and a linear ``fc``.

    Args:
        num_classes: outputs of ``fc``.
        in_channels: channels of the input image.
        width: channels of the first stage.

    **Shapes:** input :math:`(B, C_{in}, H, W)` with ``H, W >= 4``, output :math:`(B, K)`;
    ``stage1`` :math:`(B, w, H/2, W/2)`, ``stage2`` :math:`(B, 2w, H/4, W/4)`, ``stage3``
    :math:`(B, 4w, H/4, W/4)`, ``fc:input`` :math:`(B, 8w)`.
    """

    default_taps: ClassVar[dict[str, str]] = {
        "stage1": "stage1",
        "stage2": "stage2",
        "stage3": "stage3",
        "feature_map": "stage3",
        "penultimate": "fc:input",
    }

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()

        def conv(a: int, b: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()]

        self.stage1 = nn.Sequential(*conv(in_channels, width), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(*conv(width, 2 * width), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(*conv(2 * width, 4 * width))
        # Pooling to a fixed 2x2 grid makes the hidden layer independent of the image size.
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(16 * width, 8 * width), nn.ReLU())
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.hidden(self.pool(x)))


@register("mlp")
def mlp(
    num_classes: int = 10,
    in_channels: int | None = None,
    in_shape: Sequence[int] | None = None,
    width: int = 128,
    depth: int = 3,
    dropout: float = 0.0,
) -> MLP:
    """An :class:`MLP` on flattened inputs of shape ``in_shape`` (default ``(in_channels, 8, 8)``,
    the 8x8 digits, with ``in_channels`` 1).

    Raises:
        ValueError: ``in_channels`` and ``in_shape[0]`` disagree.
    """
    if in_shape is None:
        in_shape = (in_channels or 1, 8, 8)
    elif in_channels is not None and (len(in_shape) != 3 or in_shape[0] != in_channels):
        raise ValueError(
            f"in_channels={in_channels} disagrees with in_shape={tuple(in_shape)}; "
            "give in_shape=(C, H, W) alone"
        )
    return MLP(in_shape, num_classes, width, depth, dropout)


@register("lenet")
def lenet(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> LeNet:
    """A :class:`LeNet` for 1x8x8 digits or 1x28x28 Fashion-MNIST (any size from 4x4)."""
    return LeNet(num_classes, in_channels, width)


@register("small_resnet")
def small_resnet(
    num_classes: int = 10, in_channels: int = 1, width: int = 16, blocks: int = 1
) -> CifarResNet:
    """A :class:`~relkd.models.resnet_cifar.CifarResNet` with ``blocks`` basic blocks per stage
    and stages of ``(width, 2 width, 4 width)`` channels (``blocks=1, width=16`` is resnet8)."""
    widths = (width, width, 2 * width, 4 * width)
    return CifarResNet(6 * blocks + 2, widths, num_classes, in_channels)
