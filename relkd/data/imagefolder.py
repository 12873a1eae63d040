"""``imagefolder``: class sub-folders of images, ``root/train/<class>/*`` and ``root/val/<class>/*``.

Images are decoded one at a time by torchvision's ``ImageFolder`` and served by a torch ``DataLoader``
(workers decode in parallel). The root is the ``root`` argument or ``$RELKD_IMAGEFOLDER``. Options
(``data.options``):

* ``channels``: 1 (grey) or 3 (RGB, default); images are converted on loading.
* ``image_size``: side S of the square network input; default the first training image's size
  (no resizing when every image has it).
* ``normalize``: ``data`` (default: the per-channel mean and std of up to 1,000 training images,
  evenly spread), ``imagenet`` (ImageNet's constants) or ``{mean: [...], std: [...]}``.
* ``augmentation`` of the training items: ``none`` (default), ``crop`` (a random crop after zero
  padding of S/8 pixels), ``crop_flip`` (that and a horizontal flip, the CIFAR recipe) or ``imagenet``
  (``RandomResizedCrop(S)`` and a flip; evaluation then resizes to ``S * 256 / 224`` and takes the
  centre crop, as the ImageNet recipe).

Reproducible augmentation: inside a loader made by ``make_loader``, each training item's random
crop and flip are drawn from a seed mixed from (run seed, epoch, item index), so they depend
neither on the number of workers nor on the order items are decoded in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from relkd.data.bundle import DataBundle
from relkd.data.registry import register
from relkd.data.roots import find_dir, search_roots
from relkd.data.seeding import derive_seed

__all__ = ["AUGMENTATIONS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataset", "imagefolder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("none", "crop", "crop_flip", "imagenet")
# Training images read to estimate the normalisation constants (evenly spread over the set).
STATS_IMAGES = 1000


class ImageFolderDataset(Dataset):
    """A torchvision ``ImageFolder`` (or part of it) returning the relkd item dict.

    Args:
        folder: a torchvision ``ImageFolder``; its ``transform`` is ignored.
        train_transform: PIL image -> tensor, random (used when ``augment``).
        eval_transform: PIL image -> tensor, deterministic.
        augment: use ``train_transform``.
        positions: which images of ``folder`` this dataset holds (default: all); an item's
            ``index`` is its position in ``folder``.
        hide_labels: report target ``-1`` (an unlabelled transfer set).

    Item ``i``: ``{"input": float32 [C, S, S] normalised, "target": int64 [], "index": int64 []}``.
    """

    def __init__(
        self,
        folder: Any,
        train_transform: Callable[[Any], Tensor],
        eval_transform: Callable[[Any], Tensor],
        augment: bool,
        positions: Tensor | None = None,
        hide_labels: bool = False,
    ) -> None:
        self.folder = folder
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.augment = augment
        self.indices = torch.arange(len(folder)) if positions is None else positions.long()
        labels = torch.as_tensor(folder.targets, dtype=torch.int64)[self.indices]
        self.targets = torch.full_like(labels, -1) if hide_labels else labels
        self.epoch_seed: int | None = None

    def __len__(self) -> int:
        return self.indices.numel()

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        index = int(self.indices[i])
        path, _ = self.folder.samples[index]
        image = self.folder.loader(path)
        if not self.augment:
            x = self.eval_transform(image)
        elif self.epoch_seed is None:
            x = self.train_transform(image)
        else:
            # torchvision draws from the global RNG; a private, item-seeded state keeps the
            # augmentation reproducible without disturbing the caller's random stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.epoch_seed, index))
                x = self.train_transform(image)
        return {"input": x, "target": self.targets[i], "index": self.indices[i]}

    def subset(self, positions: Tensor, hide_labels: bool = False) -> ImageFolderDataset:
        """The items at ``positions`` (of this dataset), keeping their folder indices."""
        out = copy.copy(self)
        out.indices = self.indices[positions]
        out.targets = torch.full_like(out.indices, -1) if hide_labels else self.targets[positions]
        return out

    def with_augment(self, augment: bool) -> ImageFolderDataset:
        """A view of the same images with the training (True) or evaluation (False) transform."""
        out = copy.copy(self)
        out.augment = augment
        return out

    def for_epoch(self, seed: int) -> ImageFolderDataset:
        """A view whose training transforms draw from ``seed`` (mixed with each item's index)."""
        out = copy.copy(self)
        out.epoch_seed = seed
        return out

    def __repr__(self) -> str:
        root, n = self.folder.root, len(self)
        return f"ImageFolderDataset(n={n}, root={root!r}, augment={self.augment})"


@register("imagefolder", "imagenet")
def imagefolder(
    root: str | Path | None = None,
    augment: bool = True,
    image_size: int | None = None,
    channels: int = 3,
    normalize: str | dict[str, Sequence[float]] = "data",
    augmentation: str = "none",
) -> DataBundle:
    """A folder with ``train/`` and ``val/`` class sub-folders (options in the module docstring).

    Args:
        root: the folder holding ``train/`` and ``val/`` (default ``$RELKD_IMAGEFOLDER``).
        augment: loaders apply the random training transform to training items by default.
        image_size: side of the square network input in pixels (default: the first image's).
        channels: 1 or 3.
        normalize: ``data``, ``imagenet`` or ``{mean, std}``.
        augmentation: ``none``, ``crop``, ``crop_flip`` or ``imagenet``.
    """
    from torchvision import datasets, transforms

    if channels not in (1, 3):
        raise ValueError(f"imagefolder: channels must be 1 (grey) or 3 (RGB), got {channels}")
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"imagefolder: augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}"
        )
    folder = find_dir(
        "imagefolder",
        search_roots(root, "RELKD_IMAGEFOLDER", None),
        ("",),
        lambda d: (d / "train").is_dir() and (d / "val").is_dir(),
        wanted="a folder with train/<class>/ and val/<class>/ image folders",
        how_to="pass that folder as `data.root` in the config or set RELKD_IMAGEFOLDER.",
    )
    mode = "L" if channels == 1 else "RGB"

    def load(path: str) -> Any:
        from PIL import Image

        with open(path, "rb") as f:
            return Image.open(f).convert(mode)

    train = datasets.ImageFolder(str(folder / "train"), loader=load)
    test = datasets.ImageFolder(str(folder / "val"), loader=load)
    if test.classes != train.classes:
        missing = sorted(set(train.classes) ^ set(test.classes))
        raise ValueError(
            f"{folder}: train/ and val/ must hold the same class folders; they differ in {missing}"
        )
    if not train.samples:
        raise ValueError(f"{folder / 'train'}: no image found in its class folders")
    if image_size is None:
        width, height = train.loader(train.samples[0][0]).size
        image_size = max(width, height)
    if augmentation == "imagenet":
        resize = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
        random = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        resize = [transforms.Resize((image_size, image_size))]
        pad = max(1, image_size // 8)
        random = {
            "none": resize,
            "crop": [*resize, transforms.RandomCrop(image_size, padding=pad)],
            "crop_flip": [
                *resize,
                transforms.RandomCrop(image_size, padding=pad),
                transforms.RandomHorizontalFlip(),
            ],
        }[augmentation]
    mean, std = _normalization(
        normalize, train, transforms.Compose([*resize, transforms.ToTensor()]), channels
    )
    norm = transforms.Normalize(mean, std)
    train_tf = transforms.Compose([*random, transforms.ToTensor(), norm])
    eval_tf = transforms.Compose([*resize, transforms.ToTensor(), norm])
    return DataBundle(
        name="imagefolder",
        train=ImageFolderDataset(train, train_tf, eval_tf, augment=augment),
        test=ImageFolderDataset(test, train_tf, eval_tf, augment=False),
        num_classes=len(train.classes),
        in_channels=channels,
        image_size=(image_size, image_size),
        train_targets=torch.as_tensor(train.targets, dtype=torch.int64),
        mean=mean,
        std=std,
        classes=tuple(train.classes),
    )


def _normalization(
    normalize: str | dict[str, Sequence[float]],
    folder: Any,
    to_tensor: Callable[[Any], Tensor],
    channels: int,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` of pixels in [0, 1]."""
    if normalize == "imagenet":
        if channels != 3:
            raise ValueError("imagefolder: ImageNet's normalisation is for 3 channels; use normalize: data")
        return IMAGENET_MEAN, IMAGENET_STD
    if isinstance(normalize, dict):
        mean, std = tuple(float(m) for m in normalize["mean"]), tuple(float(s) for s in normalize["std"])
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"imagefolder: normalize needs {channels} means and stds, got {mean} and {std}")
        return mean, std
    if normalize != "data":
        raise ValueError(f"imagefolder: normalize must be data, imagenet or {{mean, std}}, got {normalize!r}")
    n = len(folder.samples)
    picks = torch.linspace(0, n - 1, min(n, STATS_IMAGES)).round().long().unique().tolist()
    total = torch.zeros(channels, dtype=torch.float64)
    square = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for i in picks:
        x = to_tensor(folder.loader(folder.samples[i][0])).double()
        total += x.sum((1, 2))
        square += x.pow(2).sum((1, 2))
        count += x[0].numel()
    mean = total / count
    std = (square / count - mean.pow(2)).clamp(min=0).sqrt().clamp(min=1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())
