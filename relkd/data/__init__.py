"""Datasets and loaders.

``build(name, ...)`` returns a ``DataBundle`` (train / test / optional transfer datasets and their
metadata); ``from_arrays(name, train, test)`` makes one of arrays or tensors in memory (one's own
data: see :mod:`relkd.data.arrays`); ``make_loader(dataset, ...)`` iterates a dataset as seeded,
resumable batches of ``{"input", "target", "index"}`` tensors. Datasets register themselves by name.
"""

from relkd.data import cifar, digits, fashion_mnist, imagefolder, text  # noqa: F401  (registration)
from relkd.data.arrays import from_arrays
from relkd.data.augment import AugmentSpec
from relkd.data.bundle import DataBundle
from relkd.data.imagefolder import ImageFolderDataset
from relkd.data.loaders import EpochDataLoader, TensorDataLoader, make_loader
from relkd.data.registry import DATASETS, available, build, register
from relkd.data.subset import class_balanced_indices
from relkd.data.tensor_dataset import InMemoryDataset, in_memory_bundle

__all__ = [
    "DATASETS",
    "AugmentSpec",
    "DataBundle",
    "EpochDataLoader",
    "ImageFolderDataset",
    "InMemoryDataset",
    "TensorDataLoader",
    "available",
    "build",
    "class_balanced_indices",
    "from_arrays",
    "in_memory_bundle",
    "make_loader",
    "register",
]
