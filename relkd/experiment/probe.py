"""A fixed batch of test items (images, token ids ...), and the embeddings networks give it: what
``relkd viz`` draws on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from relkd.data import class_balanced_indices
from relkd.models import FeatureTaps, resolve_taps

__all__ = ["ProbeBatch", "VizUsageError", "embed", "probe_batch"]


class VizUsageError(ValueError):
    """Options that do not fit together or do not fit the run (the CLI prints them as usage errors)."""


@dataclass
class ProbeBatch:
    """A fixed batch of test images.

    Attributes:
        inputs: ``[B, C, H, W]`` normalised images, on the networks' device.
        labels: ``[B]`` int64 classes, on the same device.
        index: ``[B]`` int64 positions in the test set.
        class_names: ``class_names[y]`` names class ``y``; None when the dataset has no names.
    """

    inputs: Tensor
    labels: Tensor
    index: Tensor
    class_names: tuple[str, ...] | None


def probe_batch(bundle: Any, size: int, seed: int, device: torch.device | str = "cpu") -> ProbeBatch:
    """``size`` test items of ``bundle`` (a :class:`relkd.data.DataBundle`), class-balanced: as
    many per class as ``size`` allows (:func:`relkd.data.class_balanced_indices`), which ones of a
    class chosen with ``seed``, in test-set order. The same arguments give the same batch.

    A test set whose targets are not classes to balance (unlabelled items, target -1, such as
    translation pairs; or more classes than items, such as the tokens of a cloze test) gives
    ``size`` items drawn with ``seed`` instead, in test-set order."""
    test = bundle.test
    targets = test.targets
    labelled = bool(((targets >= 0) & (targets < bundle.num_classes)).all())
    balanced = labelled and bundle.num_classes <= len(test)
    if not (bundle.num_classes if balanced else 1) <= size <= len(test):
        raise VizUsageError(
            f"--batch-size must be between the number of classes ({bundle.num_classes}, one image "
            f"each) and the test set's size ({len(test)}), got {size}"
        )
    if balanced:
        positions, _ = class_balanced_indices(targets, size, bundle.num_classes, seed)
    else:
        generator = torch.Generator().manual_seed(seed)
        positions = torch.randperm(len(test), generator=generator)[:size].sort().values
    items = [test[int(i)] for i in positions]
    return ProbeBatch(
        inputs=torch.stack([item["input"] for item in items]).to(device),
        labels=torch.stack([item["target"] for item in items]).to(device),
        index=torch.stack([item["index"] for item in items]),
        class_names=tuple(bundle.classes) or None,
    )


@torch.no_grad()
def embed(model: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """The ``penultimate`` embedding ``[B, D]`` (float32, flattened) and logits ``[B, K]`` of
    ``model`` in eval mode, the tap resolved as the engine does (:func:`relkd.models.resolve_taps`)."""
    model.eval()
    with FeatureTaps(model, resolve_taps(model, ["penultimate"])) as taps:
        logits = model(inputs)
        embedding = taps["penultimate"].float().flatten(1)
    return embedding, logits.float()
