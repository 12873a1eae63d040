"""Pairwise relations derived from one Gram matrix.

Every function here takes a Gram matrix ``G = X X^T`` (shape ``[..., N, N]``) or quantities derived from
it, so a graph pays for one matrix product however many relations a training step asks for.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = [
    "compute_dtype",
    "full_precision",
    "gram",
    "sq_distance_from_gram",
    "distance_tolerance",
    "distance_from_sq",
    "inv_or_zero",
    "cosine_from_gram",
    "rbf_taylor_from_gram",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype relations are computed in: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast so that relations stay in float32 even inside an autocast region."""
    return torch.autocast(device_type=device.type, enabled=False)


def gram(x: torch.Tensor) -> torch.Tensor:
    """``G = X X^T`` for ``x`` of shape ``[..., N, D]``, in :func:`compute_dtype`."""
    x = x.to(compute_dtype(x.dtype))
    with full_precision(x.device):
        return x @ x.transpose(-1, -2)


def _diag(g: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(g, dim1=-2, dim2=-1)


def sq_distance_from_gram(g: torch.Tensor) -> torch.Tensor:
    """``||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij``, clamped at 0, with an exactly zero diagonal."""
    n = _diag(g)
    sq = (n.unsqueeze(-1) + n.unsqueeze(-2) - 2.0 * g).clamp_min(0.0)
    eye = torch.eye(g.shape[-1], dtype=torch.bool, device=g.device)
    return sq.masked_fill(eye, 0.0)


def distance_tolerance(g: torch.Tensor) -> torch.Tensor:
    """Squared distances below this are rounding noise of the Gram form, not geometry.

    ``G_ii + G_jj - 2 G_ij`` loses about ``eps * (G_ii + G_jj)`` to cancellation, so a squared distance
    under a small multiple of that cannot be told apart from zero.
    """
    n = _diag(g)
    return 8.0 * torch.finfo(g.dtype).eps * (n.unsqueeze(-1) + n.unsqueeze(-2))


def distance_from_sq(sq: torch.Tensor, tol: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Euclidean distance ``sqrt(sq)`` with bounded gradients.

    Pairs with ``sq <= tol`` (duplicates, up to rounding) get distance 0 and gradient 0, a valid
    subgradient of the norm at 0. Above ``tol`` the gradient ``1 / (2 sqrt(sq))`` is at most
    ``1 / (2 sqrt(tol))``: the plain ``sqrt(clamp(sq, eps))`` instead yields gradients of 1e8 and more
    on near-duplicates, because the Gram form's rounding noise is divided by a tiny distance.
    """
    keep = sq > tol
    safe = torch.where(keep, sq, torch.ones_like(sq))
    return torch.where(keep, safe.sqrt(), torch.zeros_like(sq))


def inv_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` where ``x > 0``, else 0 (a zero vector has no direction; it contributes nothing)."""
    pos = x > 0
    return torch.where(pos, 1.0 / torch.where(pos, x, torch.ones_like(x)), torch.zeros_like(x))


def cosine_from_gram(g: torch.Tensor) -> torch.Tensor:
    """``cos_ij = G_ij / (||x_i|| ||x_j||)``; rows of zero vectors are 0.

    The diagonal is exactly 1 (0 for a zero vector), a constant, rather than ``G_ii / G_ii`` rounded.
    """
    inv = inv_or_zero(distance_from_sq(_diag(g)))
    cos = g * inv.unsqueeze(-1) * inv.unsqueeze(-2)
    eye = torch.eye(g.shape[-1], dtype=torch.bool, device=g.device)
    return torch.where(eye, (inv > 0).to(g.dtype).unsqueeze(-1), cos)


def rbf_taylor_from_gram(g: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """P-order Taylor expansion of the Gaussian kernel ``exp(-gamma ||x_i - x_j||^2)``.

    ``exp(-gamma (G_ii + G_jj)) * sum_{p=0..P} (2 gamma G_ij)^p / p!``. On unit-norm rows this is the
    correlation-congruence kernel ``sum_p exp(-2 gamma) (2 gamma)^p / p! (f_i . f_j)^p``
    (Peng et al., ICCV 2019, Eq. 8).
    """
    if order < 0:
        raise ValueError(f"rbf_taylor order must be >= 0, got {order}")
    n = _diag(g)
    scale = torch.exp(-gamma * (n.unsqueeze(-1) + n.unsqueeze(-2)))
    z = 2.0 * gamma * g
    total = torch.ones_like(g)
    term = torch.ones_like(g)
    for p in range(1, order + 1):
        term = term * z / p
        total = total + term
    return scale * total
