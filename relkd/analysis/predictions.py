r"""Do two networks predict alike? Top-k agreement, KL between their predictions, shared mistakes.

* Top-k agreement (as big_vision's distillation ``distance`` evaluator, ``kind="agree"``): the fraction
  of instances whose *reference* top-1 class is among the other network's top ``k``; top-1 agreement
  is the fraction of equal predictions.
* KL: :math:`\tau^2 \frac1N \sum_n \mathrm{KL}(p^\tau_{\mathrm{ref}} \,\|\, p^\tau)`, in nats, with
  :math:`p^\tau = \mathrm{softmax}(z / \tau)` (the KD loss's form; ``T=1`` by default).
* Mistakes (Neyshabur, Sedghi & Zhang, "What is being transferred in transfer learning?", NeurIPS
  2020, Section 3.3): on labelled instances, both right, only one right ("uncommon mistakes" of the
  other), both wrong ("common mistakes"), split by whether the two wrong predictions agree.

Shapes:
    logits ``[N, C]``, reference ``[N, C]``, targets ``[N]`` (``-1`` = unlabelled, left out).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relkd.analysis._batches import device_of, evaluating, unpack

__all__ = ["Mistakes", "error_rate", "mistakes", "predict", "prediction_kl", "topk_agreement"]


def _check(name: str, logits: Tensor, reference: Tensor) -> None:
    if logits.dim() != 2 or logits.shape != reference.shape:
        raise ValueError(
            f"{name}: expected two [N, C] logit tensors of the same shape, got {tuple(logits.shape)} and "
            f"{tuple(reference.shape)}"
        )


def topk_agreement(logits: Tensor, reference: Tensor, k: int = 1) -> float:
    """Fraction of instances whose ``reference`` top-1 class is among ``logits``' top ``k``."""
    _check("topk_agreement", logits, reference)
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"topk_agreement: k must be between 1 and the {logits.shape[1]} classes, got {k}")
    top = logits.topk(k, dim=1).indices
    return float((top == reference.argmax(1, keepdim=True)).any(1).double().mean())


def prediction_kl(logits: Tensor, reference: Tensor, T: float = 1.0) -> float:
    """``T^2 * mean_n KL(softmax(reference / T) || softmax(logits / T))``, nats per instance."""
    _check("prediction_kl", logits, reference)
    log_p = F.log_softmax(reference.double() / T, dim=1)
    log_q = F.log_softmax(logits.double() / T, dim=1)
    return float(T * T * (log_p.exp() * (log_p - log_q)).sum(1).mean())


def error_rate(logits: Tensor, targets: Tensor) -> float:
    """Fraction of labelled instances (``target >= 0``) whose top-1 class is wrong."""
    labelled = targets >= 0
    if not labelled.any():
        raise ValueError("error_rate: no labelled instance (every target is -1)")
    return float((logits.argmax(1) != targets)[labelled].double().mean())


@dataclass(frozen=True)
class Mistakes:
    """Counts of labelled instances by who is right (``a`` and ``b`` are the two networks).

    ``common_mistakes = same_mistake + different_mistake``; ``uncommon mistakes`` of ``a`` are
    ``only_b_correct`` and of ``b`` ``only_a_correct``.
    """

    both_correct: int
    only_a_correct: int
    only_b_correct: int
    same_mistake: int
    different_mistake: int

    @property
    def total(self) -> int:
        return self.both_correct + self.only_a_correct + self.only_b_correct + self.common_mistakes

    @property
    def common_mistakes(self) -> int:
        return self.same_mistake + self.different_mistake

    def fractions(self) -> dict[str, float]:
        """Each count over :attr:`total`."""
        return {k: v / self.total for k, v in asdict(self).items()}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "common_mistakes": self.common_mistakes, "total": self.total}


def mistakes(logits_a: Tensor, logits_b: Tensor, targets: Tensor) -> Mistakes:
    """The common / uncommon mistakes table of two networks on the labelled instances."""
    _check("mistakes", logits_a, logits_b)
    if targets.shape != logits_a.shape[:1]:
        raise ValueError(
            f"mistakes: expected one target per instance ({logits_a.shape[0]}), got {tuple(targets.shape)}"
        )
    keep = targets >= 0
    pa, pb, y = logits_a.argmax(1)[keep], logits_b.argmax(1)[keep], targets[keep]
    ra, rb = pa == y, pb == y
    wrong = ~ra & ~rb
    return Mistakes(
        both_correct=int((ra & rb).sum()),
        only_a_correct=int((ra & ~rb).sum()),
        only_b_correct=int((~ra & rb).sum()),
        same_mistake=int((wrong & (pa == pb)).sum()),
        different_mistake=int((wrong & (pa != pb)).sum()),
    )


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[Any]) -> tuple[Tensor, Tensor]:
    """Logits ``[N, C]`` (float32, CPU) and targets ``[N]`` (``-1`` where a batch has none) of
    ``model`` in eval mode over ``loader``."""
    device = device_of(model)
    logits, targets = [], []
    with evaluating(model):
        for batch in loader:
            x, y = unpack(batch)
            out = model(x.to(device)).float().cpu()
            logits.append(out)
            targets.append(y.cpu() if y is not None else torch.full((out.shape[0],), -1, dtype=torch.long))
    if not logits:
        raise ValueError("predict: the loader yielded no batch")
    return torch.cat(logits), torch.cat(targets)
