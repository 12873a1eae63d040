"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 1 channel, 10 classes).

The data ships with scikit-learn, so this dataset always works offline and suits quick tests and
smoke runs. Split: a stratified 1,347 / 450 train / test split with the fixed seed 0, independent
of the run seed, so every run is evaluated on the same test images. Pixels are integers 0..16,
scaled to [0, 1] and normalised with the mean and std of the training split.

Augmentation: none. An 8x8 image is too small for crops (a 1-pixel shift moves an eighth of the
digit) and a horizontal flip changes what some digits mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from relkd.data.augment import AugmentSpec
from relkd.data.bundle import DataBundle
from relkd.data.registry import register
from relkd.data.tensor_dataset import in_memory_bundle

__all__ = ["NUM_TEST", "SPLIT_SEED", "digits"]

NUM_TEST = 450
SPLIT_SEED = 0
MAX_VALUE = 16


@register("digits")
def digits(root: str | Path | None = None, augment: bool = True) -> DataBundle:
    """The sklearn digits bundle; ``root`` is unused (the data ships with scikit-learn)."""
    raw = load_digits()
    images = torch.from_numpy(raw.images.astype(np.uint8)).unsqueeze(1)
    targets = torch.from_numpy(raw.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(targets)), test_size=NUM_TEST, stratify=raw.target, random_state=SPLIT_SEED
    )
    train_idx = torch.from_numpy(np.sort(train_idx))
    test_idx = torch.from_numpy(np.sort(test_idx))
    train_pixels = images[train_idx].double() / MAX_VALUE
    return in_memory_bundle(
        "digits",
        (images[train_idx], targets[train_idx]),
        (images[test_idx], targets[test_idx]),
        num_classes=10,
        max_value=MAX_VALUE,
        mean=(train_pixels.mean().item(),),
        std=(train_pixels.std(unbiased=False).item(),),
        augment_spec=AugmentSpec(),
        augment=augment,
        classes=tuple(str(k) for k in range(10)),
    )
