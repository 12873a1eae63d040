"""Torchvision classification models by name, with random weights (nothing is downloaded)."""

from __future__ import annotations

from typing import Any

from torch import nn

from relkd.registry import suggest

__all__ = ["available", "create"]


def available() -> list[str]:
    """Names of torchvision's classification models (not detection, segmentation or video)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def create(name: str, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """Build torchvision's classification model ``name`` with ``weights=None``.

    Args:
        name: e.g. ``"resnet18"``, ``"mobilenet_v3_small"`` (see :func:`available`).
        num_classes: size of the output layer.
        **kwargs: passed to the torchvision constructor.

    Raises:
        KeyError: ``name`` is not a torchvision classification model.
        ValueError: ``weights`` was given; pretrained weights would need a download.
    """
    import torchvision.models as tvm

    if kwargs.pop("weights", None) is not None:
        raise ValueError(
            f"torchvision:{name} is built with random weights (no downloads); load a local "
            "checkpoint with model.load_state_dict(torch.load(path)) instead of passing weights"
        )
    names = available()
    if name not in names:
        raise KeyError(f"unknown torchvision classification model {name!r}.{suggest(name, names)}")
    return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
