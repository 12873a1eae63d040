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
