"""``fashion_mnist``: Zalando's Fashion-MNIST (60,000 / 10,000 grey 28x28 images, 10 classes).

Read straight from the four idx files (gzipped or not); nothing is downloaded. Folders are searched
in this order, each as is and with a ``fashion_mnist``, ``fashion-mnist`` or torchvision-style
``FashionMNIST/raw`` sub-folder: the ``root`` argument, ``$RELKD_FASHION_MNIST``,
``$RELKD_DATA/fashion_mnist``, then ``/usr/share/datasets/fashion-mnist`` (where the Debian package
``dataset-fashion-mnist`` installs them).

Augmentation: random crop 28 with 2 pixels of zero padding, and a horizontal flip (a mirrored
garment is the same garment). Normalisation: mean 0.2860, std 0.3530.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from relkd.data.augment import AugmentSpec
from relkd.data.bundle import DataBundle
from relkd.data.registry import register
from relkd.data.roots import find_dir, search_roots
from relkd.data.tensor_dataset import in_memory_bundle

__all__ = ["CLASSES", "SYSTEM_DIRS", "fashion_mnist", "read_idx"]

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_DIRS = ["/usr/share/datasets/fashion-mnist"]
LAYOUTS = ("", "fashion_mnist", "fashion-mnist", "FashionMNIST/raw")
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# idx type codes (http://yann.lecun.com/exdb/mnist/), big-endian.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one idx file (``.gz`` or plain) into an array of the shape its header declares."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_DTYPES:
        raise ValueError(
            f"{path} is not an idx file (header {data[:4].hex()}); expected 00 00 <type> <ndim>. "
            "Replace it with the original Fashion-MNIST file."
        )
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(
            f"{path} is truncated: header says shape {shape} ({int(np.prod(shape))} values), "
            f"file holds {array.size}. Replace it with the original file."
        )
    return array.reshape(shape)


def _file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _is_complete(folder: Path) -> bool:
    return all(_file(folder, stem) is not None for stem in FILES.values())


def _load(folder: Path, images: str, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = read_idx(_file(folder, FILES[images]))
    y = read_idx(_file(folder, FILES[labels]))
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{folder}: {x.shape[0]} {images} but {y.shape[0]} {labels}")
    return torch.from_numpy(x.astype(np.uint8)[:, None]), torch.from_numpy(y.astype(np.int64))


@register("fashion_mnist", "fashion-mnist", "fashionmnist")
def fashion_mnist(root: str | Path | None = None, augment: bool = True) -> DataBundle:
    """Fashion-MNIST from its idx files; see the module docstring for where they are looked for."""
    folder = find_dir(
        "fashion_mnist",
        search_roots(root, "RELKD_FASHION_MNIST", "fashion_mnist", SYSTEM_DIRS),
        LAYOUTS,
        _is_complete,
        wanted=", ".join(f"{stem}(.gz)" for stem in FILES.values()),
        how_to=(
            "`apt-get install dataset-fashion-mnist` (installs them in "
            "/usr/share/datasets/fashion-mnist), or put the four files in a folder and set "
            "RELKD_FASHION_MNIST=/that/folder or `data.root` in the config."
        ),
    )
    return in_memory_bundle(
        "fashion_mnist",
        _load(folder, "train_images", "train_labels"),
        _load(folder, "test_images", "test_labels"),
        num_classes=10,
        max_value=255,
        mean=(0.2860,),
        std=(0.3530,),
        augment_spec=AugmentSpec(padding=2, flip=True),
        augment=augment,
        classes=CLASSES,
    )
