"""An epoch's running sums, kept on the device, and the check that stops a run at a non-finite term.

Term values are summed on the device without a host sync per step; the first step at which each term
was NaN or infinite is recorded there too. :meth:`EpochTally.check` reads that record (one sync) and
raises :class:`NonFiniteLossError`, naming the term and the step; the engine calls it after every step
on the CPU and every 25 steps elsewhere, and before it saves a checkpoint, so a checkpoint never holds
weights updated from a non-finite loss. Under data parallelism the record is gathered from every rank
first (one collective, at the same steps on every rank), so that all ranks stop together with the same
message, which names the rank where the term first went bad, instead of one rank raising while the
others wait for it in their next collective.
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

    def add_accuracy(self, logits: Tensor, target: Tensor, replicated: bool = False) -> None:
        """Count the step's top-1/top-5 hits on labelled images; a ``replicated`` step (every rank
        holds the same batch) is counted on rank 0 alone, so that each image counts once."""
        if replicated and not D.is_main_process():
            return
        self.correct += topk_correct(logits, target)
        self.labelled += (target >= 0).sum()

    def reduce(self) -> None:
        """Average the sums over ranks and add up the accuracy counts (no-op in a single process)."""
        if not D.is_distributed():
            return
        self.sums = D.reduce_mean(self.sums)
        counts = D.all_reduce_sum(torch.cat([self.correct, self.labelled.reshape(1)]))
        self.correct, self.labelled = counts[:2], counts[2]

    def accuracy(self) -> float:
        """Top-1 (percent) on the labelled images so far (syncs)."""
        return 100.0 * float(self.correct[0] / self.labelled.clamp(min=1))

    def check(self, epoch: int, steps: int, stage: str, checkpoint: Path, collective: bool = True) -> None:
        """Raise :class:`NonFiniteLossError` if a term was non-finite (``epoch`` is 0-based, ``steps``
        per epoch).

        With ``collective`` (every rank calls it at the same point) the record of every rank is read,
        so every rank raises; without it (after an error on this rank alone), only this rank's.
        """
        ranks = self.first_bad.reshape(1, -1)
        if collective and D.is_distributed():
            ranks = D.all_gather(ranks)
        hits = [
            (s, r, k)
            for r, row in enumerate(ranks.tolist())
            for s, k in zip(row, self.keys, strict=True)
            if s >= 0
        ]
        if not hits:
            return
        step, where, key = min(hits)
        if not collective:
            where = D.rank()
        on_rank = f" on rank {where} of {D.world_size()}" if D.is_distributed() else ""
        kept = (
            f"the last good checkpoint, {checkpoint}, is kept"
            if checkpoint.is_file()
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"loss term {key!r} is not finite at step {step} (epoch {epoch + 1}, step "
            f"{step - epoch * steps} of {steps}, stage {stage!r}){on_rank}; the run stopped and {kept}. "
            "Lower the learning rate or the term's weight, or turn on relkd.set_debug(True) to find "
            "the first non-finite input"
        )
