r"""Contrastive objectives against a memory bank, shared by CRD and HKD.

An anchor ``a`` (an L2-normalised embedding) is scored against one positive ``p`` and ``K`` negatives
``v_{n_1}, ..., v_{n_K}`` read from a bank: the score row is
``s = [a . p, a . v_{n_1}, ..., a . v_{n_K}]``.

InfoNCE (Oord et al., "Representation Learning with Contrastive Predictive Coding", 2018), as in HKD:

.. math::
    \ell_{\text{InfoNCE}} = -\log \frac{e^{s_0 / \tau}}{\sum_{k=0}^{K} e^{s_k / \tau}}

NCE with noise prior ``P_n = 1 / N`` (Tian et al., "Contrastive Representation Distillation", ICLR
2020, Eq. 18), with ``P_k = e^{s_k / \tau} / Z`` and ``Z`` a normaliser fixed on the first batch:

.. math::
    \ell_{\text{NCE}} = -\log \frac{P_0}{P_0 + K P_n + \epsilon}
    - \sum_{k=1}^{K} \log \frac{K P_n}{P_k + K P_n + \epsilon}, \qquad
    Z = N \cdot \operatorname{mean}_{b,k} e^{s_{bk} / \tau}

Both are averaged over the batch. The negatives are scored with one matrix product against the whole
bank followed by a gather, which gives the same values as gathering ``[B, K, D]`` bank rows first at a
fraction of the memory (``B x N`` scores instead of ``B x K x D`` copies).

:func:`contrast_loss` forms the anchors' gradient in the forward pass, from the bank as it is then
(``dL/da = delta_0 p + sum_k delta_k v_{n_k}``, ``delta`` the loss's derivative in the scores): the
backward reads no bank, so the banks may be updated in place (``index_copy_``) before it runs, with
no ``N x D`` copy per step.

Shapes:
    anchor ``[..., B, D]``, positive ``[..., B, D]``, bank ``[N, D]``, negatives ``[B, K]`` (int64)
    -> scores ``[..., B, 1 + K]`` -> scalar loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "bank_scores",
    "contrast_scores",
    "contrast_loss",
    "info_nce",
    "nce_normalizer",
    "nce_loss",
    "Embed",
]


def bank_scores(anchor: torch.Tensor, bank: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """``a_b . v_{n_{bk}}`` as ``[..., B, K]``, by the cheaper of two exact forms.

    With ``B * K >= N`` (CRD's K = 16384 on CIFAR's N = 50,000): one product ``[..., B, D] x [D, N]``,
    then a gather of the sampled entries, so no ``B x K x D`` tensor exists. With few negatives
    against a large bank (``B * K < N``), gathering the ``K`` rows costs less than scoring all ``N``.
    The bank is a constant: no gradient flows into it.
    """
    bank = bank.detach().to(anchor.dtype)
    if negatives.shape[-2] * negatives.shape[-1] < bank.shape[0]:
        rows = bank[negatives]
        return (anchor.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)
    full = anchor @ bank.transpose(0, 1)
    return full.gather(-1, negatives.expand(*full.shape[:-1], negatives.shape[-1]))


def contrast_scores(
    anchor: torch.Tensor, positive: torch.Tensor, bank: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """The score row ``[a . p, a . v_{n_1}, ..., a . v_{n_K}]`` per anchor, ``[..., B, 1 + K]``."""
    pos = (anchor * positive.detach().to(anchor.dtype)).sum(-1, keepdim=True)
    return torch.cat([pos, bank_scores(anchor, bank, negatives)], dim=-1)


def info_nce(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of score rows whose column 0 is the positive: cross-entropy with label 0, batch mean."""
    logits = scores.reshape(-1, scores.shape[-1]) / temperature
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long))


def nce_normalizer(scores: torch.Tensor, num_data: int, temperature: float) -> torch.Tensor:
    """CRD's ``Z = N * mean(exp(s / tau))`` over every score of the batch, detached (a scalar)."""
    return (scores.detach() / temperature).exp().mean() * num_data


def nce_loss(
    scores: torch.Tensor,
    normalizer: torch.Tensor,
    num_data: int,
    temperature: float,
    eps: float = 1e-7,
) -> torch.Tensor:
    """CRD's NCE loss of score rows ``[B, 1 + K]`` (column 0 the positive), summed over ``K`` and
    averaged over the batch; computed in log space, equal to the authors' ratio form."""
    k = scores.shape[-1] - 1
    log_p = scores / temperature - normalizer.log()
    log_noise = math.log(k / num_data)
    log_denominator = torch.logaddexp(log_p, log_p.new_tensor(math.log(k / num_data + eps)))
    log_d = torch.cat([log_p[..., :1], log_p.new_full(log_p[..., 1:].shape, log_noise)], -1)
    return -(log_d - log_denominator).sum(-1).mean()


