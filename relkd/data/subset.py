"""Seeded, class-balanced labelled subsets; the rest of the training set can become a transfer set.

``train_subset: N`` keeps ``N // K`` images of each of the K classes, and the ``N % K`` remaining
ones go to the lowest class labels, one each. Classes with too few images give all they have and
the other classes share the shortfall equally (water-filling), so the subset always holds exactly N
images. Which images of a class are kept is a seeded random choice."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from relkd.data.bundle import DataBundle

__all__ = ["class_balanced_indices", "class_quotas", "split_bundle"]


def class_quotas(counts: Tensor, n: int) -> Tensor:
    """How many images of each class a balanced subset of ``n`` takes.

    Args:
        counts: ``[K]`` number of available images per class.
        n: subset size, ``0 <= n <= counts.sum()``.

    Returns:
        ``[K]`` int64 quotas with ``quota <= counts`` and ``quota.sum() == n``, as equal as the
        counts allow; ties in the remainder go to the lowest labels.
    """
    counts = counts.long()
    if not 0 <= n <= int(counts.sum()):
        raise ValueError(f"cannot take {n} images from {int(counts.sum())}")
    # Water-filling: the largest per-class level whose capped total still fits in n ...
    low, high = 0, int(counts.max()) if counts.numel() else 0
    while low < high:
        mid = (low + high + 1) // 2
        if int(counts.clamp(max=mid).sum()) <= n:
            low = mid
        else:
            high = mid - 1
    quota = counts.clamp(max=low)
    # ... then one more image for the lowest labels that still have one; fewer than one per such
    # class remain, because level low + 1 would overshoot n.
    extra = (counts > low).nonzero().flatten()[: n - int(quota.sum())]
    quota[extra] += 1
    return quota


def class_balanced_indices(targets: Tensor, n: int, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split positions ``0..len(targets)-1`` into a class-balanced subset of ``n`` and the rest.

    Args:
        targets: ``[N]`` int64 labels in ``[0, num_classes)``.
        n: labelled subset size, ``num_classes <= n <= N``.
        num_classes: number of classes K.
        seed: seeds which images of each class are chosen.

    Returns:
        ``(subset, rest)``: sorted int64 positions, disjoint, together ``0..N-1``.
    """
    total = targets.numel()
    if n > total:
        raise ValueError(
            f"train_subset={n} is larger than the training set ({total} images); "
            f"choose at most {total}, or null for the full set"
        )
    if n < num_classes:
        raise ValueError(
            f"train_subset={n} is smaller than the number of classes ({num_classes}); "
            f"choose at least {num_classes} so every class has a labelled image"
        )
    counts = torch.bincount(targets, minlength=num_classes)
    quota = class_quotas(counts, n)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for k in range(num_classes):
        members = (targets == k).nonzero().flatten()
        perm = torch.randperm(members.numel(), generator=generator)
        chosen.append(members[perm[: int(quota[k])]])
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.cat(chosen)] = True
    return keep.nonzero().flatten(), (~keep).nonzero().flatten()


def split_bundle(bundle: DataBundle, n: int, unlabeled: bool, seed: int) -> DataBundle:
    """``bundle`` with ``train`` cut to a balanced subset of ``n`` images.

    With ``unlabeled`` the rest becomes ``transfer`` (targets ``-1``, indices unchanged), or None
    when nothing is left.

    ``bundle.train`` must be the full training set and provide ``.targets`` and
    ``.subset(positions, hide_labels)``.
    """
    subset, rest = class_balanced_indices(bundle.train.targets, n, bundle.num_classes, seed)
    transfer = None
    if unlabeled and rest.numel() > 0:
        transfer = bundle.train.subset(rest, hide_labels=True)
    return dataclasses.replace(bundle, train=bundle.train.subset(subset), transfer=transfer)
