"""Pairwise relations derived from one Gram matrix.

Every function here takes a Gram matrix ``G = X X^T`` (shape ``[..., N, N]``) or quantities derived from
it, so a graph pays for one matrix product however many relations a training step asks for.

On the CPU a comparison or a ``torch.where`` over ``N x N`` costs five to twenty times a plain float
pass (a boolean tensor is written and read back), so the ``N x N`` paths here hold no mask: a pair is
kept or dropped through float arithmetic (``sign(relu(.))`` is 1 or 0), and a reciprocal of 0 is sent
to 0 with ``nan_to_num``. Masks on the ``N`` node values are cheap and stay as they are.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

__all__ = [
    "compute_dtype",
    "full_precision",
    "needs_grad",
    "gram",
    "gram_backward",
    "GramChain",
    "chain_on_grams",
    "chain_on_features",
    "diagonal",
    "sq_distance_from_gram",
    "distance_tolerance",
    "distance_from_sq",
    "distance_from_gram",
    "distance",
    "distance_and_count",
    "distance_backward",
    "cosine",
    "cosine_backward",
    "mean_nonzero",
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
    """Disable autocast so that relations stay in float32 even inside an autocast region.

    Outside an autocast region this is a no-op context (entering and leaving ``torch.autocast``
    costs more than a small relation does).
    """
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an operation on ``tensors``: the fused functions below run their plain
    forward otherwise (an autograd function's ``apply`` costs as much as several small operations)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# Below this width two ``N x N x D`` products cost less than symmetrising an ``N x N`` gradient.
_SYMMETRISE_FROM_WIDTH = 64


class _Gram(torch.autograd.Function):
    """``X X^T`` whose backward is one product, ``(dG + dG^T) X``, instead of autograd's two."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x @ x.mT

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return gram_backward(grad, x)


