"""``make_loader``: seeded, resumable iteration over any relkd dataset as batches of dicts.

Two paths give the same batches (``{"input": [B, C, H, W], "target": [B], "index": [B]}``):

* ``TensorDataLoader`` for an ``InMemoryDataset`` (digits, Fashion-MNIST, CIFAR and their subsets):
  all images live as one tensor on the target device; each batch is gathered, augmented (random crop
  with zero padding, horizontal flip) and normalised there, with no workers and no per-item Python.
* ``EpochDataLoader`` wraps a torch ``DataLoader`` for everything else (``imagefolder``).

Both derive every epoch's shuffle and augmentation from ``(seed, epoch)`` only. Each ``iter()`` uses
the current epoch and then advances it by one; ``set_epoch(e)`` sets it, so a run resumed at epoch
``e`` sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from relkd.data.augment import augment_batch, normalize
from relkd.data.seeding import AUGMENT, SHUFFLE, derive_seed
from relkd.data.tensor_dataset import InMemoryDataset

__all__ = ["EpochDataLoader", "TensorDataLoader", "make_loader"]

Batch = dict[str, Tensor]


class _Epochs:
    """Batch arithmetic and the epoch counter shared by both loaders."""

    def __init__(self, num_items: int, batch_size: int, seed: int, drop_last: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of images, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce epoch ``epoch``'s order and augmentation."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def _start_epoch(self) -> int:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)


class TensorDataLoader(_Epochs):
    """Batches of an ``InMemoryDataset``, gathered, augmented and normalised on ``device``.

    Args:
        dataset: the in-memory dataset; its tensors are copied to ``device`` once.
        batch_size: images per batch B.
        shuffle: visit the images in a seeded random order (else in dataset order).
        seed: run seed; epoch ``e``'s permutation and augmentation are functions of ``(seed, e)``.
        drop_last: drop the last incomplete batch.
        device: where batches are produced (default CPU).
        augment: apply ``dataset.augment_spec`` (default: ``dataset.augment``).

    Yields:
        ``{"input": float32 [B, C, H, W] normalised, "target": int64 [B], "index": int64 [B]}``.
    """

    def __init__(
        self,
        dataset: InMemoryDataset,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device | None = None,
        augment: bool | None = None,
    ) -> None:
        super().__init__(len(dataset), batch_size, seed, drop_last)
        self.dataset = dataset
        self.shuffle = shuffle
        self.device = torch.device("cpu" if device is None else device)
        self.augment = dataset.augment if augment is None else augment
        self.images = dataset.images.to(self.device)
        self.targets = dataset.targets.to(self.device)
        self.indices = dataset.indices.to(self.device)
        self.mean = torch.tensor(dataset.mean, device=self.device)
        self.std = torch.tensor(dataset.std, device=self.device)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._start_epoch()
        if self.shuffle:
            shuffle_rng = torch.Generator().manual_seed(derive_seed(self.seed, epoch, SHUFFLE))
            order = torch.randperm(self.num_items, generator=shuffle_rng).to(self.device)
        else:
            order = torch.arange(self.num_items, device=self.device)
        augment_rng = torch.Generator().manual_seed(derive_seed(self.seed, epoch, AUGMENT))
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[idx].float().div_(self.dataset.max_value)
            if self.augment:
                x = augment_batch(x, self.dataset.augment_spec, augment_rng)
            yield {
                "input": normalize(x, self.mean, self.std),
                "target": self.targets[idx],
                "index": self.indices[idx],
            }


class EpochDataLoader(_Epochs):
    """A torch ``DataLoader`` rebuilt every epoch with generators seeded from ``(seed, epoch)``.

    The shuffle and the workers' base seed come from the epoch's generator; a dataset with a
    ``for_epoch(seed)`` method (``ImageFolderDataset``) also gets an epoch seed for its per-item
    augmentation. Batches are moved to ``device`` (pinned memory, non-blocking copy on CUDA).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(len(dataset), batch_size, seed, drop_last)
        self.dataset = dataset
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.device = torch.device("cpu" if device is None else device)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._start_epoch()
        dataset = self.dataset
        if hasattr(dataset, "for_epoch"):
            dataset = dataset.for_epoch(derive_seed(self.seed, epoch, AUGMENT))
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, SHUFFLE)),
        )
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    device: str | torch.device | None = None,
    augment: bool | None = None,
) -> TensorDataLoader | EpochDataLoader:
    """A seeded, resumable iterable of batch dicts over ``dataset``.

    Args:
        dataset: a relkd dataset (``bundle.train``, ``bundle.test``, ``bundle.transfer``) or any
            dataset whose items are dicts of tensors.
        batch_size: images per batch.
        shuffle: seeded random order, a new one each epoch.
        seed: run seed; together with the epoch it fixes order and augmentation.
        num_workers: decoding processes for the torch ``DataLoader`` path (the in-memory path
            needs none and ignores it).
        drop_last: drop the last incomplete batch.
        device: where the batches' tensors end up (default CPU).
        augment: force augmentation on or off; None uses the dataset's default (on for a
            training set built with ``augment=True``, off for test sets).

    Returns:
        A ``TensorDataLoader`` for in-memory datasets, else an ``EpochDataLoader``; both have
        ``set_epoch(epoch)`` and ``len()`` (number of batches).
    """
    if isinstance(dataset, InMemoryDataset):
        return TensorDataLoader(dataset, batch_size, shuffle, seed, drop_last, device, augment)
    if augment is not None:
        dataset = _with_augment(dataset, augment)
    return EpochDataLoader(dataset, batch_size, shuffle, seed, num_workers, drop_last, device)


def _with_augment(dataset: Any, augment: bool) -> Dataset:
    if not hasattr(dataset, "with_augment"):
        raise TypeError(
            f"augment={augment} needs a dataset with a with_augment() method (relkd datasets have "
            f"one); {type(dataset).__name__} has none, so pass augment=None"
        )
    return dataset.with_augment(augment)
