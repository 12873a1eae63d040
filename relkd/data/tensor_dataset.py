"""``InMemoryDataset``: a whole image dataset held as one tensor, ready for on-device batching.

Digits, Fashion-MNIST and CIFAR fit in memory, so ``make_loader`` serves them with a
``TensorDataLoader`` that indexes, augments and normalises whole batches on the target device
instead of one PIL image at a time. ``__getitem__`` exists for item-by-item use (inspection, a plain
torch ``DataLoader``) and returns the image *unaugmented*; only the tensor loader augments.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from relkd.data.augment import AugmentSpec, normalize
from relkd.data.bundle import DataBundle

__all__ = ["InMemoryDataset", "in_memory_bundle"]

NO_AUGMENT = AugmentSpec()


class InMemoryDataset(Dataset):
    """Images, labels and full-training-set indices as tensors.

    Args:
        images: ``[N, C, H, W]`` raw pixels, uint8 (or float), where ``max_value`` means white.
        targets: ``[N]`` int64 labels (``-1`` for unlabelled samples).
        indices: ``[N]`` int64 index of each sample in the full training set (or test set);
            defaults to ``arange(N)``.
        max_value: raw pixel value that maps to 1.0 (255 for 8-bit images, 16 for sklearn digits).
        mean, std: per-channel normalisation constants for pixels in [0, 1].
        augment_spec: the dataset's standard training augmentation.
        augment: whether loaders augment this dataset by default (True for a training set).

    Item ``i``: ``{"input": float32 [C, H, W] normalised, "target": int64 [], "index": int64 []}``.
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        indices: Tensor | None = None,
        *,
        max_value: float,
        mean: Sequence[float],
        std: Sequence[float],
        augment_spec: AugmentSpec = NO_AUGMENT,
        augment: bool = False,
    ) -> None:
        n = images.shape[0]
        if images.dim() != 4:
            raise ValueError(f"expected images of shape [N, C, H, W], got {tuple(images.shape)}")
        if indices is None:
            indices = torch.arange(n)
        if targets.shape != (n,) or indices.shape != (n,):
            raise ValueError(
                f"expected {n} targets and {n} indices (one per image), "
                f"got shapes {tuple(targets.shape)} and {tuple(indices.shape)}"
            )
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(
                f"expected one mean and std per channel ({images.shape[1]}), got {mean} and {std}"
            )
        if images.is_floating_point():
            bad = (~torch.isfinite(images)).flatten(1).any(1)
            if bool(bad.any()):
                where = indices[bad][:5].tolist()
                raise ValueError(
                    f"{int(bad.sum())} image(s) hold NaN or infinite pixel values (data set indices "
                    f"{where}{' ...' if int(bad.sum()) > 5 else ''}): fix or drop them before training"
                )
        self.images = images
        self.targets = targets.long()
        self.indices = indices.long()
        self.max_value = float(max_value)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment_spec = augment_spec
        self.augment = augment

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = self.images[i].float().div(self.max_value)
        return {
            "input": normalize(x[None], self.mean, self.std)[0],
            "target": self.targets[i],
            "index": self.indices[i],
        }

    def subset(self, positions: Tensor, hide_labels: bool = False) -> InMemoryDataset:
        """The samples at ``positions`` (of this dataset), keeping their full-set indices.

        ``hide_labels=True`` sets every target to ``-1`` (an unlabelled transfer set).
        """
        out = copy.copy(self)
        out.images = self.images[positions]
        out.indices = self.indices[positions]
        out.targets = torch.full_like(out.indices, -1) if hide_labels else self.targets[positions]
        return out

    def with_augment(self, augment: bool) -> InMemoryDataset:
        """A view of the same tensors that loaders augment (or not) by default."""
        out = copy.copy(self)
        out.augment = augment
        return out

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return (
            f"InMemoryDataset(n={len(self)}, shape=({c}, {h}, {w}), "
            f"augment={self.augment}, spec={self.augment_spec})"
        )


def in_memory_bundle(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    num_classes: int,
    max_value: float,
    mean: Sequence[float],
    std: Sequence[float],
    augment_spec: AugmentSpec,
    augment: bool,
    classes: Sequence[str] = (),
) -> DataBundle:
    """A ``DataBundle`` of two in-memory datasets from ``(images [N, C, H, W], targets [N])`` pairs.

    The training set is augmented by default when ``augment`` is true; the test set never is.
    """
    common = {"max_value": max_value, "mean": mean, "std": std, "augment_spec": augment_spec}
    train_set = InMemoryDataset(*train, augment=augment, **common)
    test_set = InMemoryDataset(*test, augment=False, **common)
    return DataBundle(
        name=name,
        train=train_set,
        test=test_set,
        num_classes=num_classes,
        in_channels=train_set.images.shape[1],
        image_size=tuple(train_set.images.shape[2:]),
        train_targets=train_set.targets.clone(),
        mean=train_set.mean,
        std=train_set.std,
        classes=tuple(classes),
    )
