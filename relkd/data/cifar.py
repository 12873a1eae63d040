"""``cifar10`` / ``cifar100``: the CIFAR datasets (50,000 / 10,000 RGB 32x32 images).

Read from the official "python version" pickles; nothing is downloaded::

    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/train, test, meta            (labels: 'fine_labels', 100 classes)

The root is the ``root`` argument, ``$RELKD_CIFAR10`` / ``$RELKD_CIFAR100``, or ``$RELKD_DATA``, and
may be either the folder that contains ``cifar-10-batches-py`` (``cifar-100-python``) or that folder
itself.

Augmentation: random crop 32 with 4 pixels of zero padding and a horizontal flip (the standard CIFAR
recipe). Normalisation: the usual per-channel training-set mean and std.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from relkd.data.augment import AugmentSpec
from relkd.data.bundle import DataBundle
from relkd.data.registry import register
from relkd.data.roots import find_dir, search_roots
from relkd.data.tensor_dataset import in_memory_bundle

__all__ = ["CIFAR10", "CIFAR100", "CifarLayout", "cifar10", "cifar100", "load_cifar"]


@dataclass(frozen=True)
class CifarLayout:
    """What distinguishes the CIFAR variants on disk and in training."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    env_var: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR10 = CifarLayout(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{k}" for k in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
    num_classes=10,
    env_var="RELKD_CIFAR10",
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarLayout(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
    num_classes=100,
    env_var="RELKD_CIFAR100",
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _load_split(folder: Path, files: tuple[str, ...], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate pickled batches into uint8 ``[N, 3, 32, 32]`` images and int64 ``[N]`` labels."""
    images, labels = [], []
    for name in files:
        batch = _unpickle(folder / name)
        if b"data" not in batch or label_key not in batch:
            raise ValueError(
                f"{folder / name} lacks the keys b'data' and {label_key!r} of the CIFAR python "
                f"version (found {sorted(batch)}); extract the official tarball again"
            )
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar(layout: CifarLayout, root: str | Path | None, augment: bool) -> DataBundle:
    """Find and load one CIFAR variant (see the module docstring for the search)."""
    folder = find_dir(
        layout.name,
        search_roots(root, layout.env_var, ""),
        (layout.folder, ""),
        lambda d: all((d / f).is_file() for f in layout.files),
        wanted=f"{layout.folder}/ with {', '.join(layout.files)}",
        how_to=(
            f'download the official "CIFAR-{layout.num_classes} python version" tarball from '
            "https://www.cs.toronto.edu/~kriz/cifar.html, extract it under a folder, and pass "
            f"that folder as `data.root` in the config or set {layout.env_var} (or RELKD_DATA)."
        ),
    )
    meta = _unpickle(folder / layout.meta_file)
    classes = tuple(n.decode() for n in meta.get(layout.names_key, ()))
    return in_memory_bundle(
        layout.name,
        _load_split(folder, layout.train_files, layout.label_key),
        _load_split(folder, layout.test_files, layout.label_key),
        num_classes=layout.num_classes,
        max_value=255,
        mean=layout.mean,
        std=layout.std,
        augment_spec=AugmentSpec(padding=4, flip=True),
        augment=augment,
        classes=classes,
    )


@register("cifar10", "cifar-10")
def cifar10(root: str | Path | None = None, augment: bool = True) -> DataBundle:
    """CIFAR-10 from ``cifar-10-batches-py``."""
    return load_cifar(CIFAR10, root, augment)


@register("cifar100", "cifar-100")
def cifar100(root: str | Path | None = None, augment: bool = True) -> DataBundle:
    """CIFAR-100 (fine labels) from ``cifar-100-python``."""
    return load_cifar(CIFAR100, root, augment)
