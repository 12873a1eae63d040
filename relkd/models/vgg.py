"""VGG with batch norm for 32x32 images: vgg8, vgg11, vgg13, vgg16, vgg19 (the CRD benchmark zoo).

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015, with batch norm after each convolution and the three fully connected layers replaced by
global average pooling and one linear layer, as in the code of Tian et al., "Contrastive
Representation Distillation", ICLR 2020 (``vgg*_bn`` there; module names match so its checkpoints
load). ``vgg8`` is that benchmark's configuration of five single-convolution blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

from relkd.models.weight_init import init_conv_bn
from relkd.models.zoo import register

__all__ = ["VGG", "CONFIGS"]

# Output channels of each convolution, grouped into the five blocks that pooling separates.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}


def _block(widths: Sequence[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG of five blocks of 3x3 conv-BN-ReLU layers.

    Blocks ``block0`` .. ``block2`` are each followed by a 2x2 max pool; ``block3`` and ``block4``
    run at the same resolution (1/8 of the input: 4x4 for 32x32 images), then global average pooling
    and the linear layer ``classifier``.

    Args:
        config: output channels of each convolution, one tuple per block (see ``CONFIGS``).
        num_classes: outputs of ``classifier``.
        in_channels: channels of the input image.

    **Shapes:** input :math:`(B, C_{in}, H, W)`, output :math:`(B, K)` with ``K = num_classes``;
    ``block1`` .. ``block4`` (stage taps, after ReLU) give :math:`(B, 128, H/2, W/2)`,
    :math:`(B, 256, H/4, W/4)`, :math:`(B, 512, H/8, W/8)`, :math:`(B, 512, H/8, W/8)`;
    ``classifier:input`` is :math:`(B, 512)`.
    """

    default_taps: ClassVar[dict[str, str]] = {
        "stage1": "block1",
        "stage2": "block2",
        "stage3": "block3",
        "stage4": "block4",
        "feature_map": "block4",
        "penultimate": "classifier:input",
    }

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        if len(config) != 5:
            raise ValueError(f"config must give 5 blocks of widths, got {len(config)}")
        widths = [in_channels] + [block[-1] for block in config]
        self.block0 = _block(config[0], widths[0])
        self.block1 = _block(config[1], widths[1])
        self.block2 = _block(config[2], widths[2])
        self.block3 = _block(config[3], widths[3])
        self.block4 = _block(config[4], widths[4])
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[5], num_classes)
        init_conv_bn(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.pool4(self.block4(self.block3(x)))
        return self.classifier(torch.flatten(x, 1))


def _make(name: str) -> Callable[..., VGG]:
    def build(num_classes: int = 100, in_channels: int = 3) -> VGG:
        return VGG(CONFIGS[name], num_classes, in_channels)

    build.__doc__ = f"{name.upper()} with batch norm for 32x32 images (:class:`VGG`)."
    build.__name__ = build.__qualname__ = name
    return build


for _name in CONFIGS:
    register(_name)(_make(_name))
