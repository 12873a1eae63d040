r"""Layer-mapped hidden-state MSE over tokens, padding ignored (Shleifer & Rush's intermediate supervision).

.. math::
    \mathcal{L} = \sum_{i=0}^{n_s - 1} \frac{1}{D \sum_{b,l} m_{bl}}
    \sum_{b,l} m_{bl} \big\| h^{s}_{i,bl} - h^{t}_{\pi(i),bl} \big\|^2

with :math:`h_i` the stacked hidden states (:math:`h_0` the embedding layer's output, :math:`h_i` layer
i's), :math:`m` the token mask, :math:`D` the width and :math:`\pi` the layer map. Student state
:math:`i` is the input of student layer :math:`i`; with the default map (``supervise: copied``) it is
matched to the input of the teacher layer that student layer was copied from (:math:`\pi` =
:func:`relkd.models.text.layers_to_copy`), so a freshly copied student starts at 0 on its first state.
``supervise: forward`` uses the authors' ``LAYERS_TO_SUPERVISE`` table (:data:`LAYERS_TO_SUPERVISE`),
``layer_map`` any map.

Shleifer & Rush, "Pre-trained Summarization Distillation", 2020. The authors' code
(huggingface/transformers examples/research_projects/seq2seq-distillation ``distillation.py``
``SummarizationDistiller.calc_hidden_loss``) stacks student states ``0 .. len(matches) - 1`` and
teacher states ``matches`` (the copied layers, or ``LAYERS_TO_SUPERVISE`` with ``--supervise_forward``),
takes the squared difference masked by the decoder's (or encoder's) padding mask, and divides its sum
by (valid tokens x width): a sum over the mapped layers of per-layer means, as here. It is applied to
the decoder, and to the encoder when the student's encoder depth differs from the teacher's; the
published distilbart-xsum-12-6 run weighs it ``alpha_hid`` 3 (``train_distilbart_xsum.sh``; the
argparse default is 0). ``normalize`` applies their ``--normalize_hidden``: each mapped layer's states
are layer-normalised over the whole batch (positions, padding included, and width), without affine
parameters, before the difference.

Shapes:
    student ``[B, n_s + 1, L, D]``, teacher ``[B, n_t + 1, L, D]`` (same ``B``, ``L``, ``D``); mask
    ``[B, >= L]`` (1 = token) -> scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from relkd.graphs.ops import compute_dtype
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register
from relkd.losses.token_kd import stacked_states, token_weights

__all__ = ["LAYERS_TO_SUPERVISE", "LayerMSELoss", "layer_mse", "layers_to_supervise", "supervised_layers"]
FUNCTIONAL = ("layer_mse",)
SUPERVISE = ("copied", "forward")
# make_student.py LAYERS_TO_SUPERVISE: teacher depth -> student depth -> teacher states supervising the
# student's states 0, 1, ...
LAYERS_TO_SUPERVISE: dict[int, dict[int, list[int]]] = {
    6: {1: [5], 2: [3, 5], 3: [1, 4, 5], 4: [1, 2, 4, 5]},
    12: {1: [11], 2: [5, 11], 3: [3, 7, 11], 6: [1, 3, 5, 8, 10, 11]},
    16: {1: [15], 4: [4, 9, 12, 15], 8: [1, 3, 5, 7, 9, 11, 13, 15]},
}


def layers_to_supervise(n_teacher: int, n_student: int) -> list[int]:
    """The authors' ``get_layers_to_supervise``: the published table, all layers for equal depths, the
    last layer for a one-layer student."""
    if n_student > n_teacher:
        raise ValueError(f"no intermediate supervision of {n_student} student layers by {n_teacher}")
    if n_student == n_teacher:
        return list(range(n_teacher))
    if n_student == 1:
        return [n_teacher - 1]
    if n_student not in LAYERS_TO_SUPERVISE.get(n_teacher, {}):
        raise ValueError(
            f"no published layers to supervise {n_student} student layers by {n_teacher}: give layer_map"
        )
    return list(LAYERS_TO_SUPERVISE[n_teacher][n_student])


def supervised_layers(n_teacher: int, n_student: int, supervise: str = "copied") -> list[int]:
    """The teacher state matched to each student state ``0 .. n_student - 1``."""
    if supervise not in SUPERVISE:
        raise ValueError(f"supervise must be one of {SUPERVISE}, got {supervise!r}")
    if supervise == "forward":
        return layers_to_supervise(n_teacher, n_student)
    from relkd.models.text import layers_to_copy

    return layers_to_copy(n_teacher, n_student)


def layer_mse(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    layer_map: Sequence[int] | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """:math:`\\mathcal{L}` of the module docstring; ``layer_map`` defaults to the copied layers."""
    b, n_s, length, d = stacked_states("layer_mse", student, teacher)
    mapping = list(supervised_layers(teacher.shape[1] - 1, n_s - 1) if layer_map is None else layer_map)
    if not 0 < len(mapping) <= n_s or not all(0 <= j < teacher.shape[1] for j in mapping):
        raise ValueError(
            f"layer_mse: layer map {mapping} for {n_s} student and {teacher.shape[1]} teacher states"
        )
    weights = token_weights(mask, length, b, "layer_mse")
    dtype = compute_dtype(student.dtype)
    s = student[:, : len(mapping)].to(dtype)
    t = teacher.detach()[:, mapping].to(dtype)
    if normalize:
        s = F.layer_norm(s.transpose(0, 1), (b, length, d)).transpose(0, 1)
        t = F.layer_norm(t.transpose(0, 1), (b, length, d)).transpose(0, 1)
    weights = weights.to(dtype)
    squared = (s - t).pow(2).sum(-1) * weights[:, None]
    return squared.sum() / (weights.sum() * d).clamp(min=1)


@register("layer_mse")
class LayerMSELoss(DistillLoss):
    """Module form of :func:`layer_mse` on the ``decoder_states`` and the label ``mask`` of a seq2seq
    network (the encoder's: ``taps: [encoder_states, encoder_mask]``).

    Config (the published distilbart-xsum-12-6 weight)::

        losses:
          hidden: {loss: layer_mse, weight: 3.0}
    """

    taps = ("decoder_states", "mask")

    def __init__(
        self, layer_map: Sequence[int] | None = None, supervise: str = "copied", normalize: bool = False
    ) -> None:
        super().__init__()
        if supervise not in SUPERVISE:
            raise ValueError(f"layer_mse: supervise must be one of {SUPERVISE}, got {supervise!r}")
        self.layer_map = None if layer_map is None else list(layer_map)
        self.supervise, self.normalize = supervise, normalize

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mapping = self.layer_map
        if mapping is None:
            mapping = supervised_layers(teacher.shape[1] - 1, student.shape[1] - 1, self.supervise)
        return layer_mse(student, teacher, mask, mapping, self.normalize)

    def distill(self, student, teacher, batch=None) -> torch.Tensor:
        states, mask = self.taps
        return self(student[states], teacher[states], student[mask])

    def extra_repr(self) -> str:
        return f"layer_map={self.layer_map}, supervise={self.supervise!r}, normalize={self.normalize}"
