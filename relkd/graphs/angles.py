"""Triplet (angle) relations computed from the Gram matrix, in chunks over the anchor.

The cosine of the angle at vertex ``i`` between ``x_j - x_i`` and ``x_k - x_i`` is

.. math::
    \\cos\\angle_{ijk} = \\frac{G_{jk} - G_{ij} - G_{ik} + G_{ii}}{d_{ij}\\, d_{ik}},

so no ``B x B x D`` difference tensor is ever formed: each chunk of ``c`` anchors costs a ``c x B x B``
block, and the fused discrepancy below forms its ``N x N`` gradients in the same pass instead of storing
the blocks. A zero difference vector (``d = 0``) has no direction and contributes a cosine of 0.

The pass is the custom operator ``relkd::angle_smooth_l1``: ``torch.compile`` sees one opaque node (no
graph break, no loop unrolled into the graph), and when the caller is being compiled the per-chunk body
is itself compiled, so each chunk is one fused loop instead of about 17 passes over its block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from relkd.graphs.ops import diagonal, full_precision, inv_or_zero

__all__ = ["angles_from_gram", "angle_smooth_l1", "default_chunk", "CHUNK_BUDGET_BYTES"]

# The memory a chunk's ``c x N x N`` blocks may take, by device type: the eager pass holds about four
# blocks at once. On the CPU the blocks are best kept in the cache: at N = 512 (float32, one thread) a
# 4 MiB block ran 2.2x faster than a 16 MiB one eagerly and 1.4x faster compiled, so the budget there is
# 16 MiB (one anchor per chunk from N = 1024). A GPU wants few kernel launches: 1 GiB gives N = 1024
# about 20 chunks.
CHUNK_BUDGET_BYTES = {"cpu": 16 << 20}
CHUNK_BUDGET_DEFAULT = 1 << 30
_LIVE_BLOCKS = 4


def default_chunk(
    n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, budget: int | None = None
) -> int:
    """Anchors per chunk: as many as keep the chunk's ``c x N x N`` blocks within ``budget`` bytes
    (default :data:`CHUNK_BUDGET_BYTES` for the device type, else :data:`CHUNK_BUDGET_DEFAULT`)."""
    if budget is None:
        budget = CHUNK_BUDGET_BYTES.get(torch.device(device).type, CHUNK_BUDGET_DEFAULT)
    per_anchor = _LIVE_BLOCKS * n * n * torch.finfo(dtype).bits // 8
    return max(1, min(n, budget // max(1, per_anchor)))


def angles_from_gram(g: torch.Tensor, inv_d: torch.Tensor) -> torch.Tensor:
    """All triplet cosines ``[N, N, N]`` indexed ``[i, j, k]`` (materialised: for small N and plots).

    Args:
        g: Gram matrix ``[N, N]``.
        inv_d: ``1 / d_ij`` with 0 where ``d_ij = 0``, ``[N, N]``.
    """
    return _cosines(g, _half_centred(g), inv_d)


def _half_centred(g: torch.Tensor) -> torch.Tensor:
    """``h_ij = G_ij - G_ii / 2``, so that ``G_jk - G_ij - G_ik + G_ii = G_jk - h_ij - h_ik``."""
    return g - diagonal(g).unsqueeze(1) / 2


def _cosines(g: torch.Tensor, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``cos[i, j, k]`` for the anchors whose rows ``h, u`` are given, in four passes over the block."""
    out = h.unsqueeze(2) + h.unsqueeze(1)
    torch.sub(g.unsqueeze(0), out, out=out)
    return out.mul_(u.unsqueeze(2)).mul_(u.unsqueeze(1))


def _chunk_loss(gs, hs, us, gt, ht, ut, beta: float) -> torch.Tensor:
    """Sum of Huber(cos_s - cos_t) over one chunk's triplets."""
    return F.smooth_l1_loss(_cosines(gs, hs, us), _cosines(gt, ht, ut), beta=beta, reduction="sum")


def _chunk_grad_eager(gs, hs, us, gt, ht, ut, beta: float):
    """One chunk's ``(loss, q, v, dG)`` (see :func:`_angle_pass`), in place: two blocks live at once."""
    cs = _cosines(gs, hs, us)
    diff = torch.sub(cs, _cosines(gt, ht, ut))
    r = diff.clamp(-beta, beta)
    if beta != 1.0:
        r.div_(beta)
    # Huber(d) = r * (d - beta * r / 2) for r = clamp(d / beta, -1, 1).
    total = torch.vdot(r.view(-1), diff.sub_(r, alpha=0.5 * beta).view(-1))
    q = torch.linalg.vecdot(r, cs, dim=2)
    v = us * torch.bmm(r, us.unsqueeze(2)).squeeze(2)
    return total, q, v, r.mul_(us.unsqueeze(2)).mul_(us.unsqueeze(1)).sum(0)


