"""``make_loader``: seeded, resumable iteration over any relkd dataset as batches of dicts.

Two paths give the same batches (``{"input": [B, C, H, W], "target": [B], "index": [B]}``):

* ``TensorDataLoader`` for an ``InMemoryDataset`` (digits, Fashion-MNIST, CIFAR and their subsets):
  all images live as one tensor on the target device; each batch is gathered, augmented (random crop
  with zero padding, horizontal flip) and normalised there, with no workers and no per-item Python.
* ``EpochDataLoader`` wraps a torch ``DataLoader`` for everything else (``imagefolder``).

Both derive every epoch's shuffle and augmentation from ``(seed, epoch)`` only. Each ``iter()`` uses
the current epoch and then advances it by one; ``set_epoch(e)`` sets it, so a run resumed at epoch
``e`` sees the same batches as an uninterrupted one.

``make_loader(..., loader="dataloader")`` serves an in-memory dataset through the torch ``DataLoader``
too (per-item indexing and collation, then the same batch augmentation on the device), to compare the
two paths. Under data parallelism (``rank``, ``world_size``) each rank takes positions ``rank::world_size``
of the epoch's order; with ``even=True`` (training) the order is first padded with its own first items
to a multiple of ``world_size``, as ``DistributedSampler`` does, so every rank draws the same number of
equal-sized batches; with ``even=False`` (evaluation) nothing is repeated and shards may differ by one.
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

__all__ = ["LOADERS", "EpochDataLoader", "TensorDataLoader", "make_loader"]

Batch = dict[str, Tensor]
# ``auto``: the tensor path for in-memory datasets, the DataLoader path for everything else.
LOADERS = ("auto", "tensor", "dataloader")


class _Epochs:
    """Batch arithmetic and the epoch counter shared by both loaders."""

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of images, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"expected 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
        self.total_items = num_items
        self.rank, self.world_size, self.even = rank, world_size, even
        # this rank's share of the (padded when even) order
        self.num_items = -(-num_items // world_size) if even else len(range(rank, num_items, world_size))
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def _shard(self, order: Tensor) -> Tensor:
        """This rank's positions ``rank::world_size`` of ``order`` (padded first when ``even``)."""
        if self.world_size == 1:
            return order
        if self.even:
            pad = self.num_items * self.world_size - order.shape[0]
            order = torch.cat([order, order[:pad]])
        return order[self.rank :: self.world_size]

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
        rank, world_size: this process's shard (see the module docstring).
        even: pad the order so every rank gets the same number of images.

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
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
    ) -> None:
        super().__init__(len(dataset), batch_size, seed, drop_last, rank, world_size, even)
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
            order = self._shard(torch.randperm(self.total_items, generator=shuffle_rng)).to(self.device)
        else:
            order = self._shard(torch.arange(self.total_items)).to(self.device)
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
    augmentation. An ``InMemoryDataset`` is read item by item as raw images and augmented and
    normalised per batch on ``device``, as the tensor path does. Batches are moved to ``device``
    (pinned memory, non-blocking copy on CUDA). ``rank``, ``world_size``, ``even``: as
    :class:`TensorDataLoader`.
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
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
    ) -> None:
        super().__init__(len(dataset), batch_size, seed, drop_last, rank, world_size, even)
        self.dataset = dataset
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.device = torch.device("cpu" if device is None else device)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._start_epoch()
        dataset = self.dataset
        if hasattr(dataset, "for_epoch"):
            dataset = dataset.for_epoch(derive_seed(self.seed, epoch, AUGMENT))
        in_memory = isinstance(dataset, InMemoryDataset)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, SHUFFLE))
        order = torch.randperm(self.total_items, generator=generator) if self.shuffle else None
        if order is None and self.world_size > 1:
            order = torch.arange(self.total_items)
        loader = DataLoader(
            _RawImages(dataset) if in_memory else dataset,
            batch_size=self.batch_size,
            sampler=None if order is None else self._shard(order).tolist(),
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            pin_memory=self.device.type == "cuda",
            generator=generator,
        )
        augment_rng = torch.Generator().manual_seed(derive_seed(self.seed, epoch, AUGMENT))
        for batch in loader:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if in_memory:
                x = batch["input"]
                if dataset.augment:
                    x = augment_batch(x, dataset.augment_spec, augment_rng)
                batch["input"] = normalize(x, dataset.mean, dataset.std)
            yield batch


class _RawImages(Dataset):
    """The items of an ``InMemoryDataset`` as float images in [0, 1], before augmentation."""

    def __init__(self, dataset: InMemoryDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Batch:
        d = self.dataset
        return {"input": d.images[i].float().div(d.max_value), "target": d.targets[i], "index": d.indices[i]}


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    device: str | torch.device | None = None,
    augment: bool | None = None,
    *,
    loader: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    even: bool = True,
) -> TensorDataLoader | EpochDataLoader:
    """A seeded, resumable iterable of batch dicts over ``dataset``.

    Args:
        dataset: a relkd dataset (``bundle.train``, ``bundle.test``, ``bundle.transfer``) or any
            dataset whose items are dicts of tensors.
        batch_size: images per batch (per rank).
        shuffle: seeded random order, a new one each epoch.
        seed: run seed; together with the epoch it fixes order and augmentation.
        num_workers: decoding processes for the torch ``DataLoader`` path (the in-memory path
            needs none and ignores it).
        drop_last: drop the last incomplete batch.
        device: where the batches' tensors end up (default CPU).
        augment: force augmentation on or off; None uses the dataset's default (on for a
            training set built with ``augment=True``, off for test sets).
        loader: ``auto`` (the tensor path for an ``InMemoryDataset``, else the ``DataLoader``
            path), ``tensor`` or ``dataloader``.
        rank, world_size: the shard of this process under data parallelism.
        even: pad the epoch's order so every rank gets as many images (training); ``False`` shards
            without repeating any image (evaluation).

    Returns:
        A ``TensorDataLoader`` or an ``EpochDataLoader``; both have ``set_epoch(epoch)`` and
        ``len()`` (number of batches on this rank).
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    in_memory = isinstance(dataset, InMemoryDataset)
    if loader == "tensor" and not in_memory:
        raise ValueError(
            f"loader='tensor' needs an in-memory dataset (digits, fashion_mnist, cifar10/100); "
            f"{type(dataset).__name__} is read from files: use loader='dataloader' or 'auto'"
        )
    shard = {"rank": rank, "world_size": world_size, "even": even}
    if in_memory and loader != "dataloader":
        return TensorDataLoader(dataset, batch_size, shuffle, seed, drop_last, device, augment, **shard)
    if augment is not None:
        dataset = _with_augment(dataset, augment)
    return EpochDataLoader(dataset, batch_size, shuffle, seed, num_workers, drop_last, device, **shard)


def _with_augment(dataset: Any, augment: bool) -> Dataset:
    if not hasattr(dataset, "with_augment"):
        raise TypeError(
            f"augment={augment} needs a dataset with a with_augment() method (relkd datasets have "
            f"one); {type(dataset).__name__} has none, so pass augment=None"
        )
    return dataset.with_augment(augment)
