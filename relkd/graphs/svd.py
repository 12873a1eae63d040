r"""Singular vectors of feature maps as graph nodes: a stable truncated SVD, alignment, RBF correlation.

A feature map ``[B, C, H, W]`` is read as one ``HW x C`` matrix per sample, ``X = U \Sigma V^\top``.
Its leading right singular vectors ``v_1, ..., v_k`` (``[B, C, k]``) summarise which channel
combinations carry the most energy; the SVD-based distillation losses compare them between networks
(Lee et al., ECCV 2018; Lee & Song, BMVC 2019).

Stable gradients. The right singular vectors are the eigenvectors of ``A = X^\top X`` and

.. math::
    \mathrm{d}v_j = \sum_{i \ne j} v_i \, \frac{v_i^\top \, \mathrm{d}A \, v_j}{\lambda_j - \lambda_i},
    \qquad \lambda = \sigma^2,

which blows up when ``\lambda_i \to \lambda_j`` (PyTorch's ``svd``/``eigh`` backward then returns inf or
NaN). :func:`truncated_svd` replaces ``1 / \Delta`` by the Lorentzian ``\Delta / (\Delta^2 + \epsilon^2)``
with ``\epsilon = \mathrm{eps} \cdot \lambda_{\max}``: equal to ``1/\Delta`` up to a relative
``(\epsilon/\Delta)^2`` on well-separated spectra, 0 on exact ties (where the vectors are not unique and
any rotation inside the tied subspace is an equally valid answer), and never above ``1 / (2 \epsilon)``.
Only the ``k`` kept vectors receive gradients, so the backward is a rank-``k`` update
``\partial L / \partial X = X (M + M^\top)``, ``M = P V_k^\top``: no ``C x C`` matrix is formed.
Everything runs in float32 (float64 stays float64) with autocast disabled.

The cross-layer relation is not a ``RelationGraph``: its two node sets (the channels of a front and a
back layer) differ, so :func:`rbf_correlation` builds the bipartite ``C_front x C_back`` matrix directly.

Memory. The backward keeps the feature matrix (a view of the feature map, which the network keeps
anyway), the eigenvalues and the vectors of the thin SVD; :func:`rbf_correlation_mse` keeps only the
vectors and recomputes its ``[B, k, C_f, C_b]`` graphs in the backward.

Shapes:
    feature maps ``[B, C, *spatial]`` -> matrices ``[B, HW, C]`` -> vectors ``[B, C, k]``;
    :func:`rbf_correlation` ``[B, C_f, k]``, ``[B, C_b, k]`` -> ``[B, k, C_f, C_b]``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from relkd.graphs import ops

__all__ = [
    "feature_matrix",
    "truncated_svd",
    "canonical_sign",
    "align_vectors",
    "aligned_singular_vectors",
    "rbf_correlation",
    "rbf_correlation_mse",
]


def feature_matrix(f: torch.Tensor) -> torch.Tensor:
    """``[B, C, *spatial]`` -> ``[B, prod(spatial), C]``; a vector batch ``[B, C]`` -> ``[B, 1, C]``.

    Rows are spatial positions, columns channels; no square map is assumed.
    """
    if f.dim() < 2:
        raise ValueError(f"expected features [B, C] or feature maps [B, C, H, W], got shape {tuple(f.shape)}")
    return f.reshape(f.shape[0], f.shape[1], -1).transpose(1, 2)


def _noise_floor(lam: torch.Tensor, size: int) -> torch.Tensor:
    """Squared singular values below this are rounding noise: ``sigma <= sigma_1 * size * eps``, the
    rank tolerance of ``numpy.linalg.matrix_rank``."""
    return (size * torch.finfo(lam.dtype).eps) ** 2 * lam[..., :1]


def _lorentzian(delta: torch.Tensor, eps2: torch.Tensor) -> torch.Tensor:
    return delta / (delta * delta + eps2)


class _TopSVD(torch.autograd.Function):
    """Leading singular pairs of ``X`` as eigenpairs ``(sigma^2, v)`` of ``X^T X``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = x.shape[-2:]
        # cuSOLVER's gesvda is batched for tall matrices: on an H200, 1-2 ms for 128 matrices of
        # 1024x64 or 256x128, against 95-450 ms for the per-matrix syevd/gesvdj loops behind eigh
        # and the default svd driver. A wide X is decomposed through X^T (its U is X's V).
        driver = "gesvda" if x.device.type == "cuda" else None
        if cols <= rows:
            _, sv, vh = torch.linalg.svd(x, full_matrices=False, driver=driver)
            vec = vh.mT
        else:
            vec, sv, _ = torch.linalg.svd(x.mT, full_matrices=False, driver=driver)
        # gesvda is approximate on rank-deficient input: a vector it cannot resolve, or one at the
        # rounding-noise floor, has no defined direction; it is zero, and counts as null space below.
        lam = torch.nan_to_num(sv.square())
        keep = torch.isfinite(vec) & (lam > _noise_floor(lam, max(rows, cols))).unsqueeze(-2)
        vec = torch.where(keep, vec, torch.zeros_like(vec))
        ctx.save_for_backward(x, lam, vec)
        ctx.k, ctx.eps = k, eps
        return lam[..., :k].clone(), vec[..., :k].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lam: torch.Tensor, g_vec: torch.Tensor):
        x, lam, vec = ctx.saved_tensors
        k = ctx.k
        lam_k, v_k = lam[..., :k], vec[..., :k]
        lam_r, v_r = lam[..., k:], vec[..., k:]
        eps2 = (ctx.eps * lam[..., :1]).square().clamp_min(torch.finfo(lam.dtype).tiny)
        eps2 = eps2.unsqueeze(-1)
        reg = _lorentzian

        # P[:, j] = sum_{i != j} v_i (v_i . g_j) reg(lam_j - lam_i) + g_lam_j v_j. Every direction
        # outside the top k first counts as eigenvalue 0 through the projector (I - V_k V_k^T), which
        # covers the null space the thin SVD does not return; the returned rest then get the
        # difference reg(lam_j - lam_i) - reg(lam_j).
        vg_k = v_k.mT @ g_vec
        p = v_k @ (reg(lam_k.unsqueeze(-2) - lam_k.unsqueeze(-1), eps2) * vg_k)
        to_zero = reg(lam_k, eps2.squeeze(-1)).unsqueeze(-2)
        p = p + (g_vec - v_k @ vg_k) * to_zero
        if lam_r.shape[-1]:
            corr = reg(lam_k.unsqueeze(-2) - lam_r.unsqueeze(-1), eps2) - to_zero
            p = p + v_r @ (corr * (v_r.mT @ g_vec))
        p = p + v_k * g_lam.unsqueeze(-2)
        return (x @ p) @ v_k.mT + (x @ v_k) @ p.mT, None, None


