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

__all__ = ["angles_from_gram", "angle_smooth_l1", "default_chunk"]

_CHUNK_ELEMENTS = 1 << 22


def default_chunk(n: int) -> int:
    """Anchors per chunk so that one ``c x N x N`` block holds about 4M elements."""
    return max(1, min(n, _CHUNK_ELEMENTS // max(1, n * n)))


def angles_from_gram(g: torch.Tensor, inv_d: torch.Tensor) -> torch.Tensor:
    """All triplet cosines ``[N, N, N]`` indexed ``[i, j, k]`` (materialised: for small N and plots).

    Args:
        g: Gram matrix ``[N, N]``.
        inv_d: ``1 / d_ij`` with 0 where ``d_ij = 0``, ``[N, N]``.
    """
    return _cosines(g, inv_d, 0, g.shape[-1])


def _cosines(g: torch.Tensor, inv_d: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``cos[i, j, k]`` for anchors ``start:stop`` in four passes over the block, no other temporary.

    ``G_jk - G_ij - G_ik + G_ii = G_jk - h_ij - h_ik`` with ``h_ij = G_ij - G_ii / 2``.
    """
    h = g[start:stop] - torch.diagonal(g)[start:stop, None] / 2
    out = h.unsqueeze(2) + h.unsqueeze(1)
    torch.sub(g.unsqueeze(0), out, out=out)
    ui = inv_d[start:stop]
    return out.mul_(ui.unsqueeze(2)).mul_(ui.unsqueeze(1))


class _AngleSmoothL1(torch.autograd.Function):
    """Sum over triplets of Huber(cos_s - cos_t), with its gradient formed in the same pass.

    With ``w_ijk = r_ijk u_ij u_ik``, ``r = dHuber/dcos_s = clamp((cos_s - cos_t) / beta, -1, 1)`` and
    ``v_ij = sum_k w_ijk`` (``r`` is symmetric in ``j, k``), the numerator
    ``G_jk - G_ij - G_ik + G_ii`` gives

    * ``dL/dG_jk = sum_i w_ijk``, ``dL/dG_ij -= 2 v_ij``, ``dL/dG_ii += sum_j v_ij``
    * ``dL/du_ij = 2 sum_k r_ijk cos_ijk / u_ij``

    All of these are ``N x N``, so the forward accumulates them chunk by chunk and the backward only
    scales them: nothing of size ``N^3`` is stored, and the triplets are visited once.
    """

    @staticmethod
    def forward(ctx, gs, us, gt, ut, beta: float, chunk: int):
        n = gs.shape[-1]
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = gs.new_zeros(())
        d_g = torch.zeros_like(gs) if grad else None
        q = torch.zeros_like(us) if grad else None
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            cs = _cosines(gs, us, a, b)
            diff = torch.sub(cs, _cosines(gt, ut, a, b))
            if not grad:
                total += torch.nn.functional.smooth_l1_loss(
                    diff, torch.zeros_like(diff), beta=beta, reduction="sum"
                )
                continue
            r = diff.clamp(-beta, beta)
            if beta != 1.0:
                r.div_(beta)
            # Huber(d) = r * (d - beta * r / 2) for r = clamp(d / beta, -1, 1).
            total += torch.vdot(r.view(-1), diff.sub_(r, alpha=0.5 * beta).view(-1))
            q[a:b] = torch.linalg.vecdot(r, cs, dim=2)
            ui = us[a:b]
            v = ui * torch.bmm(r, ui.unsqueeze(2)).squeeze(2)
            d_g[a:b] -= 2 * v
            idx = torch.arange(a, b, device=gs.device)
            d_g[idx, idx] += v.sum(1)
            d_g += r.mul_(ui.unsqueeze(2)).mul_(ui.unsqueeze(1)).sum(0)
        if grad:
            d_u = 2 * q * torch.where(us > 0, 1.0 / torch.where(us > 0, us, 1.0), 0.0)
            ctx.save_for_backward(d_g, d_u)
        return total / n**3

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        d_g, d_u = ctx.saved_tensors
        n = d_g.shape[-1]
        scale = grad_out / n**3
        return d_g * scale, d_u * scale, None, None, None, None


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
