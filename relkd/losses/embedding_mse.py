r"""Mean squared error between sentence embeddings (Reimers & Gurevych's multilingual distillation).

.. math::
    \mathcal{L} = \frac{1}{B D} \sum_{b, d} \big(\hat S(x_b)_d - M(x_b)_d\big)^2

Reimers & Gurevych, "Making Monolingual Sentence Embeddings Multilingual using Knowledge
Distillation", EMNLP 2020; sentence-transformers ``losses/MSELoss.py`` applies ``nn.MSELoss()`` (the
mean over the batch and the dimensions) between the student's embedding and the label, the teacher's
embedding of the source sentence. For a parallel pair the multilingual step calls it twice, student on
the source and on the translation, both against the teacher's source embedding.

``cache: true`` keeps the teacher's embedding of every training sentence once computed (a buffer of
``num_data x teacher_dim``, saved in checkpoints), as sentence-transformers' ``ParallelSentencesDataset``
caches them: a step reads :meth:`EmbeddingMSELoss.lookup` and fills it with :meth:`EmbeddingMSELoss.store`.

Shapes:
    student, teacher ``[B, D]`` (equal widths) -> scalar; identical inputs give 0.
"""

from __future__ import annotations

import torch

from relkd.graphs.ops import compute_dtype
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["EmbeddingMSELoss", "embedding_mse"]
FUNCTIONAL = ("embedding_mse",)


def embedding_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((student - teacher) ** 2)`` over the batch and the dimensions; the teacher is a constant."""
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"embedding_mse: expected student and teacher embeddings of the same shape [B, D], got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    dtype = compute_dtype(student.dtype)
    return (student.to(dtype) - teacher.detach().to(dtype)).pow(2).mean()


@register("embedding_mse")
class EmbeddingMSELoss(DistillLoss):
    """Module form of :func:`embedding_mse` on the networks' ``embedding`` tap, with an optional cache
    of teacher embeddings by training-set index.

    Config::

        losses:
          embedding_mse: {weight: 1.0, cache: true}
    """

    taps = ("embedding",)

    def __init__(
        self, cache: bool = False, num_data: int | None = None, teacher_dim: int | None = None
    ) -> None:
        super().__init__()
        self.cache = cache
        if cache:
            if not num_data or not teacher_dim:
                raise ValueError("embedding_mse with cache: true needs num_data and teacher_dim")
            self.register_buffer("bank", torch.zeros(num_data, teacher_dim))
            self.register_buffer("filled", torch.zeros(num_data, dtype=torch.bool))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return embedding_mse(student, teacher)

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cached embeddings [B, D], which of them are filled [B])`` of training items ``index``."""
        if not self.cache:
            raise RuntimeError("embedding_mse keeps no cache: set cache: true")
        return self.bank[index], self.filled[index]

    def store(self, index: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Remember the teacher's ``embeddings [n, D]`` of training items ``index [n]``."""
        if not self.cache:
            raise RuntimeError("embedding_mse keeps no cache: set cache: true")
        self.bank[index] = embeddings.detach().to(self.bank.dtype)
        self.filled[index] = True

    def extra_repr(self) -> str:
        return f"cache={self.cache}"
