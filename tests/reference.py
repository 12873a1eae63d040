"""Independent float64 reference formulas, written the textbook way (difference tensors, loops).

They share no code with relkd: tests compare the package against these.
"""

from __future__ import annotations

import math

import torch


def huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a - b).abs()
    return torch.where(d < 1.0, 0.5 * d**2, d - 0.5)


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    diff = x[:, None, :] - x[None, :, :]
    sq = diff.pow(2).sum(-1)
    eye = torch.eye(x.shape[0], dtype=torch.bool)
    return torch.where(eye, 0.0, torch.where(eye, 1.0, sq).sqrt())


def rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    def potential(x):
        d = pairwise_distance(x)
        return d / d[d > 0].mean()

    return huber(potential(s), potential(t)).mean()


def triplet_cosines(x: torch.Tensor) -> torch.Tensor:
    """cos of the angle at i between x_j - x_i and x_k - x_i; zero vectors give 0."""
    e = x[None, :, :] - x[:, None, :]  # e[i, j] = x_j - x_i
    n = e.norm(dim=-1, keepdim=True)
    e = torch.where(n > 0, e / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(e))
    return torch.einsum("ijd,ikd->ijk", e, e)


def rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return huber(triplet_cosines(s), triplet_cosines(t)).mean()


def sp(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    b = s.shape[0]

    def g(x):
        m = x @ x.T
        return m / m.norm(dim=1, keepdim=True)

    return ((g(s) - g(t)) ** 2).sum() / b**2


def cc(s: torch.Tensor, t: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    b = s.shape[0]

    def k(x):
        f = x / x.norm(dim=1, keepdim=True)
        dot = f @ f.T
        return sum(
            math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot**p for p in range(order + 1)
        )

    return ((k(s) - k(t)) ** 2).sum() / b**2


def cc_chain(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's CC: mean over pairs (i, i + 1) of sum_d |s_i - t_i| |s_{i+1} - t_{i+1}|."""
    total = 0.0
    for i in range(s.shape[0] - 1):
        for d in range(s.shape[1]):
            total = total + (s[i, d] - t[i, d]).abs() * (s[i + 1, d] - t[i + 1, d]).abs()
    return total / (s.shape[0] - 1)


def pkt(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    def p(x):
        f = x / x.norm(dim=1, keepdim=True)
        k = (f @ f.T + 1) / 2
        return k / k.sum(1, keepdim=True)

    ps, pt = p(s), p(t)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def kd(s: torch.Tensor, t: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    total = 0.0
    for b in range(s.shape[0]):
        ps = torch.softmax(s[b] / T, 0)
        pt = torch.softmax(t[b] / T, 0)
        total = total + (pt * (pt.log() - ps.log())).sum()
    return T * T * total / s.shape[0]
