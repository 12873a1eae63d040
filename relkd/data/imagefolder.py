"""``imagefolder``: an ImageNet-style folder, ``root/train/<class>/*`` and ``root/val/<class>/*``.

Images are decoded one at a time by torchvision's ``ImageFolder`` and served by a torch
``DataLoader`` (workers decode in parallel). Training items: ``RandomResizedCrop(image_size)`` and a
horizontal flip; evaluation items: ``Resize(round(image_size * 256 / 224))`` and
``CenterCrop(image_size)``; both normalised with the ImageNet mean and std. The root is the ``root``
argument or ``$RELKD_IMAGEFOLDER``.

Reproducible augmentation: inside a loader made by ``make_loader``, each training item's random
crop and flip are drawn from a seed mixed from (run seed, epoch, item index), so they depend
neither on the number of workers nor on the order items are decoded in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from relkd.data.bundle import DataBundle
from relkd.data.registry import register
from relkd.data.roots import find_dir, search_roots
from relkd.data.seeding import derive_seed

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataset", "imagefolder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataset(Dataset):
    """A torchvision ``ImageFolder`` (or part of it) returning the relkd item dict.

    Args:
        folder: the ``ImageFolder``; its ``transform`` is ignored.
        train_transform: PIL image -> tensor, random (used when ``augment``).
        eval_transform: PIL image -> tensor, deterministic.
        augment: use ``train_transform``.
        positions: which images of ``folder`` this dataset holds (default: all); an item's
            ``index`` is its position in ``folder``.
        hide_labels: report target ``-1`` (an unlabelled transfer set).

    Item ``i``: ``{"input": float32 [3, S, S] normalised, "target": int64 [], "index": int64 []}``.
    """

    def __init__(
        self,
        folder: datasets.ImageFolder,
        train_transform: transforms.Compose,
        eval_transform: transforms.Compose,
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
def imagefolder(root: str | Path | None = None, augment: bool = True, image_size: int = 224) -> DataBundle:
    """An ImageNet-style folder with ``train/`` and ``val/`` class sub-folders.

    Args:
        root: the folder holding ``train/`` and ``val/`` (default ``$RELKD_IMAGEFOLDER``).
        augment: loaders apply the random training transform to training items by default.
        image_size: side S of the square network input in pixels (224 for ImageNet).
    """
    folder = find_dir(
        "imagefolder",
        search_roots(root, "RELKD_IMAGEFOLDER", None),
        ("",),
        lambda d: (d / "train").is_dir() and (d / "val").is_dir(),
        wanted="a folder with train/<class>/ and val/<class>/ image folders",
        how_to="pass that folder as `data.root` in the config or set RELKD_IMAGEFOLDER.",
    )
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    eval_tf = transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    train = datasets.ImageFolder(str(folder / "train"))
    test = datasets.ImageFolder(str(folder / "val"))
    if test.classes != train.classes:
        missing = sorted(set(train.classes) ^ set(test.classes))
        raise ValueError(
            f"{folder}: train/ and val/ must hold the same class folders; they differ in {missing}"
        )
    return DataBundle(
        name="imagefolder",
        train=ImageFolderDataset(train, train_tf, eval_tf, augment=augment),
        test=ImageFolderDataset(test, train_tf, eval_tf, augment=False),
        num_classes=len(train.classes),
        in_channels=3,
        image_size=(image_size, image_size),
        train_targets=torch.as_tensor(train.targets, dtype=torch.int64),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        classes=tuple(train.classes),
    )
