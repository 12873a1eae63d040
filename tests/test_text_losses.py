"""Token-level and embedding losses of the text path against hand values and float64 loops: padding
changes nothing, identical inputs give 0, the teacher gets no gradient, bad shapes raise."""

from __future__ import annotations

import math

import pytest
import torch

import relkd
from relkd.losses.embedding_mse import EmbeddingMSELoss, embedding_mse
from relkd.losses.hidden_cosine import HiddenCosineLoss, hidden_cosine
from relkd.losses.hidden_mse import NormalizedHiddenMSELoss, layer_map, normalized_hidden_mse
from relkd.losses.mlm import MLMLoss, masked_lm
from relkd.losses.token_kd import TokenKDLoss, token_kd

RTOL = 1e-10


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kl_rows(s, t, mask, T):
    """Textbook loop: T^2 * mean over rows with mask 1 of sum_v p_t (log p_t - log p_s)."""
    total, rows = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask[b, i] == 0:
                continue
            zs = [x / T for x in s[b, i].tolist()]
            zt = [x / T for x in t[b, i].tolist()]
            ls = [z - math.log(sum(math.exp(y) for y in zs)) for z in zs]
            lt = [z - math.log(sum(math.exp(y) for y in zt)) for z in zt]
            total += sum(math.exp(a) * (a - c) for a, c in zip(lt, ls, strict=True))
            rows += 1
    return T * T * total / rows


@pytest.fixture
def tokens():
    s, t = _rand(3, 5, 7, seed=1) * 2, _rand(3, 5, 7, seed=2) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    return s, t, mask


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_token_kd_matches_the_row_loop(tokens, T):
    s, t, mask = tokens
    assert token_kd(s, t, mask, T=T).item() == pytest.approx(_kl_rows(s, t, mask, T), rel=RTOL)


def test_token_kd_default_is_distilberts_temperature():
    assert TokenKDLoss().T == 2.0 and TokenKDLoss().positions == "tokens"


def test_token_kd_hand_value():
    # one row: student uniform over 2 tokens, teacher (log 3, 0) at T = 1 -> p_t = (3/4, 1/4)
    s = torch.zeros(1, 1, 2, dtype=torch.float64)
    t = torch.tensor([[[math.log(3.0), 0.0]]], dtype=torch.float64)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert token_kd(s, t, torch.ones(1, 1), T=1.0).item() == pytest.approx(expected, rel=RTOL)


def test_padding_rows_change_nothing(tokens):
    s, t, mask = tokens
    base = token_kd(s, t, mask)
    garbage_s, garbage_t = _rand(3, 4, 7, seed=3) * 50, _rand(3, 4, 7, seed=4) * 50
    longer = token_kd(
        torch.cat([s, garbage_s], 1), torch.cat([t, garbage_t], 1), torch.cat([mask, torch.zeros(3, 4)], 1)
    )
    torch.testing.assert_close(longer, base, rtol=RTOL, atol=0)
    # the padded positions inside the rows hold garbage too: replacing it changes nothing
    s2 = s.clone()
    s2[mask == 0] = 1e3
    torch.testing.assert_close(token_kd(s2, t, mask), base, rtol=RTOL, atol=0)
    h_s, h_t = _rand(3, 5, 4, seed=5), _rand(3, 5, 4, seed=6)
    cos = hidden_cosine(h_s, h_t, mask)
    h_s2 = h_s.clone()
    h_s2[mask == 0] = -7.0
    torch.testing.assert_close(hidden_cosine(h_s2, h_t, mask), cos, rtol=RTOL, atol=0)


def test_a_mask_longer_than_the_tensors_is_read_up_to_their_length(tokens):
    s, t, mask = tokens
    wide = torch.cat([mask, torch.zeros(3, 3, dtype=mask.dtype)], 1)
    torch.testing.assert_close(token_kd(s, t, wide), token_kd(s, t, mask))
    bad = wide.clone()
    bad[0, -1] = 1
    relkd.set_debug(True)  # reading the mask's values syncs the device: a debug-mode check
    try:
        with pytest.raises(ValueError, match="beyond"):
            token_kd(s, t, bad)
    finally:
        relkd.set_debug(False)


def test_token_kd_on_masked_positions_reads_the_mlm_labels(tokens):
    s, t, _ = tokens
    labels = torch.full((3, 5), -1)
    labels[0, 1], labels[2, 0] = 4, 2
    loss = TokenKDLoss(T=2.0, positions="masked").distill(
        {"token_logits": s, "mask": torch.ones(3, 5)}, {"token_logits": t, "mask": torch.ones(3, 5)},
        {"mlm_labels": labels},
    )  # fmt: skip
    assert loss.item() == pytest.approx(_kl_rows(s, t, labels >= 0, 2.0), rel=RTOL)


def test_teacher_gets_no_gradient_and_student_gradient_checks(tokens):
    s, t, mask = tokens
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    token_kd(s, t, mask).backward()
    assert t.grad is None and s.grad is not None
    assert torch.autograd.gradcheck(
        lambda x: token_kd(x, t.detach(), mask), (s.detach().clone().requires_grad_(),)
    )
    h = _rand(2, 3, 4, seed=9).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: hidden_cosine(x, _rand(2, 3, 4, seed=8), torch.ones(2, 3)), (h,)
    )


