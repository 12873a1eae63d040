r"""Correlation congruence for knowledge distillation: the paper's kernel and the benchmark's chain.

Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019 (Sec. 3.3-3.4). On
L2-normalised embeddings ``f``, the Gaussian RBF kernel through its P-order Taylor expansion (Eq. 8):

.. math::
    k(f_i, f_j) = \sum_{p=0}^{P} e^{-2\gamma} \frac{(2\gamma)^p}{p!} (f_i^\top f_j)^p, \qquad
    \mathcal{L}_{CC} = \frac{1}{B^2} \| K_s - K_t \|_F^2

with the paper's ``gamma = 0.4``, ``P = 2`` (:func:`correlation_congruence`, the ``cc`` loss). The
kernel comes from :meth:`RelationGraph.kernel` (``"rbf_taylor"``) on the normalised graph, whose Gram
matrix is the cosine matrix of the raw graph, so no second matrix product is paid. The instance-level KD
term of the paper's total loss is the separate ``kd`` loss.

The CIFAR-100 numbers of the benchmark (Tian et al., ICLR 2020; github.com/HobbitLong/RepDistiller,
``distiller_zoo/CC.py`` ``Correlation``, code the CC authors shared with RepDistiller's author) come
from another formula (:func:`correlation_chain`, the ``cc_chain`` loss): both penultimate features go
through a trainable linear embedding to 128 dimensions (``models/util.py`` ``LinearEmbed``, no
normalisation; the teacher's embedding is trained too), and with ``\delta_i = |e^s_i - e^t_i|``
(elementwise)

.. math::
    \mathcal{L}_{chain} = \frac{1}{B - 1} \sum_{i=1}^{B-1} \sum_d \delta_{i,d} \, \delta_{i+1,d}

a chain over consecutive examples of the (shuffled) batch, with no kernel and no class-aware sampler;
weight 0.02 (``-a 0 -b 0.02``). Its gradient at weight 0.02 is thousands of times larger than the
kernel loss's at the same weight, so the ``cc`` method weights the kernel by the factor that gives it the
chain's gradient scale relative to the cross-entropy at initialisation (measured by
``benchmarks/cc_calibration.py``; the number and the command are in ``relkd/configs/methods/cc.yaml``).

Shapes:
    :func:`correlation_congruence`: student ``[B, ...]``, teacher ``[B, ...]`` (widths may differ) or
    RelationGraphs -> scalar. :func:`correlation_chain`: embeddings ``[B, D]`` on both sides -> scalar.
    :class:`CCChainLoss`: features ``[B, Ds]``, ``[B, Dt]`` (or ``[B, ...]``) -> scalar.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from relkd._debug import check_finite
from relkd.distributed import all_gather, global_relations_enabled
from relkd.graphs import RelationGraph
from relkd.graphs.ops import GramChain, cosine, cosine_backward, full_precision
from relkd.losses._inputs import gram_loss, gram_pair, nodes, reduce, warn_once
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["correlation_congruence", "correlation_chain", "CCLoss", "CCChainLoss"]
FUNCTIONAL = ("correlation_congruence", "correlation_chain")

Input = torch.Tensor | RelationGraph


class _Congruence(GramChain):
    """``mean_ij (K^s_ij - K^t_ij)^2`` for the Taylor kernels ``K_ij = e_i e_j sum_p a_p cos_ij^p`` of
    the cosines of two Gram matrices, ``e_i = exp(-gamma)`` (1 for a zero row), in ``2 P + 6`` float
    passes over ``B x B`` forward (``P`` the order) and ``P + 6`` backward, the factors ``e`` folded
    into the coefficients when no row is zero.
    """

    symmetric = True

    @staticmethod
    def forward(gs: torch.Tensor, gt: torch.Tensor, gamma: float, coeffs: tuple[float, ...]):
        cs, inv = cosine(gs)
        es = _node_factors(cs, gamma)
        ct = cosine(gt)[0]
        diff = _kernel(cs, es, coeffs).sub_(_kernel(ct, _node_factors(ct, gamma), coeffs))
        value = torch.dot(diff.view(-1), diff.view(-1)) / diff.numel()
        if isinstance(es, torch.Tensor):
            return value, (gs, inv, cs, diff, es), (coeffs, None)
        return value, (gs, inv, cs, diff), (coeffs, es)

    @staticmethod
    def backward(grad: torch.Tensor, saved: tuple, kept: tuple) -> torch.Tensor:
        gs, inv, cs, diff, *es = saved
        coeffs, scale = kept
        slope = tuple(p * a for p, a in enumerate(coeffs))[1:] or (0.0,)
        d_cos = _kernel(cs, es[0] if es else scale, slope).mul_(diff).mul_(grad * (2.0 / diff.numel()))
        return cosine_backward(d_cos, gs, inv)


def _kernel(cos: torch.Tensor, e: torch.Tensor | float, coeffs: tuple[float, ...]) -> torch.Tensor:
    """``e_i e_j sum_p coeffs[p] cos^p`` by Horner's scheme, a new tensor."""
    if not isinstance(e, torch.Tensor):
        coeffs = tuple(a * e * e for a in coeffs)
    if len(coeffs) == 1:
        out = torch.full_like(cos, coeffs[0])
    else:
        out = torch.mul(cos, coeffs[-1]).add_(coeffs[-2])
        for a in reversed(coeffs[:-2]):
            out.mul_(cos).add_(a)
    if isinstance(e, torch.Tensor):
        out.mul_(e.unsqueeze(-1)).mul_(e.unsqueeze(-2))
    return out


