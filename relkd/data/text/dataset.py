r"""``TokenDataset``: tokenised texts held as tensors, with their padding and masking weights.

Item ``i``: ``{"input": int64 [L] ids (right-padded), "target": int64 [], "index": int64 [],
"mask_weight": float32 [L], **extras}``. ``index`` is the position in the full training set (or test
set), stable across subsets, as for images; ``target`` is ``-1`` for unlabelled text. The padding mask
is ``input != pad_id`` (networks derive it; :class:`relkd.models.text.TextTransformer` taps it as
``mask``). ``mask_weight`` is each token's weight in masked-LM sampling (DistilBERT, Sanh et al. 2019;
XLM, Lample & Conneau 2019):

.. math::
    w(v) = \max(c_v, 1)^{-0.7}, \qquad w = 0 \text{ for special tokens and padding},

with :math:`c_v` the count of token :math:`v` in the training texts (``mlm_smoothing`` 0.7 of the
DistilBERT code's ``train.py``), so rare tokens are masked more often than their frequency says. A
dataset also carries extra aligned tensors (``pair``: the ids of a translation) in the same item.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from relkd.data.bundle import DataBundle

__all__ = ["MLM_SMOOTHING", "TokenDataset", "cloze_test", "mask_weights", "text_bundle", "token_weights"]

MLM_SMOOTHING = 0.7


def token_weights(
    ids: Tensor, vocab_size: int, specials: Sequence[int], smoothing: float = MLM_SMOOTHING
) -> Tensor:
    """``[V]`` masking weights ``max(count, 1) ** -smoothing`` from the ids ``[N, L]`` of a training
    set, 0 for the special tokens."""
    counts = torch.bincount(ids.flatten(), minlength=vocab_size)[:vocab_size].double()
    weights = counts.clamp(min=1.0).pow(-smoothing)
    weights[torch.tensor(list(specials), dtype=torch.long)] = 0.0
    return weights.float()


def mask_weights(ids: Tensor, weights: Tensor) -> Tensor:
    """Each position's masking weight: ``weights[ids]``, ``[N, L]``."""
    return weights[ids]


def cloze_test(ids: Tensor, weight: Tensor, mask_token_id: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """One masked token per row, drawn with probabilities proportional to ``weight`` (seeded):
    ``(ids with that token replaced by mask_token_id, the original token)``. Rows without a
    maskable token keep their ids and get target ``-1``."""
    generator = torch.Generator().manual_seed(seed)
    has = weight.sum(1) > 0
    safe = torch.where(has[:, None], weight, torch.ones_like(weight))
    position = torch.multinomial(safe.double(), 1, generator=generator).squeeze(1)
    rows = torch.arange(ids.shape[0])
    target = torch.where(has, ids[rows, position], torch.full_like(position, -1))
    masked = ids.clone()
    masked[rows[has], position[has]] = mask_token_id
    return masked, target


class TokenDataset(Dataset):
    """Token ids, labels, indices and per-token masking weights as tensors (see the module docstring).

    Args:
        ids: ``[N, L]`` int64 token ids, right-padded.
        targets: ``[N]`` int64 labels (``-1`` unlabelled).
        weights: ``[N, L]`` masking weights.
        indices: ``[N]`` positions in the full set (default ``arange(N)``).
        extras: other ``[N, ...]`` tensors served in each item under their key.
        augment: kept for the loaders' interface; text is not augmented.
    """

    def __init__(
        self,
        ids: Tensor,
        targets: Tensor,
        weights: Tensor,
        indices: Tensor | None = None,
        extras: Mapping[str, Tensor] | None = None,
        augment: bool = False,
    ) -> None:
        n = ids.shape[0]
        if ids.dim() != 2 or weights.shape != ids.shape:
            raise ValueError(
                f"expected ids and weights of shape [N, L], got {tuple(ids.shape)} and {tuple(weights.shape)}"
            )
        indices = torch.arange(n) if indices is None else indices
        if targets.shape != (n,) or indices.shape != (n,):
            raise ValueError(
                f"expected {n} targets and {n} indices, got {tuple(targets.shape)} and {tuple(indices.shape)}"
            )
        for key, value in (extras or {}).items():
            if value.shape[0] != n:
                raise ValueError(f"extra {key!r} has {value.shape[0]} rows, expected {n}")
        self.ids, self.targets, self.weights = ids.long(), targets.long(), weights.float()
        self.indices = indices.long()
        self.extras = dict(extras or {})
        self.augment = augment

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"input": self.ids[i], "target": self.targets[i], "index": self.indices[i]}
        item["mask_weight"] = self.weights[i]
        item.update({k: v[i] for k, v in self.extras.items()})
        return item

    def subset(self, positions: Tensor, hide_labels: bool = False) -> TokenDataset:
        """The items at ``positions``, keeping their indices; ``hide_labels`` sets targets to -1."""
        out = copy.copy(self)
        out.ids, out.weights, out.indices = (
            self.ids[positions],
            self.weights[positions],
            self.indices[positions],
        )
        out.targets = torch.full_like(out.indices, -1) if hide_labels else self.targets[positions]
        out.extras = {k: v[positions] for k, v in self.extras.items()}
        return out

    def with_augment(self, augment: bool) -> TokenDataset:
        """The same dataset (text has no augmentation); for the loaders' interface."""
        out = copy.copy(self)
        out.augment = augment
        return out

    def __repr__(self) -> str:
        return f"TokenDataset(n={len(self)}, length={self.ids.shape[1]}, extras={sorted(self.extras)})"


def text_bundle(
    name: str, train: TokenDataset, test: TokenDataset, num_classes: int, classes: Sequence[str] = ()
) -> DataBundle:
    """A ``DataBundle`` of two token datasets.

    A sequence is described as a one-channel ``1 x L`` image of ids (``in_channels`` 1, ``image_size``
    ``(1, L)``, mean 0 and std 1), so that code sizing inputs by those fields builds ``[B, 1, 1, L]``
    tensors, which text networks read as ``[B, L]``.
    """
    return DataBundle(
        name=name,
        train=train,
        test=test,
        num_classes=int(num_classes),
        in_channels=1,
        image_size=(1, int(train.ids.shape[1])),
        train_targets=train.targets.clone(),
        mean=(0.0,),
        std=(1.0,),
        classes=tuple(classes),
    )
