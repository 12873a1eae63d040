"""A fixed-length FIFO queue of embeddings (MoCo-style) for datasets whose full bank is too large.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020: the
newest ``B`` embeddings replace the oldest. The queue holds ``Q`` recent embeddings of one network
regardless of the dataset size, so its memory is ``Q x D`` instead of ``N x D``. Slots start with
the same random values as :class:`~relkd.memory.MemoryBank` and are overwritten within ``Q / B`` steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["QueueBank"]


class QueueBank(nn.Module):
    """``Q x D`` ring buffer of recent embeddings with a write pointer.

    ``memory`` and ``ptr`` are buffers: they move with ``.to(device)``, are saved in ``state_dict``
    and resume exactly. Unlike a full bank, the queue has no entry per example, so the positive of
    an anchor is the other network's embedding of the same example in the current batch.

    Args:
        size: ``Q``, the number of slots.
        dim: ``D``, the embedding width.

    Shapes:
        ``x`` ``[B, D]`` with ``B <= Q``; ``memory`` ``[Q, D]``; ``ptr`` a scalar int64.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be at least 1, got {size}")
        bound = 1.0 / math.sqrt(dim / 3.0)
        self.register_buffer("memory", torch.rand(size, dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def num_entries(self) -> int:
        return self.memory.shape[0]

    def positive(self, index: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The positive for an anchor of the other network: this network's current embedding."""
        return current.detach().to(self.memory.dtype)

    @torch.no_grad()
    def update(self, index: torch.Tensor, x: torch.Tensor) -> None:
        """Enqueue ``x`` over the oldest slots (``index`` is unused: slots are not per example).

        Written in place, like :meth:`MemoryBank.update`: the losses' backward reads no queue.
        """
        if x.shape[0] > self.num_entries:
            raise ValueError(
                f"cannot enqueue a batch of {x.shape[0]} into a queue of {self.num_entries} slots; "
                "use a queue_size at least as large as the batch"
            )
        slots = (self.ptr + torch.arange(x.shape[0], device=self.ptr.device)) % self.num_entries
        self.memory.index_copy_(0, slots, x.detach().to(self.memory.dtype))
        self.ptr.add_(x.shape[0]).remainder_(self.num_entries)

    def extra_repr(self) -> str:
        return f"size={self.num_entries}, dim={self.memory.shape[1]}"
