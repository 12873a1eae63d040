r"""Deep mutual learning (DML): K peers trained together, each also fitting the others' predictions.

.. math::
    L_k = w_{ce}\,\mathrm{CE}(z_k, y)
          + \frac{T^2}{K-1} \sum_{l \ne k} \frac{1}{B} \sum_b \mathrm{KL}\big(p_l^T \,\|\, p_k^T\big)_b,
    \qquad p^T = \mathrm{softmax}(z / T)

Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018. Every student of the run is a peer
(``students: {peer1: student, peer2: student}``: two copies of the suite's student, initialised
differently); there is no teacher. The peers' predictions in ``L_k`` are constants: the gradient of
``L_k`` reaches peer ``k`` alone. ``T = 1`` and ``w_ce = 1`` (the stage's ``ce_weight``) are the
paper's. The cross-entropy reads labelled rows only (target ``-1`` marks transfer images) and is
averaged over them; the KL is averaged over every row of the batch, so unlabelled transfer rows
contribute to the KL alone.

Two update orders (``update``):

* ``sequential`` (the default): the paper's Algorithm 1. Within a batch the peers are updated in turn;
  before peer ``k``'s update, the predictions of the peers updated before it are recomputed with their new
  weights. A manual step: one :meth:`relkd.methods.StepContext.update` per peer. The run keeps one
  optimiser over every peer; it zeroes gradients to None before each backward, so the other peers'
  parameters (which get no gradient from ``L_k``) are left as they are: SGD (momentum, weight decay) and
  AdamW skip a parameter without a gradient, and each peer's optimiser state advances only at its own
  update, as with one optimiser per peer. Costs ``2K - 1`` forwards per batch; a recomputed prediction
  runs the network in training mode again (its BatchNorm running statistics move twice in that batch, its
  dropout draws a new mask), as recomputing does in the paper's algorithm.
* ``simultaneous``: one forward of every peer, one backward of :math:`\sum_k L_k`, one optimiser step;
  the peers' targets are their predictions before this step's update (the common reimplementation).

Where we differ from the authors. No official PyTorch code exists; the first author's TensorFlow code
(github.com/YingZhangDUT/Deep-Mutual-Learning ``train_models.py``, person re-identification on
Market-1501) updates the peers in turn, one ``sess.run`` per peer, and each run draws a new batch from
the input queue, so peer ``k`` is updated on a batch of its own with the other peers' predictions on
that batch. Neither option reproduces that data order; ``sequential`` is the paper's algorithm. Its KL
adds ``1e-8`` inside the logarithm and sums over peers without the ``1/(K-1)`` (equal for ``K = 2``).
The default is ``sequential``: both the paper and the first author's code update the peers in turn.
``simultaneous`` costs ``K`` forwards and one backward per batch instead of ``2K - 1`` forwards and
``K`` backwards, and differs from it by terms of the order of the learning rate.

**Shapes:** each peer's logits ``[B, C]``; target ``[B]``; every loss a scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from relkd.methods.base import Step, StepContext, StepOutput, register_step
from relkd.methods.weighted_sum import cross_entropy

__all__ = ["DML", "FUNCTIONAL", "UPDATES", "mutual_kl"]

FUNCTIONAL = ("mutual_kl",)
UPDATES = ("simultaneous", "sequential")


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 at least (logits under bf16/fp16 autocast), float64 kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def mutual_kl(logits: Tensor, peers: Sequence[Tensor], T: float = 1.0) -> Tensor:
    r"""Peer ``k``'s mutual term: :math:`\frac{T^2}{K-1} \sum_l \frac1B \sum_b \mathrm{KL}(p_l^T \| p_k^T)_b`.

    Args:
        logits: peer ``k``'s logits (the gradient flows into them).
        peers: the other ``K - 1`` peers' logits (detached here: constants).
        T: temperature.

    **Shapes:** ``logits`` and each peer ``[B, C]`` -> scalar.

    Raises:
        ValueError: no peer, a peer of another shape, logits that are not ``[B, C]``, ``T <= 0``.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [B, C], got {list(logits.shape)}")
    if not peers:
        raise ValueError("mutual learning needs at least one other peer, got none")
    if T <= 0:
        raise ValueError(f"the temperature T must be positive, got {T}")
    for q in peers:
        if q.shape != logits.shape:
            raise ValueError(
                f"expected peer logits of the same shape as the student's {list(logits.shape)}, "
                f"got {list(q.shape)}"
            )
    log_p = F.log_softmax(_wide(logits) / T, dim=1)
    total = logits.new_zeros((), dtype=log_p.dtype)
    for q in peers:
        log_q = F.log_softmax(_wide(q.detach()) / T, dim=1)
        total = total + (log_q.exp() * (log_q - log_p)).sum(1).mean()
    return T * T * total / len(peers)


@register_step("dml")
class DML(Step):
    """Deep mutual learning of every student of the run (see the module docstring).

    Args:
        update: ``simultaneous`` (one update of every peer per batch) or ``sequential`` (the paper's:
            peers updated in turn, predictions recomputed after each update).
        T: temperature of the mutual KL.
        students: the peers (filled in by the engine: every student of the run).

    Its losses are ``ce/<peer>`` (the stage's ``ce_weight`` times the cross-entropy, absent when that
    weight is 0) and ``kl/<peer>`` of each peer; their sum is :math:`\\sum_k L_k`. Under ``sequential``
    they are the values each peer's update used. The logits are the first peer's.
    """

    def __init__(self, update: str = "sequential", T: float = 1.0, students: Sequence[str] = ()) -> None:
        super().__init__()
        if update not in UPDATES:
            raise ValueError(f"dml: update must be one of {', '.join(UPDATES)}, got {update!r}")
        if T <= 0:
            raise ValueError(f"dml: the temperature T must be positive, got {T}")
        if len(students) < 2:
            raise ValueError(
                f"dml trains K >= 2 peers, got {len(students)} student(s) ({', '.join(students) or 'none'}); "
                "give the method students: {peer1: student, peer2: student}"
            )
        self.update, self.T, self.peers = update, float(T), list(students)
        # The engine reads `manual` from the step: the sequential order makes its own updates.
        self.manual = update == "sequential"

    def extra_repr(self) -> str:
        return f"update={self.update!r}, T={self.T}, peers={self.peers}"

    def _losses(self, ctx: StepContext, peer: str, logits: dict[str, Tensor]) -> dict[str, Tensor]:
        others = [logits[p] for p in self.peers if p != peer]
        out = {}
        if ctx.stage.ce_weight:
            out[f"ce/{peer}"] = ctx.stage.ce_weight * cross_entropy(logits[peer], ctx.batch["target"])
        out[f"kl/{peer}"] = mutual_kl(logits[peer], others, self.T)
        return out

    def forward(self, ctx: StepContext) -> StepOutput:
        logits = {p: ctx.run(p)["logits"] for p in self.peers}
        first = logits[self.peers[0]]
        losses: dict[str, Tensor] = {}
        if not self.manual:
            for peer in self.peers:
                losses.update(self._losses(ctx, peer, logits))
            return StepOutput(first, losses)
        previous = None  # the one peer whose prediction is out of date
        for peer in self.peers:
            if previous is not None:
                with torch.no_grad():
                    logits[previous] = ctx.run(previous)["logits"]
            own = self._losses(ctx, peer, logits)
            ctx.update(sum(own.values()))
            losses.update({k: v.detach() for k, v in own.items()})
            previous = peer
        return StepOutput(first.detach(), losses)