def _node_factors(cos: torch.Tensor, gamma: float) -> torch.Tensor | float:
    """``e_i = exp(-gamma ||f_i||^2)`` of the unit rows (1 for a zero row; the cosine's diagonal is 1 or
    0); one number when no row is zero, which the CPU can tell without waiting for a device (and a
    compiled graph cannot)."""
    unit = torch.diagonal(cos, dim1=-2, dim2=-1)
    if unit.device.type == "cpu" and not torch.compiler.is_compiling() and bool(unit.all()):
        return math.exp(-gamma)
    return unit.mul(-gamma).exp_()


def correlation_congruence(
    student: Input, teacher: Input, gamma: float = 0.4, order: int = 2, reduction: str = "mean"
) -> torch.Tensor:
    """CC loss with the P-order Taylor RBF kernel on unit-normalised embeddings."""
    if order < 0:
        raise ValueError(f"rbf_taylor order must be >= 0, got {order}")
    s, t = gram_pair("correlation_congruence", student, teacher)
    coeffs = tuple((2.0 * gamma) ** p / math.factorial(p) for p in range(order + 1))
    with full_precision(s.device):
        loss = gram_loss(_Congruence, s, t, gamma, coeffs)
    return reduce(loss, nodes(s) ** 2, reduction, "correlation_congruence")


def correlation_chain(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """RepDistiller's CC: products of the residual magnitudes of consecutive examples, summed over the
    dimensions; ``"mean"`` averages over the ``B - 1`` links, ``"sum"`` sums them.

    Both arguments keep their gradient: in the benchmark the teacher-side argument is a trainable
    embedding of the (constant, detached) teacher features, trained through this loss
    (:class:`CCChainLoss`). A batch of one example has no link: the loss is 0 (with a warning, once).
    """
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"correlation_chain: expected embeddings [B, D], got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"correlation_chain: expected student and teacher embeddings of the same shape [B, D], got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    check_finite("correlation_chain", "student input", student)
    check_finite("correlation_chain", "teacher input", teacher)
    b = student.shape[0]
    if b < 2:
        warn_once("correlation_chain", "correlation_chain: a batch of 1 example has no link; the loss is 0")
    delta = (student - teacher).abs()
    links = (delta[:-1] * delta[1:]).sum()
    return reduce(links / max(b - 1, 1), max(b - 1, 1), reduction, "correlation_chain")


@register("cc")
class CCLoss(DistillLoss):
    """Module form of :func:`correlation_congruence` (the paper's kernel) on the penultimate features.

    Config (the ``cc`` method: the benchmark's gradient scale, see the module docstring)::

        losses:
          cc: {weight: 24.0, gamma: 0.4, order: 2}
    """

    accepts_graphs = True

    def __init__(self, gamma: float = 0.4, order: int = 2, reduction: str = "mean") -> None:
        super().__init__()
        self.gamma, self.order, self.reduction = gamma, order, reduction

    def forward(self, student: Input, teacher: Input) -> torch.Tensor:
        return correlation_congruence(
            student, teacher, gamma=self.gamma, order=self.order, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, order={self.order}"


@register("cc_chain")
class CCChainLoss(DistillLoss):
    """RepDistiller's CC (the CIFAR-100 benchmark's): :func:`correlation_chain` between trainable
    linear embeddings of both networks' penultimate features.

    Args:
        student_dim, teacher_dim: widths of the penultimate features (filled in by the engine).
        feat_dim: width of the embeddings (RepDistiller's ``--feat_dim`` 128).
        reduction: ``"mean"`` over the ``B - 1`` links (the code's) or ``"sum"``.

    ``embed_s`` and ``embed_t`` are plain ``nn.Linear`` layers (PyTorch's default initialisation, as
    ``LinearEmbed``) and both are trained, ``embed_t`` through this loss alone; the teacher backbone gets
    no gradient. Under global relations (:mod:`relkd.distributed`) the residuals of every rank are
    gathered, so the chain runs over the global batch in rank order.

    Config::

        losses:
          cc_chain: {weight: 0.02, feat_dim: 128}
    """

    def __init__(
        self, student_dim: int, teacher_dim: int, feat_dim: int = 128, reduction: str = "mean"
    ) -> None:
        super().__init__()
        self.embed_s = nn.Linear(student_dim, feat_dim)
        self.embed_t = nn.Linear(teacher_dim, feat_dim)
        self.reduction = reduction

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"cc_chain: expected student and teacher with the same batch size, got "
                f"{student.shape[0]} and {teacher.shape[0]}"
            )
        with full_precision(student.device):
            s = self.embed_s(_flat("student", student, self.embed_s))
            t = self.embed_t(_flat("teacher", teacher.detach(), self.embed_t))
            if global_relations_enabled():
                s, t = all_gather(s), all_gather(t)
            return correlation_chain(s, t, self.reduction)

    def extra_repr(self) -> str:
        return f"feat_dim={self.embed_s.out_features}, reduction={self.reduction!r}"


def _flat(side: str, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] != linear.in_features:
        raise ValueError(
            f"cc_chain: expected {side} features with {linear.in_features} values per sample, got "
            f"{x.shape[1]}; pass the width of the tapped feature as {side}_dim"
        )
    return x.to(linear.weight.dtype)
