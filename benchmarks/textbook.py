"""Baselines: every loss written the plain way, as the authors' code and the common frameworks write it.

These are what a user would otherwise run, kept here only to be measured against relkd. Each one
computes the same value as the relkd form of the same formula (``benchmarks.banks`` and the tests check
the contrastive ones to 1e-6 in float64); what differs is how:

* RKD angle (Park et al., CVPR 2019; the authors' code): the ``B x B x D`` difference tensor,
  normalised, and a batched ``B x B x B`` product of it. The distance term uses the authors' ``pdist``
  (Gram expansion, ``clamp(eps).sqrt()``, the diagonal overwritten by index).
* SP, CC, PKT: one Gram matrix per side and the textbook chain of elementwise ops; CC's kernel as a
  power series with ``torch.pow``; PKT with the authors' ``norm + eps`` and NaN scrubbing.
* CRD (Tian et al., ICLR 2020; RepDistiller's ``ContrastMemory``): the ``1 + K`` bank rows of every
  anchor gathered into a ``B x (1 + K) x 128`` tensor, scored with ``bmm``, NCE in the ratio form.
* HKD (Zhou et al., ICCV 2021; the authors' ``GNN.py``): the ``K`` negative rows gathered once per
  network into ``B x K x 128`` and scored with ``bmm`` for the individual and the graph anchors.

Shapes follow the relkd functional forms of the same name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["kd", "rkd_distance", "rkd_angle", "rkd", "sp", "cc", "pkt", "crd_gather", "hkd_gather"]


def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton KD as ``F.kl_div`` on softened logits, summed and divided by the batch, times ``T^2``."""
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    p_t = F.softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * T**2 / student_logits.shape[0]


def _pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
    d[range(len(e)), range(len(e))] = 0
    return d


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance: Huber between ``d / mean(d > 0)`` matrices."""
    with torch.no_grad():
        t = _pdist(teacher.flatten(1))
        t = t / t[t > 0].mean()
    s = _pdist(student.flatten(1))
    return F.smooth_l1_loss(s / s[s > 0].mean(), t)


def _angles(x: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).view(-1)


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle: Huber between the ``B^3`` cosines of normalised ``B x B x D`` differences."""
    with torch.no_grad():
        t = _angles(teacher.flatten(1))
    return F.smooth_l1_loss(_angles(student.flatten(1)), t)


def rkd(
    student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 1.0, angle_weight: float = 2.0
) -> torch.Tensor:
    """``distance_weight * rkd_distance + angle_weight * rkd_angle``."""
    return distance_weight * rkd_distance(student, teacher) + angle_weight * rkd_angle(student, teacher)


def sp(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SP: squared Frobenius distance of the row-normalised Gram matrices over ``B^2``."""
    b = student.shape[0]
    g_s = F.normalize(student.flatten(1) @ student.flatten(1).t())
    g_t = F.normalize(teacher.flatten(1) @ teacher.flatten(1).t())
    diff = g_t - g_s
    return (diff * diff).view(-1, 1).sum(0)[0] / (b * b)


def _taylor_rbf(x: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    f = F.normalize(x.flatten(1), p=2, dim=-1)
    sim = f @ f.t()
    out = torch.zeros_like(sim)
    for p in range(order + 1):
        out += math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * torch.pow(sim, p)
    return out


def cc(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """CC: MSE between P-order Taylor RBF kernels of the unit embeddings."""
    return F.mse_loss(_taylor_rbf(student, gamma, order), _taylor_rbf(teacher, gamma, order))


def _conditional(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.flatten(1)
    x = x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)
    x = torch.where(x != x, torch.zeros_like(x), x)
    k = (x @ x.t() + 1.0) / 2.0
    return k / torch.sum(k, dim=1, keepdim=True)


def pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT: KL-style divergence of cosine-kernel conditional probabilities, mean over ``B^2``."""
    p_s, p_t = _conditional(student, eps), _conditional(teacher, eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


def _nce_ratio(out: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """RepDistiller's ContrastLoss on ``P = exp(s / tau) / Z`` rows ``[B, 1 + K]``."""
    b, k = out.shape[0], out.shape[1] - 1
    m_pn = k / num_data
    log_d1 = torch.log(out[:, 0] / (out[:, 0] + m_pn + eps))
    log_d0 = torch.log(torch.full_like(out[:, 1:], m_pn) / (out[:, 1:] + m_pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / b


def crd_gather(
    student: torch.Tensor,
    teacher: torch.Tensor,
    index: torch.Tensor,
    student_bank: torch.Tensor,
    teacher_bank: torch.Tensor,
    negatives: torch.Tensor,
    num_data: int,
    normalizer: torch.Tensor | None = None,
    temperature: float = 0.07,
) -> torch.Tensor:
    """CRD with the ``1 + K`` rows of every anchor gathered from the other network's bank.

    ``normalizer`` is ``(Z_s, Z_t)``; ``None`` estimates both from this batch (the first step).
    """
    b, d = student.shape
    rows = torch.cat([index.unsqueeze(1), negatives], dim=1)
    w_t = torch.index_select(teacher_bank, 0, rows.view(-1)).detach().view(b, -1, d)
    out_s = torch.exp(torch.bmm(w_t, student.view(b, d, 1)).squeeze(2) / temperature)
    w_s = torch.index_select(student_bank, 0, rows.view(-1)).detach().view(b, -1, d)
    out_t = torch.exp(torch.bmm(w_s, teacher.view(b, d, 1)).squeeze(2) / temperature)
    if normalizer is None:
        normalizer = torch.stack([out_s.detach().mean(), out_t.detach().mean()]) * num_data
    return _nce_ratio(out_s / normalizer[0], num_data) + _nce_ratio(out_t / normalizer[1], num_data)


def _info_nce(anchor: torch.Tensor, positive: torch.Tensor, weight: torch.Tensor, tau: float) -> torch.Tensor:
    b, d = anchor.shape
    pos = torch.einsum("nc,nc->n", positive, anchor).unsqueeze(-1)
    neg = torch.bmm(weight, anchor.view(b, d, 1)).squeeze(2)
    logits = torch.cat([pos, neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=anchor.device))


def hkd_gather(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_bank: torch.Tensor,
    teacher_bank: torch.Tensor,
    index: torch.Tensor,
    negatives: torch.Tensor,
    student_graph: torch.Tensor,
    teacher_graph: torch.Tensor,
    temperature: float = 0.07,
    smooth: float = 0.75,
) -> torch.Tensor:
    """HKD's four InfoNCE terms with each network's ``K`` negatives gathered from its own bank."""
    b, d = student.shape
    w_s = torch.index_select(student_bank, 0, negatives.view(-1)).detach().view(b, -1, d)
    w_t = torch.index_select(teacher_bank, 0, negatives.view(-1)).detach().view(b, -1, d)
    pos_s, pos_t = teacher_bank[index].detach(), student_bank[index].detach()
    with torch.no_grad():
        gpos_s = F.normalize(smooth * pos_s + (1 - smooth) * teacher_graph, dim=1)
        gpos_t = F.normalize(smooth * pos_t + (1 - smooth) * student_graph, dim=1)
    return (
        _info_nce(student, pos_s, w_s, temperature)
        + _info_nce(teacher, pos_t, w_t, temperature)
        + _info_nce(student_graph, gpos_s, w_s, temperature)
        + _info_nce(teacher_graph, gpos_t, w_t, temperature)
    )
