"""Tokenizers: any ``transformers`` tokenizer by folder or hub name (``minilm`` offline, see
:mod:`relkd.hub`), and the encoding of texts into padded id tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from relkd.hub import load_tokenizer

__all__ = ["encode", "load_tokenizer", "special_ids"]


def special_ids(tokenizer: Any) -> list[int]:
    """The ids of the tokenizer's special tokens ([CLS], [SEP], [PAD], [MASK], [UNK] ...)."""
    return sorted({int(i) for i in tokenizer.all_special_ids})


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> Tensor:
    """``[N, max_length]`` int64 ids of ``texts`` (with the tokenizer's special tokens), truncated and
    padded on the right with its pad id."""
    if max_length < 3:
        raise ValueError(f"max_length must leave room for [CLS], a token and [SEP], got {max_length}")
    if not texts:
        return torch.empty(0, max_length, dtype=torch.long)
    out = tokenizer(
        list(texts), max_length=max_length, truncation=True, padding="max_length", return_tensors="pt"
    )
    return out["input_ids"].long()
