"""``DataBundle``: everything a run needs to know about one dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DataBundle"]


@dataclass
class DataBundle:
    """The datasets of one experiment and their metadata.

    Every dataset's item is ``{"input": float32 [C, H, W] normalised, "target": int64 [],
    "index": int64 []}``; ``index`` is the position in the *full* training set (stable across
    subsets), or in the test set for test items. Unlabelled transfer items have target ``-1``.

    Attributes:
        name: registry name, e.g. ``"cifar100"``.
        train: the labelled training images (all of them, or a ``train_subset``).
        test: the test (validation) images.
        num_classes: number of classes.
        in_channels: image channels C.
        image_size: ``(H, W)`` of the network input, in pixels.
        train_targets: ``[num_train]`` int64 labels of the full training set, indexed by ``index``
            (memory banks draw negatives from them).
        mean, std: per-channel normalisation constants for pixel values in [0, 1].
        transfer: the unlabelled rest of the training set (``unlabeled=True``), or None.
        classes: class names, ``classes[k]`` names label ``k`` (empty when unknown).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    train_targets: Tensor = field(repr=False)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    transfer: Dataset | None = None
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.train_targets.dim() != 1 or self.train_targets.dtype != torch.int64:
            raise ValueError(
                "train_targets must be a 1-D int64 tensor of all training labels, got "
                f"{tuple(self.train_targets.shape)} {self.train_targets.dtype}"
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} normalisation constants (one per channel), "
                f"got mean {self.mean} and std {self.std}"
            )

    @property
    def num_train(self) -> int:
        """Size of the full training set, ``len(train_targets)``; memory banks are sized by it."""
        return int(self.train_targets.numel())
