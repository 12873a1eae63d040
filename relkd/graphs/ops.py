"""Pairwise relations derived from one Gram matrix.

Every function here takes a Gram matrix ``G = X X^T`` (shape ``[..., N, N]``) or quantities derived from
it, so a graph pays for one matrix product however many relations a training step asks for.
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = [
    "compute_dtype",
    "full_precision",
    "gram",
    "diagonal",
    "sq_distance_from_gram",
    "distance_tolerance",
    "distance_from_sq",
    "distance_from_gram",
    "inv_or_zero",
    "inv_sqrt_or_zero",
    "cosine_from_gram",
    "rbf_taylor_from_gram",
]


def _tolerance_scale(dtype: torch.dtype) -> float:
    """Squared distances under this times ``G_ii + G_jj`` are rounding noise (see distance_tolerance).

    A function rather than a module constant: ``torch.compile(dynamic=True)`` lifts global floats to
    graph inputs, which breaks the tracing of the autograd function below.
    """
    return 8.0 * torch.finfo(dtype).eps


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype relations are computed in: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast so that relations stay in float32 even inside an autocast region."""
    return torch.autocast(device_type=device.type, enabled=False)


# Below this width two ``N x N x D`` products cost less than symmetrising an ``N x N`` gradient.
_SYMMETRISE_FROM_WIDTH = 256


class _Gram(torch.autograd.Function):
    """``X X^T`` whose backward is one product, ``(dG + dG^T) X``, instead of autograd's two."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x @ x.mT

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if x.shape[-1] < _SYMMETRISE_FROM_WIDTH:
            return grad @ x + grad.mT @ x
        # A strided ``grad + grad.mT`` thrashes the CPU cache (10x a plain add at N = 1024); a blocked
        # copy of the transpose does not.
        return (grad + grad.mT.contiguous()) @ x


def gram(x: torch.Tensor) -> torch.Tensor:
    """``G = X X^T`` for ``x`` of shape ``[..., N, D]``, in :func:`compute_dtype`.

    Forward and backward cost one ``N x N x D`` product each for ``D >= 256`` (the backward of a plain
    ``x @ x.T`` costs two).
    """
    x = x.to(compute_dtype(x.dtype))
    with full_precision(x.device):
        return _Gram.apply(x)


def diagonal(g: torch.Tensor) -> torch.Tensor:
    """``G_ii`` as ``[..., N]``.

    A strided slice of the flattened matrix rather than ``torch.diagonal``: with a diagonal view saved
    for the backward, inductor (torch 2.14) writes the gradient into the Gram matrix's buffer in place
    while still reading the diagonal from it, and the distances' gradients come out wrong.
    """
    return g.flatten(-2)[..., :: g.shape[-1] + 1]


def sq_distance_from_gram(g: torch.Tensor) -> torch.Tensor:
    """``||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij``, clamped at 0.

    The diagonal is exactly 0 without a mask: ``2 G_ii - 2 G_ii`` involves no rounding, in any order.
    """
    n = diagonal(g)
    return (n.unsqueeze(-1) + n.unsqueeze(-2)).sub_(g, alpha=2.0).clamp_min(0.0)


def distance_tolerance(g: torch.Tensor) -> torch.Tensor:
    """Squared distances below this are rounding noise of the Gram form, not geometry.

    ``G_ii + G_jj - 2 G_ij`` loses about ``eps * (G_ii + G_jj)`` to cancellation, so a squared distance
    under a small multiple of that cannot be told apart from zero.
    """
    n = diagonal(g)
    return _tolerance_scale(g.dtype) * (n.unsqueeze(-1) + n.unsqueeze(-2))


def distance_from_sq(sq: torch.Tensor, tol: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Euclidean distance ``sqrt(sq)`` with bounded gradients.

    Pairs with ``sq <= tol`` (duplicates, up to rounding) get distance 0 and gradient 0, a valid
    subgradient of the norm at 0. Above ``tol`` the gradient ``1 / (2 sqrt(sq))`` is at most
    ``1 / (2 sqrt(tol))``: the plain ``sqrt(clamp(sq, eps))`` instead yields gradients of 1e8 and more
    on near-duplicates, because the Gram form's rounding noise is divided by a tiny distance.
    """
    keep = sq > tol
    return torch.where(keep, torch.where(keep, sq, 1.0).sqrt(), 0.0)


