"""Datasets and loaders.

``build(name, ...)`` returns a ``DataBundle`` (train / test / optional transfer datasets and their
metadata); ``make_loader(dataset, ...)`` iterates a dataset as seeded, resumable batches of
``{"input", "target", "index"}`` tensors. Datasets register themselves by name.
"""

from relkd.data import cifar, digits, fashion_mnist, imagefolder  # noqa: F401  (registration)
from relkd.data.augment import AugmentSpec
from relkd.data.bundle import DataBundle
from relkd.data.imagefolder import ImageFolderDataset
from relkd.data.loaders import EpochDataLoader, TensorDataLoader, make_loader
from relkd.data.registry import DATASETS, available, build, register
from relkd.data.subset import class_balanced_indices
from relkd.data.tensor_dataset import InMemoryDataset

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
    "make_loader",
    "register",
]
