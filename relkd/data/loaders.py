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
two paths. Augmentation is drawn per item (:func:`relkd.data.augment.draw_augment`): image ``i`` of
epoch ``e`` is augmented the same way in whatever batch, position or process it lands.

Under data parallelism (``rank``, ``world_size`` = ``W``) a training loader (``even=True``) cuts the
epoch's order into *global* batches of ``W * batch_size`` images, exactly the batches of one process
with that batch size, and gives rank ``r`` the ``r``-th contiguous ``1 / W`` of each, so that the ranks'
shards, concatenated in rank order, are the single-process batch. A batch whose size ``W`` does not
divide (the epoch's last one) is not padded with repeated images: every rank gets all of it, and each
batch then carries a boolean ``replicated`` row flag (``[B]``, on the CPU, only when ``W > 1``) that
says so; the engine computes such a step on every rank alike, without gathering (see
:func:`relkd.train.parallel.assemble`), so every image of the epoch is weighted once. An evaluation
loader (``even=False``) gives rank ``r`` positions ``r::W`` instead, each image exactly once, and no
flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from relkd.data.augment import apply_augment, draw_augment, normalize
from relkd.data.seeding import AUGMENT, SHUFFLE, derive_seed
from relkd.data.tensor_dataset import InMemoryDataset

__all__ = ["LOADERS", "REPLICATED", "EpochDataLoader", "TensorDataLoader", "make_loader"]

Batch = dict[str, Tensor]
# ``auto``: the tensor path for in-memory datasets, the DataLoader path for everything else.
LOADERS = ("auto", "tensor", "dataloader")
# The row flag of a training batch that every rank holds whole (see the module docstring).
REPLICATED = "replicated"


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
        # the images this loader's batches are cut from, and the size of those batches
        self.num_items = num_items if even else len(range(rank, num_items, world_size))
        self.batch_size = batch_size
        self.step_size = batch_size * world_size if even else batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def _batches(self, order: Tensor) -> list[tuple[Tensor, bool]]:
        """This rank's positions of ``order`` for each batch, and whether the batch is replicated."""
        w, size = self.world_size, self.step_size
        if not self.even:
            mine = order[self.rank :: w]
            return [(mine[k * size : (k + 1) * size], False) for k in range(len(self))]
        out = []
        for k in range(len(self)):
            batch = order[k * size : (k + 1) * size]
            n = batch.shape[0]
            if n % w:
                out.append((batch, True))
            else:
                out.append((batch[self.rank * (n // w) : (self.rank + 1) * (n // w)], False))
        return out

    def _flag(self, batch: Batch, replicated: bool) -> Batch:
        if self.even and self.world_size > 1:
            batch[REPLICATED] = torch.full((batch["target"].shape[0],), replicated, dtype=torch.bool)
        return batch

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
            return self.num_items // self.step_size
        return -(-self.num_items // self.step_size)


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
        even: training shards: contiguous ``1 / world_size`` of each global batch of
            ``world_size * batch_size`` images (see the module docstring); else positions
            ``rank::world_size``.

    Yields:
        ``{"input": float32 [B, C, H, W] normalised, "target": int64 [B], "index": int64 [B]}``, and
        ``"replicated": bool [B]`` (CPU) for a training loader of ``world_size > 1``.
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
            order = torch.randperm(self.total_items, generator=shuffle_rng)
        else:
            order = torch.arange(self.total_items)
        draws = None
        if self.augment:
            augment_rng = torch.Generator().manual_seed(derive_seed(self.seed, epoch, AUGMENT))
            draws = draw_augment(self.dataset.augment_spec, self.total_items, augment_rng).to(self.device)
        for idx, replicated in self._batches(order.to(self.device)):
            x = self.images[idx].float().div_(self.dataset.max_value)
            if draws is not None:
                x = apply_augment(x, self.dataset.augment_spec, draws[:, idx])
            batch = {
                "input": normalize(x, self.mean, self.std),
                "target": self.targets[idx],
                "index": self.indices[idx],
            }
            yield self._flag(batch, replicated)


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
        order = (
            torch.randperm(self.total_items, generator=generator)
            if self.shuffle
            else torch.arange(self.total_items)
        )
        batches = self._batches(order)
        loader = DataLoader(
            _RawImages(dataset) if in_memory else dataset,
            batch_sampler=[idx.tolist() for idx, _ in batches],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=generator,
        )
        draws = None
        if in_memory and dataset.augment:
            augment_rng = torch.Generator().manual_seed(derive_seed(self.seed, epoch, AUGMENT))
            draws = draw_augment(dataset.augment_spec, self.total_items, augment_rng)
        for batch, (idx, replicated) in zip(loader, batches, strict=True):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if in_memory:
                x = batch["input"]
                if draws is not None:
                    x = apply_augment(x, dataset.augment_spec, draws[:, idx])
                batch["input"] = normalize(x, dataset.mean, dataset.std)
            yield self._flag(batch, replicated)


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
        batch_size: images per batch on this rank: a training loader's (``even``) global batches hold
            ``world_size * batch_size`` images.
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
        even: training shards (every rank draws as many batches; a last batch that ``world_size``
            does not divide is given whole to every rank, flagged ``replicated``); ``False``: positions
            ``rank::world_size`` (evaluation: each image once, shards may differ by one).

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
