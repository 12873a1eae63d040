"""BERT masking with DistilBERT's statistics, over many draws: 15 % of the tokens, 80/10/10, special
tokens and padding never chosen, rare tokens chosen more often (frequency smoothing); the cloze test."""

from __future__ import annotations

import math

import pytest
import torch

from relkd.data.text.dataset import cloze_test, token_weights
from relkd.methods.masked_lm import first_mask_labels, mask_tokens

CLS, SEP, PAD, MASK, V = 101, 102, 0, 103, 1000


def _batch(seed=0, b=16, length=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((b, length), PAD)
    for row in range(b):
        n = int(torch.randint(6, length - 2, (1,), generator=g))
        ids[row, 0], ids[row, n + 1] = CLS, SEP
        ids[row, 1 : n + 1] = torch.randint(200, 260, (n,), generator=g)
    return ids


def test_token_weights_are_smoothed_counts_with_specials_at_zero():
    ids = torch.tensor([[CLS, 5, 5, 5, 7, SEP, PAD, PAD]])
    w = token_weights(ids, 200, [CLS, SEP, PAD])
    assert w[5].item() == pytest.approx(3**-0.7, rel=1e-6)
    assert w[7].item() == pytest.approx(1.0)
    assert w[9].item() == pytest.approx(1.0)  # unseen: max(count, 1) = 1
    assert w[CLS] == w[SEP] == w[PAD] == 0.0


def test_masking_statistics_over_many_draws():
    ids = _batch()
    weights = token_weights(ids, V, [CLS, SEP, PAD, MASK])[ids]
    non_pad = int((ids != PAD).sum())
    torch.manual_seed(0)
    chosen = kinds = 0
    kind_counts = torch.zeros(3)
    special_hits = 0
    for _ in range(400):
        masked, labels = mask_tokens(ids, weights, MASK, V, PAD)
        picked = labels >= 0
        assert int(picked.sum()) == math.ceil(0.15 * non_pad)
        assert (labels[picked] == ids[picked]).all() and (masked[~picked] == ids[~picked]).all()
        special_hits += int((picked & ((ids == CLS) | (ids == SEP) | (ids == PAD))).sum())
        chosen += int(picked.sum())
        kind_counts[0] += int((masked[picked] == MASK).sum())
        same = masked[picked] == ids[picked]
        kind_counts[1] += int(same.sum())
        kinds += int(picked.sum())
    assert special_hits == 0
    # kept and random can coincide (a random token equal to the original, 1 / V of the 10 %)
    share = kind_counts / kinds
    assert share[0].item() == pytest.approx(0.8, abs=0.015)
    assert share[1].item() == pytest.approx(0.1 + 0.1 / V, abs=0.01)
    assert chosen / (400 * non_pad) == pytest.approx(0.15, abs=0.01)


def test_random_replacements_are_uniform_over_the_vocabulary():
    ids = torch.full((1, 4000), 500)
    torch.manual_seed(1)
    masked, labels = mask_tokens(
        ids, torch.ones(1, 4000), MASK, 50, PAD, mask_prob=1.0, ratios=(0.0, 0.0, 1.0)
    )
    counts = torch.bincount(masked[0], minlength=50)
    assert (labels[0] == 500).all() and counts.sum() == 4000 and masked.max() < 50
    assert counts.float().std() / counts.float().mean() < 0.25  # 80 expected per token


def test_rare_tokens_are_masked_more_often_than_frequent_ones():
    # token 7 appears 40 times, token 9 twice per row; smoothed weights 40^-0.7 vs 2^-0.7 per occurrence
    row = torch.tensor([CLS] + [7] * 40 + [9] * 2 + [SEP])
    ids = row.repeat(8, 1)
    weights = token_weights(ids, V, [CLS, SEP, PAD, MASK])[ids]
    torch.manual_seed(2)
    rate = torch.zeros(2)
    for _ in range(300):
        _, labels = mask_tokens(ids, weights, MASK, V, PAD)
        rate[0] += (labels == 7).sum() / (ids == 7).sum()
        rate[1] += (labels == 9).sum() / (ids == 9).sum()
    ratio = (rate[1] / rate[0]).item()
    # without replacement the per-occurrence ratio stays below the weight ratio (~8.1) but far above 1
    assert 4.0 < ratio < (320 / 16) ** 0.7 + 0.5


def test_nothing_to_mask_leaves_the_batch_as_it_is():
    ids = torch.tensor([[CLS, SEP, PAD]])
    masked, labels = mask_tokens(ids, torch.zeros(1, 3), MASK, V, PAD)
    assert torch.equal(masked, ids) and (labels == -1).all()
    with pytest.raises(ValueError, match="ratios"):
        mask_tokens(ids, torch.zeros(1, 3), MASK, V, PAD, ratios=(0.5, 0.5, 0.5))


def test_first_mask_labels_and_cloze_test():
    ids = _batch(seed=3, b=50)
    weights = token_weights(ids, V, [CLS, SEP, PAD, MASK])[ids]
    masked, target = cloze_test(ids, weights, MASK, seed=0)
    assert ((masked == MASK).sum(1) == 1).all()
    position = (masked == MASK).float().argmax(1)
    assert torch.equal(target, ids[torch.arange(50), position])
    again, _ = cloze_test(ids, weights, MASK, seed=0)
    assert torch.equal(again, masked)
    labels = torch.where(masked == MASK, ids, torch.full_like(ids, -1))
    assert torch.equal(first_mask_labels(masked, labels, MASK), target)
    assert first_mask_labels(ids, labels, MASK).eq(-1).all()
