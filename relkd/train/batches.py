"""The training batches of each step.

Data-efficient setting: with a labelled subset and an unlabelled transfer set, an epoch is one pass
over the transfer set. Each step takes the next labelled batch (the labelled loader is cycled, a fresh
seeded order each cycle) and, when the stage has distillation terms, appends a transfer batch (targets
``-1``). The cross-entropy then reads the labelled images and the distillation terms the whole batch.
A stage without distillation terms (the student trained alone) takes the same number of steps with the
same labelled batches, so every method of a suite gets the same labelled data and optimiser steps. Without
a transfer set an epoch is one pass over the labelled set.

Every epoch's batches are a function of ``(seed, epoch)`` only (:mod:`relkd.data.loaders`), so a
resumed run sees the batches an uninterrupted one would. What a step makes of a batch before its
networks see it (mixup, rotations ...) is a batch transform (:mod:`relkd.methods.transforms`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["Batch", "TrainBatches", "concat"]

Batch = dict[str, Tensor]


def concat(first: Batch, second: Batch) -> Batch:
    """Two batches as one, ``first`` then ``second``, key by key."""
    return {k: torch.cat([first[k], second[k]]) for k in first}


class TrainBatches:
    """The steps of each training epoch (see the module docstring).

    Args:
        labelled: loader of the labelled training images (``set_epoch``, ``len``, iterable).
        transfer: loader of the unlabelled transfer images, or None.
    """

    def __init__(self, labelled: Any, transfer: Any | None = None) -> None:
        if len(labelled) == 0:
            raise ValueError("the labelled training loader yields no batch; check data.batch_size")
        self.labelled, self.transfer = labelled, transfer

    def __len__(self) -> int:
        """Steps per epoch."""
        return len(self.transfer) if self.transfer is not None else len(self.labelled)

    def epoch(self, epoch: int, with_transfer: bool) -> Iterator[Batch]:
        """The batches of epoch ``epoch`` (0-based); transfer images appended if ``with_transfer``."""
        steps = len(self)
        cycles = math.ceil(steps / len(self.labelled))
        # Epoch e uses the labelled loader's epochs e*cycles .. e*cycles + cycles-1: a pure function of e.
        self.labelled.set_epoch(epoch * cycles)
        labelled = itertools.chain.from_iterable(iter(self.labelled) for _ in range(cycles))
        transfer = None
        if with_transfer and self.transfer is not None:
            self.transfer.set_epoch(epoch)
            transfer = iter(self.transfer)
        for _ in range(steps):
            batch = next(labelled)
            yield batch if transfer is None else concat(batch, next(transfer))
