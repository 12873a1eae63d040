"""What every analysis reads from a loader: inputs and labels of a batch, taps and logits of a network."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relkd.models import FeatureTaps, resolve_taps

__all__ = ["LOGITS", "device_of", "error_and_loss", "evaluate_error", "evaluating", "features", "unpack"]

# The network's return value: a tap name every analysis accepts besides hooked features.
LOGITS = "logits"


def unpack(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(inputs, targets or None)`` of a relkd batch dict (``input``, ``target``), an ``(x, y)``
    pair or a bare input tensor."""
    if isinstance(batch, Mapping):
        return batch["input"], batch.get("target")
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Sequence) and batch:
        return batch[0], batch[1] if len(batch) > 1 else None
    raise TypeError(
        f"expected a batch dict with 'input' (and 'target'), an (inputs, targets) pair or a tensor, "
        f"got {type(batch).__name__}"
    )


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without any)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode for the block, their modes restored afterwards."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


@torch.no_grad()
def features(
    model: nn.Module, loader: Iterable[Any], taps: Sequence[str]
) -> Iterator[tuple[dict[str, Tensor], Tensor | None]]:
    """Per batch, ``({tap: [B, D] float32, flattened}, targets)`` of ``model`` in eval mode.

    A tap is ``"logits"`` (the forward's return value), a default tap name of the model
    (``"penultimate"``, ``"stage2"``) or a module path (``"layer3"``, ``"fc:input"``); see
    :func:`relkd.models.resolve_taps`.
    """
    hooked = [t for t in taps if t != LOGITS]
    device = device_of(model)
    with evaluating(model), FeatureTaps(model, resolve_taps(model, hooked)) as hooks:
        for batch in loader:
            x, y = unpack(batch)
            logits = model(x.to(device))
            out = {t: (logits if t == LOGITS else hooks[t]).float().flatten(1) for t in taps}
            yield out, y


@torch.no_grad()
def error_and_loss(model: nn.Module, batches: Iterable[Any]) -> tuple[float, float]:
    """:func:`evaluate_error` of a model already in the mode it is to be measured in."""
    device = device_of(model)
    wrong = loss = 0.0
    total = 0
    for batch in batches:
        x, y = unpack(batch)
        if y is None:
            raise ValueError("evaluate_error needs labelled batches (a 'target' per image)")
        logits = model(x.to(device)).double()
        y = y.to(device)
        keep = y >= 0
        wrong += float((logits.argmax(1) != y)[keep].sum())
        loss += float(F.cross_entropy(logits[keep], y[keep], reduction="sum"))
        total += int(keep.sum())
    if not total:
        raise ValueError("evaluate_error: the loader yielded no labelled instance")
    return wrong / total, loss / total


def evaluate_error(model: nn.Module, loader: Iterable[Any]) -> tuple[float, float]:
    """``(error, cross-entropy)`` of ``model`` in eval mode over the labelled instances of ``loader``:
    the fraction misclassified and the mean loss in nats."""
    with evaluating(model):
        return error_and_loss(model, loader)