def _info_nce_grad(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``d info_nce / d scores``, blocks of rows summed: ``(softmax(s / tau) - e_0) / (B tau)``."""
    delta = (scores / temperature).softmax(-1)
    delta[..., 0] -= 1.0
    return delta.div_(scores.shape[-2] * temperature)


def _nce_grad(scores: torch.Tensor, normalizer: torch.Tensor, num_data: int, temperature: float, eps: float):
    """``d nce_loss / d scores``: ``(sigmoid(log P - log(K / N + eps)) - e_0) / (R tau)`` over ``R`` rows."""
    k = scores.shape[-1] - 1
    delta = (scores / temperature - normalizer.log() - math.log(k / num_data + eps)).sigmoid_()
    delta[..., 0] -= 1.0
    return delta.div_(scores[..., 0].numel() * temperature)


def _value(scores: torch.Tensor, objective: str, temperature: float, normalizer, num_data: int, eps: float):
    if objective == "nce":
        return nce_loss(scores, normalizer, num_data, temperature, eps)
    return sum(info_nce(block, temperature) for block in scores.reshape(-1, *scores.shape[-2:]))


def _derivative(
    scores: torch.Tensor, objective: str, temperature: float, normalizer, num_data: int, eps: float
):
    if objective == "nce":
        return _nce_grad(scores, normalizer, num_data, temperature, eps)
    return _info_nce_grad(scores, temperature)


class _BankContrast(torch.autograd.Function):
    """A contrastive loss of score rows with the anchors' gradient formed in the forward pass."""

    @staticmethod
    def forward(
        ctx, anchor, scores, positive, bank, negatives, objective, temperature, normalizer, num_data, eps
    ):
        value = _value(scores, objective, temperature, normalizer, num_data, eps)
        delta = _derivative(scores, objective, temperature, normalizer, num_data, eps)
        grad = delta[..., :1] * positive.to(delta.dtype)
        neg = delta[..., 1:]
        bank = bank.to(delta.dtype)
        if negatives.shape[-2] * negatives.shape[-1] < bank.shape[0]:
            grad += (neg.unsqueeze(-2) @ bank[negatives]).squeeze(-2)
        else:
            spread = neg.new_zeros(*neg.shape[:-1], bank.shape[0])
            spread.scatter_add_(-1, negatives.expand(*neg.shape[:-1], negatives.shape[-1]), neg)
            grad += spread @ bank
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        (grad,) = ctx.saved_tensors
        return grad * grad_value, *(None,) * 9


def contrast_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    bank: torch.Tensor,
    negatives: torch.Tensor,
    objective: str,
    temperature: float,
    normalizer: torch.Tensor | None = None,
    num_data: int = 0,
    eps: float = 1e-7,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`info_nce` (``objective="info_nce"``; summed over leading blocks of anchors) or
    :func:`nce_loss` (``"nce"``, with ``normalizer``, ``num_data``, ``eps``) of the anchors' score rows
    against ``bank``, whose backward reads neither the bank nor the scores: the anchors' gradient is formed
    here, so the bank may change in place before the backward runs.

    ``scores``: the rows of :func:`contrast_scores` when the caller has them (e.g. to estimate CRD's
    normaliser first); they are computed otherwise. The positive and the bank are constants.
    """
    if scores is None:
        with torch.no_grad():
            scores = contrast_scores(anchor, positive, bank, negatives)
    scores = scores.detach()
    args = (objective, temperature, normalizer, num_data, eps)
    if torch.is_grad_enabled() and anchor.requires_grad:
        return _BankContrast.apply(anchor, scores, positive.detach(), bank.detach(), negatives, *args)
    return _value(scores, *args)


class Embed(nn.Module):
    """Projection head ``e = W f / ||W f||`` (a linear layer, then L2 normalisation).

    Trainable: as a submodule of a loss, its parameters are in ``loss.parameters()`` and must be
    optimised with the student. ``[B, ...]`` inputs are flattened to ``[B, in_dim]``.

    Shapes:
        ``[B, in_dim]`` or ``[B, ...]`` with ``in_dim`` elements per sample -> ``[B, out_dim]``.
    """

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.linear.in_features:
            raise ValueError(
                f"expected features with {self.linear.in_features} values per sample, got "
                f"{x.shape[1]}; pass the width of the tapped feature as student_dim / teacher_dim"
            )
        return F.normalize(self.linear(x.to(self.linear.weight.dtype)), dim=-1)
