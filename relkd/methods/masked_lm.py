r"""Masked-LM steps: BERT's masking inside the step, then the weighted terms (DistilBERT, MLM pre-training).

Each step draws the positions to predict (Devlin et al., BERT, NAACL 2019; the frequency smoothing of
XLM and DistilBERT):

1. :math:`n = \lceil p \sum_b \ell_b \rceil` positions of the batch (``mask_prob`` p = 0.15,
   :math:`\ell_b` the non-padding tokens of row b), drawn without replacement with probabilities
   proportional to the batch's ``mask_weight`` (:math:`\max(c_v, 1)^{-0.7}`, 0 for special tokens and
   padding, so those are never picked);
2. each chosen token becomes ``[MASK]`` with probability 0.8, stays with 0.1, becomes a token drawn
   uniformly from the vocabulary with 0.1 (``ratios``).

The batch the networks then see has ``input`` masked, ``mlm_labels`` (the original token at the chosen
positions, -1 elsewhere) and ``target`` (the label at each row's first ``[MASK]``, what a masked-LM
network's output predicts; -1 when the first student has no masked-LM head), and every term reads it.
This follows the DistilBERT code (``distiller.py`` ``prepare_batch_mlm``: ``mlm_mask_prop`` 0.15,
``word_mask/keep/rand`` 0.8/0.1/0.1, ``token_probs = max(counts, 1) ** -0.7`` with the special tokens
at 0, one multinomial draw over the flattened batch, random tokens uniform over the vocabulary). A row
may get no masked token or several.

``init_from``: before the first update of the run, copy the named teacher's embeddings, the layers
``layers`` (default :func:`relkd.models.text.layers_to_copy`, DistilBERT's every-other-layer map) and
its masked-LM head into the first student (:func:`relkd.models.text.copy_layers`): DistilBERT's
initialisation from its teacher.

Randomness comes from the global torch generator, which checkpoints save, so resumed runs are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from relkd.methods.base import StepContext, StepOutput, register_step
from relkd.methods.weighted_sum import WeightedSum

__all__ = ["MaskedLM", "mask_tokens"]

RATIOS = (0.8, 0.1, 0.1)


def mask_tokens(
    ids: Tensor,
    weight: Tensor,
    mask_token_id: int,
    vocab_size: int,
    pad_token_id: int = 0,
    mask_prob: float = 0.15,
    ratios: Sequence[float] = RATIOS,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking with DistilBERT's frequency-smoothed choice (see the module docstring).

    Args:
        ids: ``[B, L]`` token ids, right-padded with ``pad_token_id``.
        weight: ``[B, L]`` non-negative choice weights (0: never chosen).
        mask_token_id, vocab_size: the ``[MASK]`` id and the range of random replacements.
        mask_prob: the share of non-padding tokens chosen.
        ratios: probabilities of ``[MASK]``, keeping, a random token.

    Returns:
        ``(masked ids [B, L], labels [B, L])``: labels hold the original id at chosen positions, -1
        elsewhere.
    """
    if ids.shape != weight.shape or ids.dim() != 2:
        raise ValueError(
            f"mask_tokens: expected ids and weights [B, L], got {tuple(ids.shape)} and {tuple(weight.shape)}"
        )
    if not 0.0 <= mask_prob <= 1.0 or len(ratios) != 3 or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(
            f"mask_tokens: need 0 <= mask_prob <= 1 and three ratios summing to 1, got {mask_prob}, {ratios}"
        )
    flat = weight.flatten().double().clamp(min=0.0)
    available = int((flat > 0).sum())
    wanted = math.ceil(mask_prob * int((ids != pad_token_id).sum()))
    n = min(wanted, available)
    labels = torch.full_like(ids, -1)
    if n == 0:
        return ids.clone(), labels
    chosen = torch.multinomial(flat, n, replacement=False, generator=generator).to(ids.device)
    flat_ids = ids.flatten().clone()
    original = flat_ids[chosen]
    kind = torch.multinomial(
        torch.tensor(list(ratios), dtype=torch.double), n, replacement=True, generator=generator
    )
    kind = kind.to(ids.device)
    random = torch.randint(vocab_size, (n,), generator=generator).to(ids.device)
    flat_ids[chosen] = torch.where(kind == 0, mask_token_id, torch.where(kind == 1, original, random))
    labels.view(-1)[chosen] = original
    return flat_ids.view_as(ids), labels


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if hasattr(network, "module") and isinstance(network.module, nn.Module) else network


def first_mask_labels(masked: Tensor, labels: Tensor, mask_token_id: int) -> Tensor:
    """``[B]``: the label at each row's first ``mask_token_id`` position, -1 for rows without one."""
    is_mask = masked == mask_token_id
    first = is_mask.float().argmax(1)
    picked = labels.gather(1, first[:, None]).squeeze(1)
    return torch.where(is_mask.any(1), picked, torch.full_like(picked, -1))


@register_step("masked_lm")
class MaskedLM(WeightedSum):
    """Mask the batch (see the module docstring), then ``ce_weight * CE + sum_i weight_i * term_i`` on it.

    Args:
        mask_prob: the share of tokens chosen (0.15).
        ratios: ``[MASK]`` / keep / random probabilities (0.8, 0.1, 0.1).
        init_from: a teacher to initialise the first student from before the first update, or None.
        layers: the teacher layers copied (default: :func:`relkd.models.text.layers_to_copy`).
    """

    ddp_wrap = False

    def __init__(
        self,
        mask_prob: float = 0.15,
        ratios: Sequence[float] = RATIOS,
        init_from: str | None = None,
        layers: Sequence[int] | None = None,
        students: Sequence[str] = (),
        teachers: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if init_from is not None and init_from not in teachers:
            raise ValueError(
                f"init_from: {init_from!r} is not a teacher of this method ({', '.join(teachers) or 'none'})"
            )
        self.mask_prob, self.ratios = float(mask_prob), tuple(float(r) for r in ratios)
        self.init_from, self.layers = init_from, None if layers is None else list(layers)

    def forward(self, ctx: StepContext) -> StepOutput:
        student = _unwrap(ctx.networks[ctx.students[0]])
        if self.init_from is not None and ctx.epoch == 0 and ctx.step == 0 and ctx.stage.start_epoch == 0:
            from relkd.models.text import copy_layers

            copy_layers(student, _unwrap(ctx.networks[self.init_from]), self.layers)
        batch = ctx.batch
        if "mask_weight" not in batch:
            raise KeyError("masked_lm needs text batches with mask_weight (relkd.data.text datasets)")
        masked, labels = mask_tokens(
            batch["input"], batch["mask_weight"], student.mask_token_id, student.vocab_size,
            student.pad_token_id, self.mask_prob, self.ratios,
        )  # fmt: skip
        target = torch.full_like(batch["target"], -1)
        if getattr(student, "head", None) == "mlm":
            target = first_mask_labels(masked, labels, student.mask_token_id)
        ctx.batch = {**batch, "input": masked, "mlm_labels": labels, "target": target}
        return super().forward(ctx)
