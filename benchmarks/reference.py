"""The reference code paths: each loss as RepDistiller, torchdistill or the authors compute it.

Written out here from their formulas (no code is imported from them), only to be measured against
relkd in the same process. Where the reference computes the same value as relkd's form, the benchmark
says so; where its formula differs (KD-SVD's normalisation, torchdistill's CC reduction), the time of
the method is still comparable, the value is not.

* KD (RepDistiller ``distiller_zoo/KD.py``): ``kl_div`` of softened logits, summed, over the batch,
  times ``T^2``.
* RKD (RepDistiller ``distiller_zoo/RKD.py``; torchdistill's ``RKDLoss`` is the same code): ``pdist`` as
  the Gram expansion, ``clamp(eps).sqrt()``, the diagonal overwritten by index, ``d[d > 0].mean()``; the
  angle from the ``B x B x D`` difference tensor, normalised, and a batched ``B x B x B`` product.
* SP (RepDistiller ``distiller_zoo/SP.py``): ``F.normalize`` of both Gram matrices, the squared
  difference summed over ``B^2``.
* PKT (RepDistiller ``distiller_zoo/PKT.py``, the authors' code): rows divided by ``norm + eps``,
  NaN scrubbed by masked assignment, the cosine kernel mapped to ``[0, 1]``, rows normalised,
  ``mean(p_t log((p_t + eps) / (p_s + eps)))``.
* CC (torchdistill ``CCKDLoss``, Gaussian kernel): the Taylor kernel built row by row in a Python loop
  over the batch (``cc``), on unit embeddings as relkd's, reduced as relkd's (the mean square;
  torchdistill's ``torch.dist`` is the root of the sum); ``cc_vectorized`` is the same kernel as one
  power series over the whole matrix (``torch.pow``), the way a vectorised port writes it.
* CRD (RepDistiller ``crd/memory.py`` ``ContrastMemory`` and ``crd/criterion.py``): the ``1 + K`` bank
  rows of every anchor gathered into ``B x (1 + K) x 128``, scored with ``bmm``, the ratio-form NCE;
  in training, both banks updated in place with ``index_copy_``.
* HKD (the authors' ``distiller_zoo/GNN.py``): each network's ``K`` negatives gathered into
  ``B x K x 128`` and scored with ``bmm`` for the individual and the graph anchors.
* KD-SVD (RepDistiller ``distiller_zoo/KDSVD.py``): ``torch.svd`` of each ``HW x C`` map, NaN scrubbed,
  ``F.normalize`` of the leading vectors and values, sign alignment by the largest ``|cos|``, the RBF
  graph between consecutive layers, summed over the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "kd",
    "rkd_distance",
    "rkd_angle",
    "rkd",
    "sp",
    "pkt",
    "cc",
    "cc_vectorized",
    "crd_gather",
    "crd_update",
    "hkd_gather",
    "kd_svd",
]


def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    p_t = F.softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * T**2 / student_logits.shape[0]


def _pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps).sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    student, teacher = student.flatten(1), teacher.flatten(1)
    with torch.no_grad():
        t_d = _pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = _pdist(student)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d)


def _angles(x: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).view(-1)


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    student, teacher = student.flatten(1), teacher.flatten(1)
    with torch.no_grad():
        t = _angles(teacher)
    return F.smooth_l1_loss(_angles(student), t)


def rkd(
    student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> torch.Tensor:
    return distance_weight * rkd_distance(student, teacher) + angle_weight * rkd_angle(student, teacher)


def sp(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    b = student.shape[0]
    f_s, f_t = student.view(b, -1), teacher.view(b, -1)
    g_s = F.normalize(torch.mm(f_s, torch.t(f_s)))
    g_t = F.normalize(torch.mm(f_t, torch.t(f_t)))
    diff = g_t - g_s
    return (diff * diff).view(-1, 1).sum(0)[0] / (b * b)


def _conditional(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)
    x[x != x] = 0
    k = (torch.mm(x, x.transpose(0, 1)) + 1.0) / 2.0
    return k / torch.sum(k, dim=1, keepdim=True)


def pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    p_s, p_t = _conditional(student.flatten(1), eps), _conditional(teacher.flatten(1), eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


def _rbf_rows(f: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    rows = []
    for row in f:
        value = 1
        right = torch.matmul(row, torch.t(f))
        for p in range(1, order + 1):
            value = value + (2 * gamma) ** p / math.factorial(p) * right**p
        rows.append(value * math.exp(-2 * gamma))
    return torch.stack(rows)


def cc(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    k_s = _rbf_rows(F.normalize(student.flatten(1)), gamma, order)
    k_t = _rbf_rows(F.normalize(teacher.flatten(1)), gamma, order)
    return (k_s - k_t).pow(2).mean()


def _rbf_series(f: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    sim = f @ f.t()
    out = torch.zeros_like(sim)
    for p in range(order + 1):
        out += math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * torch.pow(sim, p)
    return out


def cc_vectorized(
    student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4, order: int = 2
) -> torch.Tensor:
    k_s = _rbf_series(F.normalize(student.flatten(1)), gamma, order)
    k_t = _rbf_series(F.normalize(teacher.flatten(1)), gamma, order)
    return F.mse_loss(k_s, k_t)


def _nce_ratio(out: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    b, m = out.shape[0], out.shape[1] - 1
    noise = 1 / float(num_data)
    p_pos = out.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * noise + eps)).log_()
    p_neg = out.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * noise), p_neg.add(m * noise + eps)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0))[0] / b


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
    """CRD's score rows and loss with the ``1 + K`` bank rows of every anchor gathered.

    ``normalizer`` is ``(Z_s, Z_t)``; ``None`` estimates both from this batch (the first step).
    """
    b, d = student.shape
    rows = torch.cat([index.unsqueeze(1), negatives], dim=1)
    w_t = torch.index_select(teacher_bank, 0, rows.view(-1)).detach().view(b, -1, d)
    out_s = torch.exp(torch.div(torch.bmm(w_t, student.view(b, d, 1)), temperature)).squeeze(2)
    w_s = torch.index_select(student_bank, 0, rows.view(-1)).detach().view(b, -1, d)
    out_t = torch.exp(torch.div(torch.bmm(w_s, teacher.view(b, d, 1)), temperature)).squeeze(2)
    if normalizer is None:
        normalizer = torch.stack([out_s.detach().mean(), out_t.detach().mean()]) * num_data
    return _nce_ratio(out_s / normalizer[0], num_data) + _nce_ratio(out_t / normalizer[1], num_data)


@torch.no_grad()
def crd_update(bank: torch.Tensor, index: torch.Tensor, x: torch.Tensor, momentum: float = 0.5) -> None:
    """RepDistiller's in-place bank update: ``index_copy_`` of the normalised momentum average."""
    pos = torch.index_select(bank, 0, index.view(-1))
    pos.mul_(momentum)
    pos.add_(torch.mul(x, 1 - momentum))
    bank.index_copy_(0, index, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))


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


