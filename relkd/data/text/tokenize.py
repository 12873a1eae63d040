"""Tokenizers: any ``transformers`` tokenizer by folder or hub name (``minilm`` offline, see
:mod:`relkd.hub`), and the encoding of texts into padded id tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from relkd.hub import load_tokenizer

__all__ = ["encode", "encode_labels", "load_tokenizer", "special_ids"]


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


def encode_labels(tokenizer: Any, texts: Sequence[str], max_length: int) -> Tensor:
    """``[N, max_length]`` int64 ids a decoder learns to produce for ``texts``: the tokenizer's encoding
    without its leading special token (``[CLS]``, ``<s>``; a decoder starts from its own start token),
    ending with its end token (``[SEP]``, ``</s>``; kept when the text is cut), right-padded with its
    pad id."""
    if max_length < 2:
        raise ValueError(f"max_length must leave room for a token and the end token, got {max_length}")
    pad = int(tokenizer.pad_token_id or 0)
    out = torch.full((len(texts), max_length), pad, dtype=torch.long)
    lead = {tokenizer.cls_token_id, tokenizer.bos_token_id} - {None}
    end = {tokenizer.sep_token_id, tokenizer.eos_token_id} - {None}
    for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=True)["input_ids"] if texts else []):
        if ids and ids[0] in lead:
            ids = ids[1:]
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + ids[-1:] if ids[-1] in end else ids[:max_length]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
