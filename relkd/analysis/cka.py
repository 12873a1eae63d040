r"""CKA between representations, and between every layer of two networks over a whole data set.

:func:`cka` (full batch: linear or RBF kernel, biased or debiased) is
:func:`relkd.graphs.agreement.cka`, the one CKA of relkd, read from each side's
:class:`~relkd.graphs.RelationGraph`.

A whole test set does not fit one Gram matrix. :class:`MinibatchCKA` is the minibatch estimator of
Nguyen, Raghu & Kornblith ("Do Wide and Deep Networks Learn the Same Things?", ICLR 2021, Eq. 3):
over ``k`` batches,

.. math::
    \mathrm{CKA}_{\mathrm{mb}}(X, Y) = \frac{\tfrac1k \sum_b \mathrm{HSIC}_1(K_b, L_b)}
    {\sqrt{\tfrac1k \sum_b \mathrm{HSIC}_1(K_b, K_b)}\,\sqrt{\tfrac1k \sum_b \mathrm{HSIC}_1(L_b, L_b)}},

with :math:`\mathrm{HSIC}_1` Song et al.'s unbiased estimator on each batch's kernel matrices (the
U-centred inner product over ``n (n - 3)``, :func:`relkd.graphs.agreement.hsic`). Each average is
unbiased for the population HSIC, so the estimate does not depend on the batch size the way an average
of biased per-batch CKAs does; memory is one ``n x n`` matrix per layer and batch. It is accumulated
batch by batch (:meth:`MinibatchCKA.update`); with one batch it is the full-batch debiased CKA. Every
batch counts equally (a smaller last batch too); batches of fewer than 4 instances are skipped.

:func:`layer_cka` runs two networks over one loader and fills the layer x layer matrix.

Shapes:
    ``update(a, b)``: ``a`` a list of ``L_a`` feature tensors ``[n, ...]`` (or one tensor), ``b`` of
    ``L_b``, all over the same ``n`` instances -> ``compute()`` ``[L_a, L_b]`` float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from relkd.analysis._batches import LOGITS, evaluating, features
from relkd.graphs import RelationGraph, as_graph
from relkd.graphs.agreement import CKA_KERNELS, centre_kernel, cka, cka_kernel, hsic
from relkd.models import default_taps

__all__ = ["LayerCKA", "MinibatchCKA", "cka", "layer_cka", "layer_taps"]

Features = Tensor | RelationGraph | Sequence[Tensor | RelationGraph]


def _graphs(side: Features) -> list[RelationGraph]:
    items = [side] if isinstance(side, Tensor | RelationGraph) else list(side)
    if not items:
        raise ValueError("expected at least one layer's features per side, got none")
    return [as_graph(f, detach=True) for f in items]


class MinibatchCKA:
    """Nguyen et al.'s minibatch CKA (unbiased HSIC averaged over batches) between ``L_a`` layers of
    one side and ``L_b`` of the other (see the module doc).

    Args:
        kernel: ``linear`` or ``rbf`` (bandwidth per batch, ``threshold`` times the root median
            squared distance).
        threshold: the RBF bandwidth factor.

    >>> mb = MinibatchCKA()
    >>> for x, y in batches:
    ...     mb.update(x, y)
    >>> mb.compute()[0, 0]
    """

    def __init__(self, kernel: str = "linear", threshold: float = 1.0) -> None:
        if kernel not in CKA_KERNELS:
            raise ValueError(f"unknown CKA kernel {kernel!r}; expected one of {list(CKA_KERNELS)}")
        self.kernel, self.threshold = kernel, threshold
        self.cross: Tensor | None = None
        self.self_a: Tensor | None = None
        self.self_b: Tensor | None = None
        self.batches = 0
        self.instances = 0
        self.skipped = 0

    def _centred(self, side: list[RelationGraph]) -> Tensor:
        grams = [centre_kernel(cka_kernel(g, self.kernel, self.threshold), unbiased=True) for g in side]
        return torch.stack(grams)

    @torch.no_grad()
    def update(self, a: Features, b: Features) -> None:
        """Add one batch: the layers of each side over the same ``n`` instances."""
        ga, gb = _graphs(a), _graphs(b)
        sizes = sorted({g.num_nodes for g in ga + gb})
        if len(sizes) != 1:
            raise ValueError(f"expected every layer of one batch over the same instances, got sizes {sizes}")
        if sizes[0] < 4:
            self.skipped += 1
            return
        ka, kb = self._centred(ga), self._centred(gb)
        cross = torch.stack([hsic(k, kb, unbiased=True) for k in ka]).cpu()
        self_a, self_b = hsic(ka, ka, unbiased=True).cpu(), hsic(kb, kb, unbiased=True).cpu()
        if self.cross is None:
            self.cross, self.self_a, self.self_b = cross, self_a, self_b
        elif cross.shape != self.cross.shape:
            raise ValueError(
                f"expected {tuple(self.cross.shape)} layers per batch as before, got {tuple(cross.shape)}"
            )
        else:
            self.cross += cross
            self.self_a += self_a
            self.self_b += self_b
        self.batches += 1
        self.instances += sizes[0]

    def compute(self) -> Tensor:
        """The ``[L_a, L_b]`` CKA matrix (float64, CPU) over the batches seen so far."""
        if self.cross is None:
            raise ValueError("MinibatchCKA has seen no batch of at least 4 instances")
        return self.cross / torch.sqrt(self.self_a[:, None] * self.self_b[None, :])


@dataclass
class LayerCKA:
    """The layer x layer CKA of two networks.

    Attributes:
        matrix: ``[len(taps_a), len(taps_b)]`` float64; row ``i``, column ``j`` compares tap
            ``taps_a[i]`` of the first network with ``taps_b[j]`` of the second.
        taps_a, taps_b: the taps, in order.
        batches, instances: what the estimate averaged over.
    """

    matrix: Tensor
    taps_a: list[str]
    taps_b: list[str]
    batches: int
    instances: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "taps_a": self.taps_a,
            "taps_b": self.taps_b,
            "matrix": self.matrix.tolist(),
            "batches": self.batches,
            "instances": self.instances,
        }


def layer_taps(model: nn.Module) -> list[str]:
    """The taps a layer-CKA matrix shows by default: ``stage1`` .. ``stage4`` the model has, then
    ``penultimate`` and ``logits``."""
    taps = default_taps(model)
    stages = [f"stage{i}" for i in range(1, 5) if f"stage{i}" in taps]
    return [*stages, *(["penultimate"] if "penultimate" in taps else []), LOGITS]


def layer_cka(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable[Any],
    taps_a: Sequence[str] | None = None,
    taps_b: Sequence[str] | None = None,
    *,
    kernel: str = "linear",
    threshold: float = 1.0,
    max_batches: int | None = None,
) -> LayerCKA:
    """Minibatch CKA between every tap of ``model_a`` and every tap of ``model_b`` over ``loader``.

    Both networks run in eval mode on the same batches (on their own devices; each batch is moved to
    each network's device), and each batch's kernel matrices are computed once per tap.

    Args:
        model_a, model_b: any two networks (architectures and widths may differ).
        loader: batches (relkd batch dicts, ``(x, y)`` pairs or input tensors).
        taps_a, taps_b: tap names (``stage2``, ``penultimate``, ``logits``) or module paths
            (``layer3``, ``fc:input``); default :func:`layer_taps`.
        kernel, threshold: as in :class:`MinibatchCKA`.
        max_batches: stop after this many batches.
    """
    taps_a = list(taps_a) if taps_a is not None else layer_taps(model_a)
    taps_b = list(taps_b) if taps_b is not None else layer_taps(model_b)
    mb = MinibatchCKA(kernel, threshold)
    batches = list(loader) if max_batches is None else list(itertools.islice(loader, max_batches))
    # One outer mode guard: the two feature streams may run the same network.
    with evaluating(model_a, model_b):
        streams = zip(features(model_a, batches, taps_a), features(model_b, batches, taps_b), strict=True)
        for (fa, _), (fb, _) in streams:
            mb.update([fa[t] for t in taps_a], [fb[t] for t in taps_b])
    return LayerCKA(mb.compute(), taps_a, taps_b, mb.batches, mb.instances)
