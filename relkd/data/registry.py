"""The dataset registry: ``relkd.data.build("cifar100", train_subset=5000)``, ``available()``.

A dataset constructor is registered as ``f(root=None, augment=True, **options) -> DataBundle`` and
returns the full training set; ``build`` then applies the shared options (labelled subset, transfer
set) so no dataset repeats them.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from relkd.data.bundle import DataBundle
from relkd.data.subset import split_bundle
from relkd.registry import Registry, suggest

__all__ = ["DATASETS", "available", "build", "register"]

DATASETS = Registry("dataset")
register = DATASETS.register


def available(pattern: str = "*") -> list[str]:
    """Names of the registered datasets (shell-style ``pattern``)."""
    return DATASETS.available(pattern)


def build(
    name: str,
    root: str | Path | None = None,
    train_subset: int | None = None,
    unlabeled: bool = False,
    seed: int = 0,
    augment: bool = True,
    **kw: Any,
) -> DataBundle:
    """Load a registered dataset.

    Args:
        name: registry name (``available()`` lists them).
        root: where the files are; None searches the dataset's environment variables and defaults.
        train_subset: keep a seeded, class-balanced subset of this many labelled training images
            (None: all of them).
        unlabeled: make the rest of the training set the unlabelled ``transfer`` set (targets -1);
            needs ``train_subset``.
        seed: seeds the subset choice (the train/test split of a dataset never depends on it).
        augment: whether loaders augment the training (and transfer) images by default.
        **kw: dataset-specific options, e.g. ``image_size`` for ``imagefolder``.
    """
    constructor = DATASETS.get(name)
    _check_options(name, constructor, kw)
    if unlabeled and train_subset is None:
        raise ValueError(
            "unlabeled=True makes the training images outside train_subset the transfer set, "
            "but train_subset is None; set train_subset to the number of labelled images"
        )
    bundle = constructor(root=root, augment=augment, **kw)
    if train_subset is None:
        return bundle
    return split_bundle(bundle, int(train_subset), unlabeled, seed)


def _check_options(name: str, constructor: Any, kw: dict[str, Any]) -> None:
    """Reject options the dataset does not take, naming the close match."""
    params = inspect.signature(constructor).parameters
    known = [p for p in params if p not in ("root", "augment")]
    for key in kw:
        if key not in known:
            hint = suggest(key, known) or (
                f" It takes: {', '.join(known)}." if known else " It takes no extra options."
            )
            raise TypeError(f"dataset {name!r} has no option {key!r}.{hint}")