def truncated_svd(x: torch.Tensor, k: int, *, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Top-``k`` singular values and right singular vectors of each ``[N, C]`` matrix of ``x``.

    The forward is ``torch.linalg.svd`` (cuSOLVER's batched ``gesvda`` on CUDA, LAPACK on CPU), or on
    the CPU without gradient the eigendecomposition of the smaller Gram matrix (a teacher's vectors);
    the backward is the bounded one described in the module docstring: the gradient of a singular vector
    is finite on repeated and near-repeated singular values. ``k`` is clipped to ``min(N, C)``.
    Vectors of singular values at the rounding floor (``sigma <= sigma_1 max(N, C) eps``; on the
    eigendecomposition path ``sigma^2 <= sigma_1^2 max(N, C) eps``; e.g. the null space of a
    rank-deficient map) are returned as zero, with value 0: they have no defined direction. The
    sign of each vector is the solver's (see :func:`canonical_sign`).

    Args:
        x: ``[..., N, C]`` (e.g. :func:`feature_matrix` of a feature map).
        k: number of leading singular pairs.
        eps: width of the Lorentzian that replaces ``1 / (\lambda_i - \lambda_j)``, relative to the
            largest eigenvalue ``\sigma_1^2``.

    Returns:
        ``s`` ``[..., k]`` (descending) and ``v`` ``[..., C, k]`` (unit columns; zero for a zero
        singular value) in float32, or float64 for float64 input.
    """
    if k < 1:
        raise ValueError(f"truncated_svd: k must be >= 1, got {k}")
    if eps <= 0:
        raise ValueError(f"truncated_svd: eps must be positive, got {eps}")
    if x.dim() < 2:
        raise ValueError(f"truncated_svd: expected matrices [..., N, C], got shape {tuple(x.shape)}")
    k = min(k, x.shape[-2], x.shape[-1])
    with ops.full_precision(x.device):
        x = x.to(ops.compute_dtype(x.dtype))
        if x.device.type == "cpu" and not ops.needs_grad(x):
            lam, v = _top_eigh(x, k)
        else:
            lam, v = _TopSVD.apply(x, k, eps)
        s = ops.distance_from_sq(lam, _noise_floor(lam, max(x.shape[-2:])))
    return s, v


def _top_eigh(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` eigenpairs ``(sigma^2, v)`` of the smaller Gram matrix (``X^T X`` or ``X X^T``),
    for a forward without gradient on the CPU, where LAPACK's ``syevd`` on it takes a third to a fifth
    of the time of the SVD. Its eigenvalues carry an absolute error of about ``size * eps * sigma_1^2``,
    so pairs below that floor are zero (the SVD's floor is ``(size * eps)^2 sigma_1^2``); the leading
    vectors are as accurate as the SVD's."""
    rows, cols = x.shape[-2:]
    tall = cols <= rows
    lam, vec = torch.linalg.eigh(x.mT @ x if tall else x @ x.mT)
    lam, vec = lam.flip(-1)[..., :k].clamp_min(0.0), vec.flip(-1)[..., :k]
    keep = lam > max(rows, cols) * torch.finfo(lam.dtype).eps * lam[..., :1]
    lam = lam * keep
    if not tall:  # right vectors from the left ones: v = X^T u / sigma
        vec = (x.mT @ vec) * ops.inv_or_zero(lam.sqrt()).unsqueeze(-2)
    return lam, vec * keep.unsqueeze(-2)


def canonical_sign(v: torch.Tensor) -> torch.Tensor:
    """Flip each column of ``v`` ``[..., C, k]`` so that its largest-magnitude entry is positive.

    Singular vectors are defined up to sign and LAPACK/cuSOLVER pick it arbitrarily (differently on CPU
    and GPU); this fixes one (as scikit-learn's ``svd_flip``). For non-negative feature maps (after a
    ReLU) the leading vector is entrywise non-negative and this keeps it so.
    """
    idx = v.detach().abs().argmax(dim=-2, keepdim=True)
    return v * torch.where(v.detach().gather(-2, idx) < 0, -1.0, 1.0).to(v.dtype)


def align_vectors(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r"""For each teacher vector, the student vector with the largest ``|cos|``, sign-corrected.

    ``out_j = \mathrm{sign}(c_{i^* j}) \, s_{i^*}``, ``i^* = \arg\max_i |c_{ij}|``,
    ``c_{ij} = s_i^\top t_j`` (unit vectors). Two teacher vectors may pick the same student vector.
    A sign flip of any student vector leaves the result unchanged. The choice is piecewise constant:
    gradients flow through the picked vectors only.

    Shapes:
        student ``[..., C, k_s]``, teacher ``[..., C, k_t]`` -> ``[..., C, k_t]``.
    """
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"align_vectors: expected student and teacher vectors of the same dimension [..., C, k], "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    cos = student.detach().mT @ teacher.detach().to(student.dtype)
    idx = cos.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(cos.gather(-2, idx) < 0, -1.0, 1.0).to(student.dtype)
    picked = student.gather(-1, idx.expand(*student.shape[:-1], idx.shape[-1]))
    return picked * sign


def aligned_singular_vectors(
    student: torch.Tensor,
    teacher: torch.Tensor,
    k: int,
    candidates: int,
    *,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's distilled vectors: the teacher's top ``k`` (canonical sign, a constant) and, for
    each, the best-aligned of the student's top ``candidates`` (:func:`align_vectors`).

    Args:
        student, teacher: feature maps ``[B, C, *spatial]`` with the same ``B`` and ``C``.

    Returns:
        student vectors ``[B, C, k']``, teacher vectors ``[B, C, k']``, teacher singular values
        ``[B, k']``, with ``k' = min(k, HW, C)``.
    """
    with torch.no_grad():
        s_t, v_t = truncated_svd(feature_matrix(teacher.detach()), k, eps=eps)
    v_t = canonical_sign(v_t)
    _, v_s = truncated_svd(feature_matrix(student), max(k, candidates), eps=eps)
    return align_vectors(v_s, v_t), v_t, s_t


def rbf_correlation(front: torch.Tensor, back: torch.Tensor, sigma: float = 8.0) -> torch.Tensor:
    r"""Bipartite RBF graph between the entries of two layers' vectors, per sample and vector.

    .. math::
        G_{b,k,i,j} = \exp\!\big(-(v^{\text{front}}_{b,i,k} - v^{\text{back}}_{b,j,k})^2 / \sigma\big)

    Nodes are the ``C_f`` entries of the front layer's ``k``-th vector and the ``C_b`` entries of the
    back layer's; ``sigma = 8`` as in the authors' code (Lee et al., ECCV 2018).

    Shapes:
        front ``[..., C_f, k]``, back ``[..., C_b, k]`` -> ``[..., k, C_f, C_b]``.
    """
    if front.shape[-1] != back.shape[-1]:
        raise ValueError(
            f"rbf_correlation: expected the same number of vectors k on both layers, got "
            f"{front.shape[-1]} and {back.shape[-1]}"
        )
    if sigma <= 0:
        raise ValueError(f"rbf_correlation: sigma must be positive, got {sigma}")
    diff = front.mT.unsqueeze(-1) - back.mT.unsqueeze(-2)
    return torch.exp(-diff.square() / sigma)


class _RBFCorrelationMSE(torch.autograd.Function):
    """``mean((G^s - G^t)^2)`` of two :func:`rbf_correlation` graphs, keeping only the four vectors.

    With ``d_ij = f_i - b_j`` and ``G = exp(-d^2 / sigma)``: ``dL/dd^s_ij = -4 (G^s - G^t)_ij G^s_ij d^s_ij /
    (sigma n)``, summed over ``j`` for ``f_i`` and, negated, over ``i`` for ``b_j``.
    """

    @staticmethod
    def forward(ctx, fs, bs, ft, bt, sigma: float) -> torch.Tensor:
        diff = rbf_correlation(fs, bs, sigma).sub_(rbf_correlation(ft, bt, sigma))
        ctx.save_for_backward(fs, bs, ft, bt)
        ctx.sigma = sigma
        return diff.square().mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        fs, bs, ft, bt = ctx.saved_tensors
        sigma = ctx.sigma
        d = fs.mT.unsqueeze(-1) - bs.mT.unsqueeze(-2)
        g = torch.exp(d.square().div_(-sigma))
        e = (g - rbf_correlation(ft, bt, sigma)).mul_(g).mul_(d).mul_(grad * (-4.0 / (sigma * d.numel())))
        return e.sum(-1).mT, -e.sum(-2).mT, None, None, None


def rbf_correlation_mse(
    front: torch.Tensor,
    back: torch.Tensor,
    front_target: torch.Tensor,
    back_target: torch.Tensor,
    sigma: float = 8.0,
) -> torch.Tensor:
    """``mean((rbf_correlation(front, back) - rbf_correlation(front_target, back_target))^2)``.

    The targets are constants. The backward recomputes the graphs from the vectors instead of keeping
    three ``[..., k, C_f, C_b]`` tensors for it, as autograd would.

    Shapes:
        front ``[..., C_f, k]``, back ``[..., C_b, k]`` (and the targets alike) -> scalar.
    """
    front_target, back_target = front_target.detach(), back_target.detach()
    if torch.is_grad_enabled() and (front.requires_grad or back.requires_grad):
        return _RBFCorrelationMSE.apply(front, back, front_target, back_target, sigma)
    diff = rbf_correlation(front, back, sigma) - rbf_correlation(front_target, back_target, sigma)
    return diff.square().mean()
