r"""Negative sampling on the device, from the global torch RNG.

Two laws, both drawn with replacement, ``K`` per anchor:

* uniform over the ``N`` bank entries (CRD's ``AliasMethod`` with uniform weights):
  :math:`P(j) = 1 / N`;
* uniform over the entries of the *other* classes (HKD's and RepDistiller's CIFAR-100 sampler):
  :math:`P(j \mid y_a) = 1 / (N - n_{y_a})` for :math:`y_j \ne y_a`.

The second is exact and needs no rejection loop: the indices are kept sorted by class, class ``c``
owning the slice ``[start_c, start_c + n_c)``. A draw ``r`` uniform in ``[0, N - n_c)`` is mapped past
that slice (``r + n_c`` where ``r >= start_c``), so it lands on every other-class position with equal
probability and never on the anchor's own class. Everything is ``O(B K)`` work on the inputs' device,
and ``torch.manual_seed`` makes it reproducible.

The authors draw HKD's negatives without replacement in their data loader; with ``K = 16384`` of about
50,000 entries that costs a sort per anchor, so here they are drawn with replacement, the usual Monte
Carlo estimate of the same denominator.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NegativeSampler"]

# randint's exclusive bound: the modulo below then has a bias of at most N / 2**62.
_WIDE = 1 << 62


class NegativeSampler(nn.Module):
    """Draw ``[B, K]`` negative indices for a batch of anchors.

    Args:
        num_entries: ``N``, the number of bank entries (the dataset size for a full bank).
        targets: the label of every entry ``[N]``; given, negatives come from other classes only.

    The class tables are non-persistent buffers: they move with ``.to(device)`` and are rebuilt from
    ``targets`` by the constructor, not stored in ``state_dict``.

    Shapes:
        ``index`` ``[B]`` (dataset indices of the anchors) -> ``[B, K]`` int64 on ``index.device``.
    """

    def __init__(self, num_entries: int, targets: torch.Tensor | None = None) -> None:
        super().__init__()
        if num_entries < 1:
            raise ValueError(f"a negative sampler needs at least one entry, got {num_entries}")
        self.num_entries = int(num_entries)
        self.by_class = targets is not None
        if targets is None:
            return
        targets = torch.as_tensor(targets)
        if targets.dim() != 1 or targets.numel() != num_entries:
            raise ValueError(
                f"expected targets with one label per entry, shape [{num_entries}], got shape "
                f"{tuple(targets.shape)}"
            )
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(f"expected integer class labels as targets, got dtype {targets.dtype}")
        targets = targets.long()
        if targets.min() < 0:
            raise ValueError("expected non-negative class labels in targets, got a negative label")
        counts = torch.bincount(targets)
        if int((counts > 0).sum()) < 2:
            raise ValueError("negatives from other classes need targets with at least two classes, got one")
        self.register_buffer("targets", targets, persistent=False)
        self.register_buffer("order", torch.argsort(targets, stable=True), persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts, persistent=False)

    def forward(self, index: torch.Tensor, num_negatives: int) -> torch.Tensor:
        """``[B, K]`` negatives for the anchors ``index`` (see the module docstring for the laws)."""
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
        shape = (index.shape[0], num_negatives)
        if not self.by_class:
            return torch.randint(0, self.num_entries, shape, device=index.device)
        label = self.targets[index]
        own, start = self.counts[label].unsqueeze(1), self.starts[label].unsqueeze(1)
        r = torch.randint(0, _WIDE, shape, device=index.device) % (self.num_entries - own)
        return self.order[r + own * (r >= start)]

    def extra_repr(self) -> str:
        law = "other classes" if self.by_class else "uniform"
        return f"num_entries={self.num_entries}, law={law!r}"
