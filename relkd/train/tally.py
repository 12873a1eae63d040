"""An epoch's running sums, kept on the device, and the check that stops a run at a non-finite term.

Term values are summed on the device without a host sync per step; the first step at which each term
was NaN or infinite is recorded there too. :meth:`EpochTally.check` reads that record (one sync) and
raises :class:`NonFiniteLossError`, naming the term and the step; the engine calls it after every step
on the CPU and every 25 steps elsewhere, and before it saves a checkpoint, so a checkpoint never holds
weights updated from a non-finite loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from relkd import distributed as D
from relkd.train.metrics import topk_correct

__all__ = ["EpochTally", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the term, the step and the checkpoint."""


class EpochTally:
    """Sums of one epoch: each term (``keys``), the weighted total, labelled top-1/top-5 hits.

    Attributes:
        sums: ``[len(keys) + 1]`` sums of the term values and, last, of the total.
        first_bad: ``[len(keys)]`` global step at which each term was first non-finite, -1 if never.
    """

    def __init__(self, keys: Sequence[str], device: torch.device) -> None:
        self.keys = list(keys)
        self.sums = torch.zeros(len(self.keys) + 1, device=device)
        self.first_bad = torch.full((len(self.keys),), -1, dtype=torch.long, device=device)
        self.correct = torch.zeros(2, device=device)
        self.labelled = torch.zeros((), device=device)

    def add(self, values: Tensor, total: Tensor, step: int) -> None:
        """Add one step's ``[len(keys)]`` values and total; ``step`` is the global step number."""
        self.sums += torch.cat([values, total.float().reshape(1)])
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(values), step, self.first_bad)

    def add_accuracy(self, logits: Tensor, target: Tensor) -> None:
        self.correct += topk_correct(logits, target)
        self.labelled += (target >= 0).sum()

    def reduce(self) -> None:
        """Average the sums over ranks and add up the accuracy counts (no-op in a single process)."""
        if not D.is_distributed():
            return
        self.sums = D.reduce_mean(self.sums)
        counts = torch.cat([self.correct, self.labelled.reshape(1)])
        D.all_reduce_mean_([counts])
        # the mean of the counts: the ratio (the accuracy) is that of the sums
        self.correct, self.labelled = counts[:2], counts[2]

    def accuracy(self) -> float:
        """Top-1 (percent) on the labelled images so far (syncs)."""
        return 100.0 * float(self.correct[0] / self.labelled.clamp(min=1))

    def check(self, epoch: int, steps: int, stage: str, checkpoint: Path) -> None:
        """Raise :class:`NonFiniteLossError` if a term was non-finite (``epoch`` is 0-based, ``steps``
        per epoch)."""
        hits = [(s, k) for s, k in zip(self.first_bad.tolist(), self.keys, strict=True) if s >= 0]
        if not hits:
            return
        step, key = min(hits)
        kept = (
            f"the last good checkpoint, {checkpoint}, is kept"
            if checkpoint.is_file()
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"loss term {key!r} is not finite at step {step} (epoch {epoch + 1}, step "
            f"{step - epoch * steps} of {steps}, stage {stage!r}); the run stopped and {kept}. "
            "Lower the learning rate or the term's weight, or turn on relkd.set_debug(True) to find "
            "the first non-finite input"
        )