class _DistanceFromGram(torch.autograd.Function):
    """:func:`distance_from_gram` in six passes over ``N x N`` forward and six backward.

    With ``w_ij = dL/dd_ij / d_ij`` (0 where ``d_ij = 0``): ``dL/dG_ij = -w_ij`` and
    ``dL/dG_ii += (sum_j w_ij + sum_j w_ji) / 2``.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor) -> torch.Tensor:
        n = diagonal(g)
        both = n.unsqueeze(-1) + n.unsqueeze(-2)
        sq = torch.sub(both, g, alpha=2.0)
        keep = sq > both.mul_(_tolerance_scale(g.dtype))
        d = torch.where(keep, sq, 0.0).sqrt_()
        ctx.save_for_backward(d)
        return d

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (d,) = ctx.saved_tensors
        w = torch.where(d > 0, grad / d, 0.0)
        out = w.neg()
        torch.diagonal(out, dim1=-2, dim2=-1).add_(w.sum(-1) + w.sum(-2), alpha=0.5)
        return out


def distance_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[..., N, N]`` from a Gram matrix, with bounded gradients.

    Equal to ``distance_from_sq(sq_distance_from_gram(g), distance_tolerance(g))`` (pairs within the
    rounding tolerance are duplicates: distance 0, gradient 0), with a fused forward and backward.
    """
    return _DistanceFromGram.apply(g)


def inv_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` where ``x > 0``, else 0 (a zero vector has no direction; it contributes nothing)."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1.0).reciprocal(), 0.0)


def inv_sqrt_or_zero(x: torch.Tensor, tol: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``1 / sqrt(x)`` where ``x > tol``, else 0 (and gradient 0), e.g. inverse norms from squares.

    Equal to ``inv_or_zero(distance_from_sq(x, tol))`` in five elementwise passes instead of eight.
    """
    keep = x > tol
    # sqrt then reciprocal, both correctly rounded (rsqrt is not): a unit row is then 1 exactly.
    return torch.where(keep, torch.where(keep, x, 1.0).sqrt().reciprocal(), 0.0)


def cosine_from_gram(g: torch.Tensor, inv_norm: torch.Tensor | None = None) -> torch.Tensor:
    """``cos_ij = G_ij / (||x_i|| ||x_j||)``; rows of zero vectors are 0.

    ``inv_norm`` (``1 / ||x_i||``, ``[..., N]``) defaults to :func:`inv_sqrt_or_zero` of the diagonal.
    The diagonal is exactly 1 (0 for a zero vector), a constant, rather than ``G_ii / G_ii`` rounded.
    """
    inv = inv_sqrt_or_zero(diagonal(g)) if inv_norm is None else inv_norm
    cos = g * inv.unsqueeze(-1) * inv.unsqueeze(-2)
    eye = torch.eye(g.shape[-1], dtype=torch.bool, device=g.device)
    return torch.where(eye, (inv > 0).to(g.dtype).unsqueeze(-1), cos)


def rbf_taylor_from_gram(
    g: torch.Tensor, gamma: float = 0.4, order: int = 2, diag: torch.Tensor | None = None
) -> torch.Tensor:
    """P-order Taylor expansion of the Gaussian kernel ``exp(-gamma ||x_i - x_j||^2)``.

    ``exp(-gamma (G_ii + G_jj)) * sum_{p=0..P} (2 gamma G_ij)^p / p!``. On unit-norm rows this is the
    correlation-congruence kernel ``sum_p exp(-2 gamma) (2 gamma)^p / p! (f_i . f_j)^p``
    (Peng et al., ICCV 2019, Eq. 8). ``diag`` (``G_ii``) defaults to the diagonal of ``g``.
    """
    if order < 0:
        raise ValueError(f"rbf_taylor order must be >= 0, got {order}")
    e = torch.exp(-gamma * (diagonal(g) if diag is None else diag))
    # Horner's scheme in G: two passes per order instead of a power series' four.
    coeffs = [(2.0 * gamma) ** p / math.factorial(p) for p in range(order + 1)]
    poly = g.new_full((), coeffs[-1])
    for a in reversed(coeffs[:-1]):
        poly = (poly * g).add_(a)
    return poly * e.unsqueeze(-1) * e.unsqueeze(-2)
