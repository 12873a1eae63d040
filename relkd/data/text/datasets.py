"""Registered text datasets: ``text_classification``, ``text_corpus`` (masked-LM), ``parallel_text``,
``summarization`` (document -> summary pairs).

Each reads a standard file (``path``: JSONL, CSV or TSV with a header) or, by default, an offline
source cached by ``python -m relkd.data.text.prepare`` (:mod:`relkd.data.text.sources`), tokenises it
with ``tokenizer`` (a ``transformers`` folder or hub name; ``minilm`` offline) to ``max_length`` ids,
and splits it into training and test sets with the fixed seed ``split_seed`` (independent of the run
seed). Masking weights (:func:`relkd.data.text.dataset.token_weights`) are counted on the training set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from relkd.data.bundle import DataBundle
from relkd.data.registry import register
from relkd.data.text.dataset import (
    MLM_SMOOTHING,
    TokenDataset,
    cloze_test,
    mask_weights,
    text_bundle,
    token_weights,
)
from relkd.data.text.sources import cached_file, read_records
from relkd.data.text.tokenize import encode, encode_labels, load_tokenizer, special_ids

__all__ = [
    "group_split",
    "parallel_text",
    "split_positions",
    "summarization",
    "text_classification",
    "text_corpus",
]


def split_positions(n: int, test: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted ``(train, test)`` positions of ``n`` items: ``test`` items (a fraction when below 1)
    drawn with ``seed``."""
    size = round(test * n) if test < 1 else int(test)
    if not 0 < size < n:
        raise ValueError(f"a test split of {test} leaves no training or no test item out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[size:].sort().values, order[:size].sort().values


def group_split(groups: Sequence[str], test: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted ``(train, test)`` positions with every group wholly on one side: groups are drawn in a
    seeded order until the test side holds ``test`` items (a fraction when below 1) or just more."""
    n = len(groups)
    size = round(test * n) if test < 1 else int(test)
    if not 0 < size < n:
        raise ValueError(f"a test split of {test} leaves no training or no test item out of {n}")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    names = list(members)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen: list[int] = []
    for k in order:
        if len(chosen) >= size:
            break
        chosen.extend(members[names[k]])
    if len(chosen) >= n:
        raise ValueError(f"a test split of {test} leaves no training item: the data has {len(names)} groups")
    test_rows = torch.tensor(sorted(chosen), dtype=torch.long)
    keep = torch.ones(n, dtype=torch.bool)
    keep[test_rows] = False
    return keep.nonzero().flatten(), test_rows


def _source(path: str | None, default: str, root: str | Path | None) -> Path:
    return Path(path).expanduser() if path is not None else cached_file(default, root)


def _weights(tokenizer, train_ids: torch.Tensor) -> torch.Tensor:
    return token_weights(train_ids, len(tokenizer), special_ids(tokenizer))


@register("text_classification")
def text_classification(
    root: str | Path | None = None,
    augment: bool = True,
    path: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    classes: Sequence[str] | None = None,
    max_per_class: int | None = None,
    tokenizer: str = "minilm",
    max_length: int = 32,
    test_size: float = 0.2,
    split_seed: int = 0,
) -> DataBundle:
    """Texts with labels (default: Debian fortunes labelled by their file).

    Args:
        path: a JSONL/CSV/TSV file with ``text_field`` and ``label_field`` (default the cached fortunes).
        classes: keep these labels, numbered in this order (default every label, sorted).
        max_per_class: keep at most this many texts of each class (the first ones in file order).
        tokenizer, max_length: tokenisation.
        test_size: the held-out part, a fraction or a count, drawn with ``split_seed``.
    """
    records = read_records(_source(path, "fortunes", root), [text_field, label_field])
    names = list(classes) if classes is not None else sorted({str(r[label_field]) for r in records})
    number = {name: k for k, name in enumerate(names)}
    kept, counts = [], dict.fromkeys(names, 0)
    for r in records:
        label = str(r[label_field])
        if label in number and (max_per_class is None or counts[label] < max_per_class):
            counts[label] += 1
            kept.append((str(r[text_field]), number[label]))
    unknown = [c for c, n in counts.items() if n == 0]
    if unknown:
        raise ValueError(f"no text has the label {unknown[0]!r}")
    tok = load_tokenizer(tokenizer)
    ids = encode(tok, [t for t, _ in kept], max_length)
    targets = torch.tensor([y for _, y in kept], dtype=torch.long)
    train, test = split_positions(len(kept), test_size, split_seed)
    weights = _weights(tok, ids[train])
    w = mask_weights(ids, weights)
    return text_bundle(
        "text_classification",
        TokenDataset(ids[train], targets[train], w[train], augment=augment),
        TokenDataset(ids[test], targets[test], w[test]),
        num_classes=len(names),
        classes=names,
    )


@register("text_corpus")
def text_corpus(
    root: str | Path | None = None,
    augment: bool = True,
    path: str | None = None,
    text_field: str = "text",
    max_items: int | None = None,
    tokenizer: str = "minilm",
    max_length: int = 32,
    test_size: float = 1000,
    split_seed: int = 0,
    mlm_smoothing: float = MLM_SMOOTHING,
) -> DataBundle:
    """Unlabelled text for masked-LM training (default: every Debian fortune).

    Training items are unlabelled (target -1; a masked-LM step draws the masks). Each test item has
    one token, drawn uniformly among its non-special tokens (seeded), replaced by ``[MASK]``, and that
    token as its target, so a masked-LM network's test top-1 is its cloze accuracy; ``num_classes``
    is the vocabulary size.

    Args:
        mlm_smoothing: the masking weights' exponent (:func:`relkd.data.text.dataset.token_weights`):
            DistilBERT's 0.7 masks rare tokens more often; 0 masks every token alike, as BERT's
            pre-training does.
    """
    records = read_records(_source(path, "fortunes", root), [text_field])[:max_items]
    tok = load_tokenizer(tokenizer)
    if tok.mask_token_id is None:
        raise ValueError(f"the tokenizer {tokenizer!r} has no mask token, so it cannot serve masked-LM data")
    ids = encode(tok, [str(r[text_field]) for r in records], max_length)
    train, test = split_positions(len(records), test_size, split_seed)
    weights = token_weights(ids[train], len(tok), special_ids(tok), mlm_smoothing)
    w = mask_weights(ids, weights)
    # the cloze token is drawn uniformly among the maskable ones (the smoothed weights would favour
    # rare tokens, a much harder test than masked-LM training's mix)
    masked, target = cloze_test(ids[test], (w[test] > 0).float(), tok.mask_token_id, split_seed)
    unlabelled = torch.full((len(train),), -1, dtype=torch.long)
    return text_bundle(
        "text_corpus",
        TokenDataset(ids[train], unlabelled, w[train], augment=augment),
        TokenDataset(masked, target, mask_weights(masked, weights)),
        num_classes=len(tok),
    )


@register("parallel_text")
def parallel_text(
    root: str | Path | None = None,
    augment: bool = True,
    path: str | None = None,
    source: str = "bible",
    source_field: str = "en",
    target_field: str = "es",
    max_items: int | None = None,
    tokenizer: str = "minilm",
    max_length: int = 32,
    drop_longer: bool = True,
    test_size: float = 500,
    split_seed: int = 0,
) -> DataBundle:
    """Translation pairs: ``input`` holds the source sentence (the teacher's language), ``pair`` its
    translation (default: the cached bible verses, English and Spanish).

    Args:
        path: a JSONL/CSV/TSV file with ``source_field`` and ``target_field``; default the cached
            offline ``source`` (``bible`` or ``messages``).
        max_items: keep the first pairs only (after ``drop_longer``).
        drop_longer: leave out pairs of which a side has more than ``max_length`` tokens (truncating
            them would cut the two sides at different places).
    """
    records = read_records(_source(path, source, root), [source_field, target_field])
    tok = load_tokenizer(tokenizer)
    src = encode(tok, [str(r[source_field]) for r in records], max_length)
    tgt = encode(tok, [str(r[target_field]) for r in records], max_length)
    if drop_longer:
        lengths = tok([str(r[source_field]) for r in records] + [str(r[target_field]) for r in records])
        n = len(records)
        sizes = torch.tensor([len(x) for x in lengths["input_ids"]])
        fits = (sizes[:n] <= max_length) & (sizes[n:] <= max_length)
        src, tgt = src[fits], tgt[fits]
    src, tgt = src[:max_items], tgt[:max_items]
    train, test = split_positions(src.shape[0], test_size, split_seed)
    weights = _weights(tok, torch.cat([src[train], tgt[train]]))
    unlabelled = torch.full((src.shape[0],), -1, dtype=torch.long)

    def part(rows: torch.Tensor, aug: bool) -> TokenDataset:
        return TokenDataset(
            src[rows],
            unlabelled[rows],
            mask_weights(src[rows], weights),
            extras={"pair": tgt[rows]},
            augment=aug,
        )

    return text_bundle("parallel_text", part(train, augment), part(test, False), num_classes=1)


@register("summarization")
def summarization(
    root: str | Path | None = None,
    augment: bool = True,
    path: str | None = None,
    document_field: str = "document",
    summary_field: str = "summary",
    group_field: str | None = None,
    tokenizer: str = "minilm",
    max_length: int = 64,
    summary_length: int = 32,
    train_size: int | None = None,
    test_size: float = 500,
    split_seed: int = 0,
) -> DataBundle:
    """Document -> summary pairs for sequence-to-sequence networks (default: Debian package long
    descriptions -> their one-line synopses, cached by ``python -m relkd.data.text.prepare debian``).

    Each item's ``input`` holds both sides, ``[2 L]`` ids with ``L = max(max_length,
    summary_length)``: the document (the tokenizer's encoding, truncated to ``max_length``), then the
    summary's labels (:func:`relkd.data.text.tokenize.encode_labels`: the tokens the decoder predicts,
    its end token included, at most ``summary_length``), each right-padded to ``L``. Sequence-to-sequence
    networks (:mod:`relkd.models.seq2seq`) read it as ``[B, 2, L]``. ``target`` is the summary's first
    token, so a network's test top-1 is its accuracy on that token (teacher-forced); ``num_classes``
    is the vocabulary size. The quality of whole summaries is the ``rouge`` evaluator's.

    Args:
        path: a JSONL/CSV/TSV file with ``document_field`` and ``summary_field``.
        group_field: a field whose values keep related pairs on one side of the split (default: the
            source package for the offline data, no grouping for a file).
        tokenizer, max_length, summary_length: tokenisation.
        train_size: keep this many training pairs, drawn with ``split_seed`` (default all).
        test_size: the held-out part, a fraction or a count, drawn with ``split_seed`` by group.
    """
    group = group_field if group_field is not None or path is not None else "source"
    fields = [document_field, summary_field, *([group] if group else [])]
    records = read_records(_source(path, "debian", root), fields)
    if group:
        train, test = group_split([str(r[group]) for r in records], test_size, split_seed)
    else:
        train, test = split_positions(len(records), test_size, split_seed)
    if train_size is not None and train_size < len(train):
        generator = torch.Generator().manual_seed(split_seed + 1)
        train = train[torch.randperm(len(train), generator=generator)[:train_size]].sort().values
    # only the pairs kept are tokenised; rows are renumbered 0 .. n-1 (training pairs first)
    kept = [records[i] for i in [*train.tolist(), *test.tolist()]]
    train, test = torch.arange(len(train)), torch.arange(len(train), len(kept))
    tok = load_tokenizer(tokenizer)
    length = max(max_length, summary_length)
    documents = encode(tok, [str(r[document_field]) for r in kept], max_length)
    labels = encode_labels(tok, [str(r[summary_field]) for r in kept], summary_length)
    ids = torch.full((len(kept), 2 * length), int(tok.pad_token_id or 0), dtype=torch.long)
    ids[:, :max_length], ids[:, length : length + summary_length] = documents, labels
    targets = labels[:, 0]
    weights = torch.zeros(ids.shape)

    def part(rows: torch.Tensor, aug: bool) -> TokenDataset:
        return TokenDataset(ids[rows], targets[rows], weights[rows], indices=rows - rows[0], augment=aug)

    return text_bundle("summarization", part(train, augment), part(test, False), num_classes=len(tok))
