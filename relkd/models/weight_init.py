"""The weight initialisation shared by the CIFAR zoo (as in the reference implementations)."""

from __future__ import annotations

from torch import nn

__all__ = ["init_conv_bn"]


def init_conv_bn(model: nn.Module) -> None:
    """He-normal convolutions (fan-out, ReLU gain) with zero bias; batch norms at scale 1, shift 0.

    He et al., "Delving Deep into Rectifiers", ICCV 2015. Linear layers are left to each model,
    because the reference implementations differ there.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
