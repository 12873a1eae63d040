r"""A momentum memory bank: one slowly moving embedding per training example.

.. math::
    v_i \leftarrow \frac{m\, v_i + (1 - m)\, e_i}{\| m\, v_i + (1 - m)\, e_i \|}

for each example ``i`` of the batch with embedding ``e_i`` (Wu et al., "Unsupervised Feature Learning
via Non-Parametric Instance Discrimination", CVPR 2018; used by CRD with ``m = 0.5`` and HKD with
``m = 0.9``). Entries start uniform in ``[-s, s]`` with ``s = 1 / sqrt(D / 3)`` (unit norm in
expectation), as in both authors' code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MemoryBank"]


class MemoryBank(nn.Module):
    """``N x D`` bank of embeddings indexed by dataset index, updated with momentum.

    The bank is the buffer ``memory``: it moves with ``.to(device)``, is saved in ``state_dict`` and
    loads back bit for bit. It is a constant of the loss (never trained).

    Args:
        num_entries: ``N``, the dataset size.
        dim: ``D``, the embedding width.
        momentum: ``m`` in the update above.

    Shapes:
        ``index`` ``[B]``; ``x`` ``[B, D]``; ``memory`` ``[N, D]``.
    """

    def __init__(self, num_entries: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"bank momentum must be in [0, 1), got {momentum}")
        bound = 1.0 / math.sqrt(dim / 3.0)
        self.register_buffer("memory", torch.rand(num_entries, dim).mul_(2 * bound).sub_(bound))
        self.momentum = momentum

    @property
    def num_entries(self) -> int:
        return self.memory.shape[0]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """The stored embeddings of ``index``, ``[B, D]`` (a copy)."""
        return self.memory.index_select(0, index)

    def positive(self, index: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The positive for an anchor of the other network: this bank's entry of the same example."""
        return self(index)

    def smoothed(self, index: torch.Tensor, x: torch.Tensor, momentum: float) -> torch.Tensor:
        """``normalize(momentum * v_index + (1 - momentum) * x)`` without touching the bank, detached."""
        x = x.detach().to(self.memory.dtype)
        return F.normalize(momentum * self(index) + (1.0 - momentum) * x, dim=-1)

    @torch.no_grad()
    def update(self, index: torch.Tensor, x: torch.Tensor) -> None:
        """Move the entries of ``index`` towards ``x`` with the bank's momentum, in place.

        The rows are written into ``memory`` itself (``index_copy_``): a step allocates ``B x D``, not a
        new ``N x D`` bank. The losses of :mod:`relkd.losses` form their gradients before the update
        (:func:`relkd.losses.contrast.contrast_loss`), so their pending backward stays valid; a graph
        of one's own that saved ``memory`` for its backward fails autograd's version check instead.
        With repeated indices in one batch, the last occurrence wins: every copy of an index writes the
        last occurrence's row, so the result does not depend on the order of the writes (unspecified
        for ``index_copy_`` on CUDA), and the ranks of a distributed run, updating with the same
        gathered batch, keep identical banks.
        """
        rows = self.smoothed(index, x, self.momentum)
        position = torch.arange(len(index), device=index.device)
        last = torch.full((self.num_entries,), -1, dtype=torch.long, device=index.device)
        last.scatter_reduce_(0, index, position, "amax")
        self.memory.index_copy_(0, index, rows[last[index]])

    def extra_repr(self) -> str:
        return f"num_entries={self.num_entries}, dim={self.memory.shape[1]}, momentum={self.momentum}"