def test_cosine_and_mse_are_zero_on_identical_inputs():
    h = _rand(2, 4, 6, seed=7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert hidden_cosine(h, h.clone(), mask).item() == pytest.approx(0.0, abs=1e-12)
    e = _rand(5, 3, seed=8)
    assert embedding_mse(e, e.clone()).item() == 0.0
    states = _rand(2, 3, 4, 6, seed=9)
    assert normalized_hidden_mse(states, states.clone(), mask).item() == pytest.approx(0.0, abs=1e-12)


def test_hidden_cosine_hand_value():
    s = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [5.0, 5.0]]], dtype=torch.float64)
    t = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    # rows: cos 0 -> 1, cos 1/sqrt 2 -> 1 - 1/sqrt 2; the third is padding
    expected = (1.0 + 1.0 - 1 / math.sqrt(2)) / 2
    assert hidden_cosine(s, t, torch.tensor([[1, 1, 0]])).item() == pytest.approx(expected, rel=1e-12)
    assert HiddenCosineLoss().taps == ("last_hidden", "mask")


def test_mlm_hand_value_and_ignored_labels():
    logits = torch.log(
        torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]], dtype=torch.float64)
    )
    labels = torch.tensor([[0, -1, 2]])
    expected = -(math.log(0.5) + math.log(1 / 3)) / 2
    assert masked_lm(logits, labels).item() == pytest.approx(expected, rel=1e-12)
    assert masked_lm(logits, torch.tensor([[0, -100, 2]])).item() == pytest.approx(expected, rel=1e-12)
    longer = torch.tensor([[0, -1, 2, -1, -1]])
    assert masked_lm(logits, longer).item() == pytest.approx(expected, rel=1e-12)
    zero = masked_lm(logits.clone().requires_grad_(), torch.full((1, 3), -1))
    assert zero.item() == 0.0 and zero.requires_grad
    loss = MLMLoss()
    assert not loss.needs_teacher and loss.distill(
        {"token_logits": logits}, None, {"mlm_labels": labels}
    ).item() == (pytest.approx(expected, rel=1e-12))
    with pytest.raises(KeyError, match="mlm_labels"):
        loss.distill({"token_logits": logits}, None, {})


def test_embedding_mse_hand_value_and_cache():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    assert embedding_mse(s, t).item() == pytest.approx((1 + 4 + 9 + 1) / 4)
    loss = EmbeddingMSELoss(cache=True, num_data=5, teacher_dim=2)
    values, filled = loss.lookup(torch.tensor([1, 3]))
    assert not filled.any()
    loss.store(torch.tensor([3]), torch.tensor([[7.0, 8.0]]))
    values, filled = loss.lookup(torch.tensor([1, 3]))
    assert filled.tolist() == [False, True] and values[1].tolist() == [7.0, 8.0]
    assert "bank" in loss.state_dict() and "filled" in loss.state_dict()
    with pytest.raises(ValueError, match="num_data"):
        EmbeddingMSELoss(cache=True)


def _rep_loop(s, t, mask, mapping, include_padding=False):
    """Per sentence: sum over mapped layers of the mean over (tokens, dims) of squared normalised diffs."""
    out = []
    for b in range(s.shape[0]):
        total = 0.0
        for i, j in enumerate(mapping):
            acc, n = 0.0, 0
            for pos in range(s.shape[2]):
                if not include_padding and mask[b, pos] == 0:
                    continue
                u, v = s[b, i, pos], t[b, j, pos]
                u, v = u / u.norm(), v / v.norm()
                acc += ((u - v) ** 2).mean().item()
                n += 1
            total += acc / n
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_normalized_hidden_mse_matches_the_loop_with_the_authors_layer_map():
    s, t = _rand(2, 3, 4, 5, seed=11), _rand(2, 7, 4, 5, seed=12)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert layer_map(3, 7) == [0, 3, 6]
    per = normalized_hidden_mse(s, t, mask, reduction="none")
    torch.testing.assert_close(per, _rep_loop(s, t, mask, [0, 3, 6]), rtol=1e-12, atol=0)
    torch.testing.assert_close(normalized_hidden_mse(s, t, mask), per.mean())
    code = normalized_hidden_mse(s, t, mask, include_padding=True, reduction="none")
    torch.testing.assert_close(
        code, _rep_loop(s, t, mask, [0, 3, 6], include_padding=True), rtol=1e-12, atol=0
    )
    explicit = normalized_hidden_mse(s, t, mask, mapping=[0, 1, 2], reduction="none")
    torch.testing.assert_close(explicit, _rep_loop(s, t, mask, [0, 1, 2]), rtol=1e-12, atol=0)
    loss = NormalizedHiddenMSELoss()
    assert loss.taps == ("hidden_states", "mask") and loss.layer_map is None and not loss.include_padding


def test_normalized_hidden_mse_ignores_padding():
    s, t = _rand(1, 2, 3, 4, seed=13), _rand(1, 3, 3, 4, seed=14)
    mask = torch.tensor([[1, 1, 0]])
    base = normalized_hidden_mse(s, t, mask)
    s2 = s.clone()
    s2[:, :, 2] = 100.0
    torch.testing.assert_close(normalized_hidden_mse(s2, t, mask), base, rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: token_kd(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.ones(2, 3)),
        lambda: token_kd(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(3, 3)),
        lambda: token_kd(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 3), T=0.0),
        lambda: hidden_cosine(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.ones(2, 3)),
        lambda: masked_lm(torch.zeros(2, 3, 4), torch.zeros(2, 2, dtype=torch.long)),
        lambda: masked_lm(torch.zeros(1, 2, 4), torch.tensor([[0, 9]])),
        lambda: embedding_mse(torch.zeros(2, 3), torch.zeros(3, 3)),
        lambda: normalized_hidden_mse(torch.zeros(2, 3, 4, 5), torch.zeros(2, 7, 4, 6), torch.ones(2, 4)),
    ],
)
def test_bad_inputs_raise_value_errors(call):
    relkd.set_debug(True)  # with the value checks of debug mode (a label beyond the vocabulary)
    try:
        with pytest.raises(ValueError):
            call()
    finally:
        relkd.set_debug(False)
