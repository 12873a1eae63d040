"""Triplet (angle) relations computed from the Gram matrix, in chunks over the anchor.

The cosine of the angle at vertex ``i`` between ``x_j - x_i`` and ``x_k - x_i`` is

.. math::
    \\cos\\angle_{ijk} = \\frac{G_{jk} - G_{ij} - G_{ik} + G_{ii}}{d_{ij}\\, d_{ik}},

so no ``B x B x D`` difference tensor is ever formed: each chunk of ``c`` anchors costs a ``c x B x B``
block, and the fused discrepancy below recomputes the blocks in its backward instead of storing them.
A zero difference vector (``d = 0``) has no direction and contributes a cosine of 0.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["angle_chunk", "angles_from_gram", "angle_smooth_l1", "default_chunk"]

_CHUNK_ELEMENTS = 1 << 22


def default_chunk(n: int) -> int:
    """Anchors per chunk so that one ``c x N x N`` block holds about 4M elements."""
    return max(1, min(n, _CHUNK_ELEMENTS // max(1, n * n)))


def angle_chunk(
    g: torch.Tensor, inv_d: torch.Tensor, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and cosine of the angles at anchors ``start:stop``.

    Args:
        g: Gram matrix ``[N, N]``.
        inv_d: ``1 / d_ij`` with 0 where ``d_ij = 0``, ``[N, N]``.

    Returns:
        ``(num, cos)``, each ``[stop - start, N, N]``, indexed ``[i, j, k]``.
    """
    gi = g[start:stop]
    gii = torch.diagonal(g)[start:stop]
    num = g.unsqueeze(0) - gi.unsqueeze(2) - gi.unsqueeze(1) + gii[:, None, None]
    ui = inv_d[start:stop]
    return num, num * ui.unsqueeze(2) * ui.unsqueeze(1)


def angles_from_gram(g: torch.Tensor, inv_d: torch.Tensor) -> torch.Tensor:
    """All triplet cosines ``[N, N, N]`` (materialised: for small N, inspection and plots)."""
    return angle_chunk(g, inv_d, 0, g.shape[-1])[1]


def _huber_grad(diff: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.where(diff.abs() < beta, diff / beta, diff.sign())


class _AngleSmoothL1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gs, us, gt, ut, beta: float, chunk: int):  # noqa: D401
        n = gs.shape[-1]
        total = gs.new_zeros(())
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            cs = angle_chunk(gs, us, a, b)[1]
            cs.sub_(angle_chunk(gt, ut, a, b)[1])
            total += torch.nn.functional.smooth_l1_loss(cs, torch.zeros_like(cs), beta=beta, reduction="sum")
        ctx.save_for_backward(gs, us, gt, ut)
        ctx.beta, ctx.chunk = beta, chunk
        return total / n**3

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        gs, us, gt, ut = ctx.saved_tensors
        n = gs.shape[-1]
        scale = grad_out / n**3
        d_g = torch.zeros_like(gs) if ctx.needs_input_grad[0] else None
        d_u = torch.zeros_like(us) if ctx.needs_input_grad[1] else None
        for a in range(0, n, ctx.chunk):
            b = min(n, a + ctx.chunk)
            num, cs = angle_chunk(gs, us, a, b)
            r = _huber_grad(cs - angle_chunk(gt, ut, a, b)[1], ctx.beta).mul_(scale)
            ui = us[a:b]
            if d_u is not None:
                rn = r * num
                d_u[a:b] = (rn * ui.unsqueeze(1)).sum(2) + (rn * ui.unsqueeze(2)).sum(1)
            if d_g is not None:
                w = r.mul_(ui.unsqueeze(2)).mul_(ui.unsqueeze(1))
                d_g += w.sum(0)
                d_g[a:b] -= w.sum(2) + w.sum(1)
                idx = torch.arange(a, b, device=gs.device)
                d_g[idx, idx] += w.sum((1, 2))
        return d_g, d_u, None, None, None, None


def angle_smooth_l1(
    g_s: torch.Tensor,
    inv_d_s: torch.Tensor,
    g_t: torch.Tensor,
    inv_d_t: torch.Tensor,
    beta: float = 1.0,
    chunk: int | None = None,
) -> torch.Tensor:
    """``mean_{i,j,k} smooth_l1(cos_s[i,j,k] - cos_t[i,j,k])`` over all ``N^3`` triplets.

    Memory is ``O(chunk * N^2)`` in forward and backward; the teacher side gets no gradient.

    Args:
        g_s, inv_d_s: student Gram matrix and inverse distances ``[N, N]``.
        g_t, inv_d_t: teacher Gram matrix and inverse distances ``[N, N]``.
        beta: Huber threshold (smooth-L1 ``beta``).
        chunk: anchors per block; default :func:`default_chunk`.
    """
    n = g_s.shape[-1]
    return _AngleSmoothL1.apply(
        g_s, inv_d_s, g_t.detach(), inv_d_t.detach(), float(beta), chunk or default_chunk(n)
    )
