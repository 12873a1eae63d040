"""The model registry: ``create("resnet32x4")``, ``available("wrn*")``, ``@register("name")``.

Names without a prefix are looked up in the registry; ``"source:name"`` asks an external source
(``"torchvision:resnet18"``). Every model that :func:`create` returns carries ``default_taps``, the
named features (``"penultimate"``, ``"stage1"``, ...) that distillation losses read by hooks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

from relkd.models import torchvision_models
from relkd.models.taps import infer_default_taps
from relkd.registry import Registry, suggest

__all__ = ["MODELS", "available", "create", "register"]

MODELS = Registry("model")
register = MODELS.register

# Prefix -> (constructor taking ``name``, lister of names): a table, not a branch per source.
_SOURCES: dict[str, tuple[Callable[..., nn.Module], Callable[[], list[str]]]] = {
    "torchvision": (torchvision_models.create, torchvision_models.available),
}


def create(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` and attach its ``default_taps``.

    Args:
        name: a registered name (case-insensitive, see :func:`available`) or ``"source:name"``
            with source ``torchvision`` (random weights; nothing is downloaded).
        num_classes: size of the output layer; ``None`` keeps the constructor's default
            (100 for the CIFAR zoo, 10 for the small models, 1000 for torchvision).
        **kwargs: passed to the constructor (``in_channels``, ``width``, ...).

    Returns:
        The model; ``model.default_taps`` maps tap names to specs for
        :class:`~relkd.models.taps.FeatureTaps` (its own, else inferred from the module tree).

    Raises:
        KeyError: unknown name or source, with the closest known names.
    """
    source, sep, rest = name.partition(":")
    if sep:
        if source not in _SOURCES:
            raise KeyError(
                f"unknown model source {source!r} in {name!r}.{suggest(source, _SOURCES)} "
                f"Known sources: {', '.join(sorted(_SOURCES))}"
            )
        constructor = _SOURCES[source][0]
        kwargs["name"] = rest
    else:
        constructor = MODELS.get(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = constructor(**kwargs)
    # A copy per instance, so editing one model's taps never edits its class's.
    taps = getattr(model, "default_taps", None)
    model.default_taps = dict(taps) if taps is not None else infer_default_taps(model)
    return model


def available(pattern: str = "*") -> list[str]:
    """Model names matching the shell pattern ``pattern``, external ones too (``torchvision:*``)."""
    names = MODELS.available(pattern)
    for source, (_, list_names) in sorted(_SOURCES.items()):
        prefixed = (f"{source}:{n}" for n in list_names())
        names += sorted(n for n in prefixed if fnmatch.fnmatch(n, pattern))
    return names
