r"""Negative sampling on the device: ``K`` bank entries per anchor, drawn with or without replacement.

Two laws:

* uniform over the ``N`` bank entries (CRD's ``ContrastMemory`` sampler, an ``AliasMethod`` with uniform
  weights, which draws with replacement): :math:`P(j) = 1 / N`;
* uniform over the entries of the *other* classes: :math:`P(j \mid y_a) = 1 / (N - n_{y_a})` for
  :math:`y_j \ne y_a`. This is the CIFAR-100 data loader of RepDistiller (``dataset/cifar100.py``,
  ``CIFAR100InstanceSample``; github.com/HobbitLong/RepDistiller) and of HKD (github.com/wyc-ruiker/HKD,
  the same file, ``mode='hkd'``), which draw the ``K`` negatives of an anchor of class ``c``
  *without replacement* (``np.random.choice(..., replace=False)``) unless ``K > N - n_c``, when they draw
  with replacement.

Without replacement (the default), an anchor's ``K`` negatives are ``K`` distinct entries, each
``K``-subset of the allowed entries equally likely, by one of two exact algorithms:

* random keys: every entry gets an independent uniform 62-bit key, the anchor's own class a key above all
  others, and the ``K`` smallest keys win (``topk``; ties have probability about ``N^2 / 2^63``):
  ``O(B N)`` work in a few kernels, in blocks of anchors of at most 2^23 keys;
* Floyd's algorithm (Bentley & Floyd, "A sample of brilliance", CACM 1987), on the CPU when ``K`` is
  small against ``N`` (``32 K <= N``), where drawing ``B N`` keys would dominate: for
  ``j = M - K, ..., M - 1`` (``M`` the anchor's count of allowed entries) draw ``t`` uniform in
  ``[0, j]`` and take ``t``, or ``j`` if ``t`` is already taken; ``K`` steps on ``[B]`` vectors and a
  ``B x N`` table of taken entries.

An anchor whose allowed set is smaller than ``K`` falls back to draws with replacement, as the authors'
loader does.

With replacement, a draw ``r`` uniform in ``[0, N - n_c)`` is mapped past the slice of class ``c`` in
the class-sorted order of the entries (``r + n_c`` where ``r >= start_c``), so it lands on every
other-class entry with equal probability and never on class ``c``.

Every path runs on the inputs' device with a fixed number of kernels: no host synchronisation, no
rejection loop. Draws come from ``generator`` when given (a ``torch.Generator`` on ``index.device``),
else from the global RNG, so ``torch.manual_seed`` or a seeded generator makes them reproducible.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NegativeSampler"]

# randint's exclusive bound: the modulo below then has a bias of at most N / 2**62. It is also the key
# of the entries an anchor may not draw, above every random key.
_WIDE = 1 << 62
# Keys held at once by the random-key draws without replacement (int64: 64 MiB).
_BLOCK = 1 << 23
# Floyd's algorithm draws on the CPU when the entries outnumber the negatives this many times.
_FLOYD_RATIO = 32


class NegativeSampler(nn.Module):
    """Draw ``[B, K]`` negative indices for a batch of anchors.

    Args:
        num_entries: ``N``, the number of bank entries (the dataset size for a full bank).
        targets: the label of every entry ``[N]``; given, negatives come from other classes only. A
            negative label marks an entry whose label is hidden (an unlabelled transfer image in a
            label-scarce run): it counts as a class of its own, so it may be the negative of any
            anchor, and as an anchor it excludes only itself. The labels of a run's unlabelled images
            are never read.
        replacement: draw with replacement (``K`` independent draws per anchor); by default the ``K``
            negatives of an anchor are distinct whenever it has at least ``K`` allowed entries.

    The class tables are non-persistent buffers: they move with ``.to(device)`` and are rebuilt from
    ``targets`` by the constructor, not stored in ``state_dict``.

    Shapes:
        ``index`` ``[B]`` (dataset indices of the anchors) -> ``[B, K]`` int64 on ``index.device``.
    """

    def __init__(
        self, num_entries: int, targets: torch.Tensor | None = None, replacement: bool = False
    ) -> None:
        super().__init__()
        if num_entries < 1:
            raise ValueError(f"a negative sampler needs at least one entry, got {num_entries}")
        self.num_entries = int(num_entries)
        self.by_class = targets is not None
        self.replacement = bool(replacement)
        # The fewest and the most entries an anchor may draw from (Python ints, read once here).
        self.fewest_allowed = self.most_allowed = self.num_entries
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
        hidden = targets < 0
        if bool(hidden.any()):
            # an entry whose label is hidden is a class of its own: any anchor may draw it, and its own
            # anchor excludes only itself
            pseudo = int(targets.max().clamp(min=-1)) + 1 + torch.arange(num_entries, device=targets.device)
            targets = torch.where(hidden, pseudo, targets)
        counts = torch.bincount(targets)
        present = counts[counts > 0]
        if len(present) < 2:
            raise ValueError("negatives from other classes need targets with at least two classes, got one")
        self.fewest_allowed = self.num_entries - int(present.max())
        self.most_allowed = self.num_entries - int(present.min())
        self.register_buffer("targets", targets, persistent=False)
        self.register_buffer("order", torch.argsort(targets, stable=True), persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts, persistent=False)

    def forward(
        self, index: torch.Tensor, num_negatives: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``[B, K]`` negatives for the anchors ``index`` (see the module docstring for the laws)."""
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
        if self.replacement or num_negatives > self.most_allowed:
            return self._with_replacement(index, num_negatives, generator)
        distinct = self._distinct(index, num_negatives, generator)
        if num_negatives <= self.fewest_allowed:
            return distinct
        # Some classes leave fewer than K entries: their anchors draw with replacement, as the authors'.
        short = self._allowed(index) < num_negatives
        return torch.where(
            short.unsqueeze(1), self._with_replacement(index, num_negatives, generator), distinct
        )

    def _with_replacement(
        self, index: torch.Tensor, k: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        shape = (index.shape[0], k)
        r = torch.randint(0, _WIDE, shape, device=index.device, generator=generator)
        return self._entries(index, r % self._allowed(index).unsqueeze(1))

    def _allowed(self, index: torch.Tensor) -> torch.Tensor:
        """``M``: how many entries each anchor may draw, ``[B]``."""
        if not self.by_class:
            return torch.full_like(index, self.num_entries)
        return self.num_entries - self.counts[self.targets[index]]

    def _entries(self, index: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Positions ``r`` ``[B, K]`` among each anchor's allowed entries -> bank indices: past the slice
        of the anchor's class in the class-sorted order (the identity for the uniform law)."""
        if not self.by_class:
            return r
        label = self.targets[index]
        own, start = self.counts[label].unsqueeze(1), self.starts[label].unsqueeze(1)
        return self.order[r + own * (r >= start)]

    def _distinct(self, index: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        if index.device.type == "cpu" and _FLOYD_RATIO * k <= self.num_entries:
            return self._floyd(index, k, generator)
        return self._smallest_keys(index, k, generator)

    def _floyd(self, index: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        """Floyd's algorithm on every anchor at once (see the module docstring)."""
        b = index.shape[0]
        allowed = self._allowed(index)
        taken = torch.zeros(b, self.num_entries, dtype=torch.bool, device=index.device)
        rows = torch.arange(b, device=index.device)
        out = torch.empty(b, k, dtype=torch.long, device=index.device)
        for i in range(k):
            # An anchor with fewer than k allowed entries draws with replacement instead: clamp.
            j = (allowed - k + i).clamp_min(0)
            t = torch.randint(0, _WIDE, (b,), device=index.device, generator=generator) % (j + 1)
            pick = torch.where(taken[rows, t], j, t)
            taken[rows, pick] = True
            out[:, i] = pick
        return self._entries(index, out)

    def _smallest_keys(self, index: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        """The ``k`` smallest of independent uniform keys per anchor; forbidden entries get ``_WIDE``."""
        rows = max(1, _BLOCK // self.num_entries)
        blocks = []
        for anchors in index.split(rows):
            keys = torch.randint(
                0, _WIDE, (anchors.shape[0], self.num_entries), device=index.device, generator=generator
            )
            if self.by_class:
                keys.masked_fill_(self.targets.unsqueeze(0) == self.targets[anchors].unsqueeze(1), _WIDE)
            blocks.append(keys.topk(k, dim=1, largest=False, sorted=False).indices)
        return torch.cat(blocks) if blocks else index.new_empty((0, k))

    def extra_repr(self) -> str:
        law = "other classes" if self.by_class else "uniform"
        return f"num_entries={self.num_entries}, law={law!r}, replacement={self.replacement}"