def gram_backward(grad: torch.Tensor, x: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """``dL/dX = (dL/dG + dL/dG^T) X`` for ``G = X X^T``: one product, or two below width 64.

    ``symmetric``: ``dL/dG`` is known to be symmetric, so the product is ``2 dL/dG X``.
    """
    if symmetric:
        return (grad @ x).mul_(2.0)
    if x.shape[-1] < _SYMMETRISE_FROM_WIDTH:
        return (grad @ x).add_(grad.mT @ x)
    # A strided ``grad + grad.mT`` thrashes the CPU cache (10x a plain add at N = 1024), and a new
    # N x N result costs its page faults; a blocked copy of the transpose, added to in place, does not.
    return grad.mT.contiguous().add_(grad) @ x


class GramChain:
    """A scalar function of two Gram matrices ``G^s, G^t`` (``G^t`` a constant) with its backward.

    Subclasses define two static methods: ``forward(gs, gt, *options) -> (value, saved, kept)`` (``saved``
    the tensors the backward reads, ``kept`` anything else) and ``backward(grad, saved, kept) -> dL/dG^s``
    (a new tensor), and set ``symmetric`` when that gradient is symmetric (a function of the symmetric
    relations alone), which halves the products of the features' gradient.
    :func:`chain_on_grams` and :func:`chain_on_features` run one as one autograd node.
    """

    symmetric: bool = False

    @staticmethod
    def forward(gs: torch.Tensor, gt: torch.Tensor, *options: Any) -> tuple[torch.Tensor, tuple, tuple]:
        raise NotImplementedError

    @staticmethod
    def backward(grad: torch.Tensor, saved: tuple, kept: tuple) -> torch.Tensor:
        raise NotImplementedError


class _ChainOnGrams(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, gs: torch.Tensor, gt: torch.Tensor, chain: type[GramChain], *options: Any
    ) -> torch.Tensor:
        value, saved, kept = chain.forward(gs, gt, *options)
        ctx.save_for_backward(*saved)
        ctx.chain, ctx.kept, ctx.options = chain, kept, len(options)
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        d_gs = ctx.chain.backward(grad, ctx.saved_tensors, ctx.kept)
        return d_gs, None, None, *(None,) * ctx.options


class _ChainOnFeatures(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, xs: torch.Tensor, xt: torch.Tensor, chain: type[GramChain], *options: Any
    ) -> torch.Tensor:
        value, saved, kept = chain.forward(xs @ xs.mT, xt @ xt.mT, *options)
        ctx.save_for_backward(xs, *saved)
        ctx.chain, ctx.kept, ctx.options = chain, kept, len(options)
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xs, *saved = ctx.saved_tensors
        chain = ctx.chain
        d_x = gram_backward(chain.backward(grad, tuple(saved), ctx.kept), xs, chain.symmetric)
        return d_x, None, None, *(None,) * ctx.options


def chain_on_grams(chain: type[GramChain], gs: torch.Tensor, gt: torch.Tensor, *options: Any) -> torch.Tensor:
    """``chain`` on two Gram matrices (a graph's cached ones), one autograd node."""
    if needs_grad(gs):
        return _ChainOnGrams.apply(gs, gt.detach(), chain, *options)
    return chain.forward(gs, gt, *options)[0]


def chain_on_features(
    chain: type[GramChain], xs: torch.Tensor, xt: torch.Tensor, *options: Any
) -> torch.Tensor:
    """``chain`` on the Gram matrices of ``xs`` and ``xt`` (``[..., N, D]``, in :func:`compute_dtype`),
    products included in the one autograd node: for inputs no other loss shares."""
    if needs_grad(xs):
        return _ChainOnFeatures.apply(xs, xt.detach(), chain, *options)
    return chain.forward(xs @ xs.mT, xt @ xt.mT, *options)[0]


def gram(x: torch.Tensor) -> torch.Tensor:
    """``G = X X^T`` for ``x`` of shape ``[..., N, D]``, in :func:`compute_dtype`.

    Forward and backward cost one ``N x N x D`` product each for ``D >= 256`` (the backward of a plain
    ``x @ x.T`` costs two); below that width the two products cost less than symmetrising the
    gradient, and plain autograd computes them.
    """
    x = x.to(compute_dtype(x.dtype))
    with full_precision(x.device):
        if x.shape[-1] >= _SYMMETRISE_FROM_WIDTH and needs_grad(x):
            return _Gram.apply(x)
        return x @ x.mT


def diagonal(g: torch.Tensor) -> torch.Tensor:
    """``G_ii`` as ``[..., N]``.

    A strided slice of the flattened matrix rather than ``torch.diagonal``: with a diagonal view saved
    for the backward, inductor (torch 2.14) writes the gradient into the Gram matrix's buffer in place
    while still reading the diagonal from it, and the distances' gradients come out wrong.
    """
    return g.flatten(-2)[..., :: g.shape[-1] + 1]


@torch.library.custom_op("relkd::gram_diagonal", mutates_args=())
def _gram_diagonal(g: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(g, dim1=-2, dim2=-1).clone()


@_gram_diagonal.register_fake
def _(g: torch.Tensor) -> torch.Tensor:
    return g.new_empty(g.shape[:-1])


@torch.library.custom_op("relkd::gram_inverse_norms", mutates_args=())
def _gram_inverse_norms(g: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(g, dim1=-2, dim2=-1).rsqrt().nan_to_num_(nan=math.nan, posinf=0.0)


@_gram_inverse_norms.register_fake
def _(g: torch.Tensor) -> torch.Tensor:
    return g.new_empty(g.shape[:-1])


def _node_values(g: torch.Tensor, inverse_norms: bool) -> torch.Tensor:
    """``G_ii`` (or ``1 / sqrt(G_ii)``, 0 for a zero vector) as ``[..., N]``, for the fused passes.

    In a compiled graph these come from an opaque operator: inductor would otherwise inline the
    strided diagonal read (and the root) into every element of the ``N x N`` kernels that broadcast
    them, which made the compiled cosine 25x slower than the eager one on the CPU.
    """
    if torch.compiler.is_compiling():
        return _gram_inverse_norms(g) if inverse_norms else _gram_diagonal(g)
    diag = torch.diagonal(g, dim1=-2, dim2=-1)
    return diag.rsqrt().nan_to_num_(nan=math.nan, posinf=0.0) if inverse_norms else diag


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


def distance_backward(grad: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``dL/dG`` from ``dL/dd`` for the distances ``d`` of :func:`distance_from_gram`, written into
    ``grad`` (which must be a tensor the caller owns).

    With ``w_ij = dL/dd_ij / d_ij`` (0 where ``d_ij = 0``): ``dL/dG_ij = -w_ij`` and
    ``dL/dG_ii += (sum_j w_ij + sum_j w_ji) / 2``; four float passes.
    """
    w = grad.mul_(_reciprocal_or_zero(d))
    half = (w.sum(-1) + w.sum(-2)).mul_(0.5)
    out = w.neg_()
    torch.diagonal(out, dim1=-2, dim2=-1).add_(half)
    return out


class _DistanceFromGram(torch.autograd.Function):
    """:func:`distance_from_gram` in eight float passes over ``N x N`` forward and six backward.

    With ``w_ij = dL/dd_ij / d_ij`` (0 where ``d_ij = 0``): ``dL/dG_ij = -w_ij`` and
    ``dL/dG_ii += (sum_j w_ij + sum_j w_ji) / 2``.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor) -> torch.Tensor:
        d = distance(g)
        ctx.save_for_backward(d)
        return d

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (d,) = ctx.saved_tensors
        return distance_backward(grad.clone(), d)


def distance(g: torch.Tensor) -> torch.Tensor:
    """:func:`distance_from_gram` without autograd (see :func:`distance_backward`)."""
    return distance_and_count(g)[0]


def distance_and_count(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`distance` and the number of its nonzero entries ``[...]``, in one pass less than apart."""
    n = _node_values(g, inverse_norms=False)
    both = n.unsqueeze(-1) + n.unsqueeze(-2)
    sq = torch.add(both, g, alpha=-2.0)
    # 1 where sq > tolerance * both, else 0 (also for sq < 0): sign(relu(sq - tol)).
    keep = both.mul_(-_tolerance_scale(g.dtype)).add_(sq).relu_().sign_()
    return sq.mul_(keep).sqrt_(), keep.sum((-1, -2))


def distance_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[..., N, N]`` from a Gram matrix, with bounded gradients.

    Equal to ``distance_from_sq(sq_distance_from_gram(g), distance_tolerance(g))`` (pairs within the
    rounding tolerance are duplicates: distance 0, gradient 0), with a fused forward and backward.
    """
    return _DistanceFromGram.apply(g) if needs_grad(g) else distance(g)


def mean_nonzero(d: torch.Tensor) -> torch.Tensor:
    """Mean of the nonzero entries of a non-negative ``[..., N, N]`` (1 where all are 0), ``[...]``.

    RKD's ``mu`` of the distances. The count of nonzero entries is a constant of the mean.
    """
    count = d.sign().sum((-1, -2))
    return torch.where(count > 0, d.sum((-1, -2)) / count.clamp_min(1), 1.0)


def _reciprocal_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` with 0 where ``x`` is 0 (``1 / 0 = inf`` sent to 0; NaN stays NaN), a new tensor."""
    return torch.reciprocal(x).nan_to_num_(nan=math.nan, posinf=0.0, neginf=0.0)


class _InvOrZero(torch.autograd.Function):
    """``1 / x`` for ``x >= 0``, 0 (and gradient 0) where ``x = 0``; two float passes each way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = _reciprocal_or_zero(x)
        ctx.save_for_backward(r)
        return r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return (r * r).mul_(grad).neg_()


def inv_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` where ``x > 0``, else 0 (a zero vector has no direction; it contributes nothing).

    Meant for non-negative ``x`` (distances, norms, singular values): a negative entry gives its
    plain reciprocal. The gradient is ``-1 / x^2``, and 0 where ``x = 0``.
    """
    return _InvOrZero.apply(x) if needs_grad(x) else _reciprocal_or_zero(x)


def inv_sqrt_or_zero(x: torch.Tensor, tol: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``1 / sqrt(x)`` where ``x > tol``, else 0 (and gradient 0), e.g. inverse norms from squares.

    Equal to ``inv_or_zero(distance_from_sq(x, tol))`` in five elementwise passes instead of eight.
    """
    keep = x > tol
    # sqrt then reciprocal, both correctly rounded (rsqrt is not): a unit row is then 1 exactly.
    return torch.where(keep, torch.where(keep, x, 1.0).sqrt().reciprocal(), 0.0)


class _CosineFromGram(torch.autograd.Function):
    """``G_ij u_i u_j`` with ``u = 1 / sqrt(diag G)`` (0 for a zero vector) and the diagonal set to 1
    (0 for a zero vector), a constant. Two float passes forward, five backward.

    With ``E_ij = dL/dG_ij G_ij`` (off the diagonal, ``dL/dG_ij = dL/dcos_ij u_i u_j``), the norms
    add ``dL/dG_ii = -u_i^2 (sum_j E_ij + sum_j E_ji) / 2``.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor) -> torch.Tensor:
        cos, inv = cosine(g)
        ctx.save_for_backward(g, inv)
        return cos

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        g, inv = ctx.saved_tensors
        return cosine_backward(grad.clone(), g, inv)


def cosine(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cosine_from_gram` without autograd, and the inverse norms ``[..., N]`` it used."""
    inv = _node_values(g, inverse_norms=True)
    cos = (g * inv.unsqueeze(-1)).mul_(inv.unsqueeze(-2))
    torch.diagonal(cos, dim1=-2, dim2=-1).copy_(inv.sign())
    return cos, inv


def cosine_backward(grad: torch.Tensor, g: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``dL/dG`` from ``dL/dcos`` for :func:`cosine`, written into ``grad`` (a tensor the caller owns).

    ``dL/dG_ij = dL/dcos_ij u_i u_j`` off the diagonal and, with ``E_ij = dL/dG_ij G_ij``,
    ``dL/dG_ii = -u_i^2 (sum_j E_ij + sum_j E_ji) / 2`` (the norms); five float passes.
    """
    out = grad.mul_(inv.unsqueeze(-1)).mul_(inv.unsqueeze(-2))
    diag = torch.diagonal(out, dim1=-2, dim2=-1)
    diag.zero_()
    e = out * g
    diag.add_((e.sum(-1) + e.sum(-2)).mul_(inv.square()), alpha=-0.5)
    return out


def cosine_from_gram(g: torch.Tensor, inv_norm: torch.Tensor | None = None) -> torch.Tensor:
    """``cos_ij = G_ij / (||x_i|| ||x_j||)``; rows of zero vectors are 0.

    ``inv_norm`` (``1 / ||x_i||``, ``[..., N]``) defaults to :func:`inv_sqrt_or_zero` of the diagonal,
    through a fused forward and backward. The diagonal is exactly 1 (0 for a zero vector), a constant,
    rather than ``G_ii / G_ii`` rounded.
    """
    if inv_norm is None:
        return _CosineFromGram.apply(g) if needs_grad(g) else cosine(g)[0]
    cos = g * inv_norm.unsqueeze(-1) * inv_norm.unsqueeze(-2)
    eye = torch.eye(g.shape[-1], dtype=torch.bool, device=g.device)
    return torch.where(eye, (inv_norm > 0).to(g.dtype).unsqueeze(-1), cos)


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