def _chunk_grad_fused(gs, hs, us, gt, ht, ut, beta: float):
    """The same four terms written as plain expressions, for the compiler to fuse into one loop."""
    uu = us.unsqueeze(2) * us.unsqueeze(1)
    cs = (gs - hs.unsqueeze(2) - hs.unsqueeze(1)) * uu
    ct = (gt - ht.unsqueeze(2) - ht.unsqueeze(1)) * (ut.unsqueeze(2) * ut.unsqueeze(1))
    diff = cs - ct
    r = (diff / beta).clamp(-1.0, 1.0)
    w = r * uu
    return (r * (diff - 0.5 * beta * r)).sum(), (r * cs).sum(2), w.sum(2), w.sum(0)


_COMPILED: dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    """``torch.compile(fn)``, built on first use (the compiler is only paid for when asked for)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[name]


@torch.library.custom_op("relkd::angle_smooth_l1", mutates_args=())
def _angle_pass(
    gs: torch.Tensor,
    us: torch.Tensor,
    gt: torch.Tensor,
    ut: torch.Tensor,
    beta: float,
    chunk: int,
    grad: bool,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum over triplets of Huber(cos_s - cos_t), and with ``grad`` its ``N x N`` gradients.

    With ``w_ijk = r_ijk u_ij u_ik``, ``r = dHuber/dcos_s = clamp((cos_s - cos_t) / beta, -1, 1)`` and
    ``v_ij = sum_k w_ijk`` (``r`` is symmetric in ``j, k``), the numerator
    ``G_jk - G_ij - G_ik + G_ii`` gives

    * ``dL/dG_jk = sum_i w_ijk``, ``dL/dG_ij -= 2 v_ij``, ``dL/dG_ii += sum_j v_ij``
    * ``dL/du_ij = 2 sum_k r_ijk cos_ijk / u_ij``

    All of these are ``N x N``, so the pass accumulates them chunk by chunk and the backward only
    scales them: nothing of size ``N^3`` is stored, and the triplets are visited once.
    """
    n = gs.shape[-1]
    with full_precision(gs.device):
        hs, ht = _half_centred(gs), _half_centred(gt)
        total = gs.new_zeros(())
        if not grad:
            body = _compiled("loss", _chunk_loss) if fused else _chunk_loss
            for a in range(0, n, chunk):
                rows = slice(a, a + chunk)
                total += body(gs, hs[rows], us[rows], gt, ht[rows], ut[rows], beta)
            return total, gs.new_empty(0, 0), gs.new_empty(0, 0)
        body = _compiled("grad", _chunk_grad_fused) if fused else _chunk_grad_eager
        d_g, q = torch.zeros_like(gs), torch.zeros_like(us)
        diag = torch.diagonal(d_g)
        for a in range(0, n, chunk):
            rows = slice(a, a + chunk)
            part, q_rows, v, d_gk = body(gs, hs[rows], us[rows], gt, ht[rows], ut[rows], beta)
            total += part
            q[rows] = q_rows
            d_g[rows] -= 2 * v
            diag[rows] += v.sum(1)
            d_g += d_gk
        d_u = 2 * q * inv_or_zero(us)
    return total, d_g, d_u


@_angle_pass.register_fake
def _(gs, us, gt, ut, beta, chunk, grad, fused):
    n = gs.shape[-1] if grad else 0
    return gs.new_empty(()), gs.new_empty(n, n), gs.new_empty(n, n)


def _setup_context(ctx, inputs, output) -> None:
    _, d_g, d_u = output
    ctx.save_for_backward(d_g, d_u)


def _backward(ctx, grad_total, _grad_dg, _grad_du):
    d_g, d_u = ctx.saved_tensors
    return d_g * grad_total, d_u * grad_total, None, None, None, None, None, None


_angle_pass.register_autograd(_backward, setup_context=_setup_context)


def angle_smooth_l1(
    g_s: torch.Tensor,
    inv_d_s: torch.Tensor,
    g_t: torch.Tensor,
    inv_d_t: torch.Tensor,
    beta: float = 1.0,
    chunk: int | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """``mean_{i,j,k} smooth_l1(cos_s[i,j,k] - cos_t[i,j,k])`` over all ``N^3`` triplets.

    Memory is ``O(chunk * N^2)`` in forward and backward; the teacher side gets no gradient.

    Args:
        g_s, inv_d_s: student Gram matrix and inverse distances ``[N, N]``.
        g_t, inv_d_t: teacher Gram matrix and inverse distances ``[N, N]``.
        beta: Huber threshold (smooth-L1 ``beta``).
        chunk: anchors per block; default :func:`default_chunk` for the inputs' device and dtype.
        fused: run each chunk through a ``torch.compile``-d body (one fused loop per chunk; the first
            call compiles it). Default: only when the caller is itself being compiled.
    """
    n = g_s.shape[-1]
    chunk = chunk or default_chunk(n, g_s.device, g_s.dtype)
    grad = torch.is_grad_enabled() and (g_s.requires_grad or inv_d_s.requires_grad)
    fused = torch.compiler.is_compiling() if fused is None else fused
    total, _, _ = _angle_pass(g_s, inv_d_s, g_t.detach(), inv_d_t.detach(), float(beta), chunk, grad, fused)
    return total / n**3