def _removenan(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _svd(feat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = feat.shape
    x = feat.view(-1, size[1], size[2] * size[2]).transpose(-2, -1)
    _, s, v = torch.svd(x)
    s, v = _removenan(s), _removenan(v)
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def _align(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cosine = torch.matmul(a.transpose(-2, -1), b)
    max_abs, _ = torch.max(torch.abs(cosine), 1, keepdim=True)
    mask = torch.where(torch.eq(max_abs, torch.abs(cosine)), torch.sign(cosine), torch.zeros_like(cosine))
    return torch.matmul(a, mask)


def kd_svd(student: list[torch.Tensor], teacher: list[torch.Tensor], k: int = 1) -> torch.Tensor:
    """RepDistiller's KD-SVD summed over the consecutive layer pairs (each pair over the batch)."""
    v_sb = v_tb = None
    total = 0.0
    for i, (f_s, f_t) in enumerate(zip(student, teacher, strict=True)):
        s_t, v_t = _svd(f_t, k)
        _, v_s = _svd(f_s, k + 3)
        v_s = _align(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        v_t, v_s = v_t * s_t, v_s * s_t
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            l2 = (s_rbf - t_rbf.detach()).pow(2)
            total = total + torch.where(torch.isfinite(l2), l2, torch.zeros_like(l2)).sum()
        v_tb, v_sb = v_t, v_s
    return total / student[0].shape[0]
