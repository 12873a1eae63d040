"""Memory banks, the FIFO queue and negative sampling: exact updates, exact resume, sampling laws."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relkd.memory import MemoryBank, NegativeSampler, QueueBank


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------ sampling
@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=40).filter(lambda v: len(set(v)) > 1),
    seed=st.integers(0, 2**31 - 1),
    num_negatives=st.integers(1, 50),
)
def test_other_class_negatives_never_share_the_anchor_class(labels, seed, num_negatives):
    targets = torch.tensor(labels)
    sampler = NegativeSampler(len(labels), targets)
    torch.manual_seed(seed)
    index = torch.randint(0, len(labels), (int(torch.randint(1, 20, ())),))
    negatives = sampler(index, num_negatives)
    assert negatives.shape == (len(index), num_negatives)
    assert negatives.dtype == torch.long and negatives.device == index.device
    assert ((negatives >= 0) & (negatives < len(labels))).all()
    assert not (targets[negatives] == targets[index].unsqueeze(1)).any()


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=40).filter(lambda v: len(set(v)) > 1),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_other_class_negatives_are_distinct_when_the_other_classes_allow(labels, seed, data):
    targets = torch.tensor(labels)
    fewest = len(labels) - int(torch.bincount(targets).max())
    k = data.draw(st.integers(1, fewest))
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(labels), (7,), generator=g)
    negatives = NegativeSampler(len(labels), targets)(index, k, generator=g)
    assert negatives.shape == (7, k)
    assert not (targets[negatives] == targets[index].unsqueeze(1)).any()
    for row in negatives.tolist():
        assert len(set(row)) == k  # no repeats


ALGORITHMS = ["_floyd", "_smallest_keys"]  # the two exact draws without replacement


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_distinct_law_draws_every_k_subset_of_the_other_classes_equally_often(algorithm):
    # Class 2 holds all but six entries 3, 9, 17, 30, 41, 50; anchor 0 (class 2) may draw only those.
    targets = torch.full((60,), 2)
    allowed = [3, 9, 17, 30, 41, 50]
    targets[allowed] = torch.tensor([0, 1, 1, 0, 5, 1])
    n = 30_000
    g = torch.Generator().manual_seed(0)
    draws = getattr(NegativeSampler(60, targets), algorithm)(torch.zeros(n, dtype=torch.long), 2, g)
    pairs: dict[tuple[int, int], int] = {}
    for a, b in draws.tolist():
        assert a != b and a in allowed and b in allowed
        pairs[(min(a, b), max(a, b))] = pairs.get((min(a, b), max(a, b)), 0) + 1
    assert len(pairs) == math.comb(6, 2)
    p = 1 / math.comb(6, 2)  # binomial standard deviation sqrt(p (1 - p) / n) ~ 0.0014; allow 5
    assert max(abs(c / n - p) for c in pairs.values()) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("by_class", [True, False])
def test_each_distinct_algorithm_gives_k_distinct_allowed_entries(algorithm, by_class):
    targets = torch.arange(300) % 7 if by_class else None
    g = torch.Generator().manual_seed(5)
    index = torch.randint(0, 300, (40,), generator=g)
    draws = getattr(NegativeSampler(300, targets), algorithm)(index, 9, g)
    assert draws.shape == (40, 9) and ((draws >= 0) & (draws < 300)).all()
    assert all(len(set(row)) == 9 for row in draws.tolist())
    if by_class:
        assert not (targets[draws] == targets[index].unsqueeze(1)).any()


def test_floyd_draws_on_the_cpu_when_k_is_small_against_n(monkeypatch):
    sampler = NegativeSampler(320, torch.arange(320) % 4)
    used = []
    for name in ALGORITHMS:
        plain = getattr(sampler, name)
        monkeypatch.setattr(sampler, name, lambda *a, name=name, plain=plain: used.append(name) or plain(*a))
    sampler(torch.arange(3), 10)  # 32 * 10 <= 320
    sampler(torch.arange(3), 11)
    assert used == ["_floyd", "_smallest_keys"]


def test_an_anchor_with_too_few_other_entries_draws_with_replacement_the_others_without():
    targets = torch.tensor([0] * 8 + [1] * 2)  # class 0 leaves 2 entries, class 1 leaves 8
    g = torch.Generator().manual_seed(1)
    index = torch.tensor([0, 8, 3, 9] * 50)
    negatives = NegativeSampler(10, targets)(index, 3, generator=g)
    for anchor, row in zip(index.tolist(), negatives.tolist(), strict=True):
        if targets[anchor] == 0:
            assert set(row) <= {8, 9}  # three draws from two entries: repeats are unavoidable
        else:
            assert len(set(row)) == 3 and max(row) < 8


def test_uniform_law_without_replacement_covers_distinct_entries():
    g = torch.Generator().manual_seed(2)
    draws = NegativeSampler(7)(torch.zeros(4000, dtype=torch.long), 3, generator=g)
    assert all(len(set(row)) == 3 for row in draws.tolist())
    freq = torch.bincount(draws.flatten(), minlength=7).double() / draws.numel()
    assert (freq - 1 / 7).abs().max() < 0.01


def test_with_replacement_repeats_entries():
    g = torch.Generator().manual_seed(3)
    draws = NegativeSampler(5, torch.tensor([0, 1, 1, 1, 1]), replacement=True)(
        torch.zeros(200, dtype=torch.long), 4, generator=g
    )
    assert (draws >= 1).all()
    assert any(len(set(row)) < 4 for row in draws.tolist())


def test_a_seeded_generator_fixes_the_draws_and_the_global_rng_is_untouched():
    sampler = NegativeSampler(50, torch.arange(50) % 5)
    index = torch.arange(6)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = sampler(index, 9, generator=torch.Generator().manual_seed(11))
    b = sampler(index, 9, generator=torch.Generator().manual_seed(11))
    c = sampler(index, 9, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before)


def test_sampling_runs_on_the_device_without_host_synchronisation(device):
    targets = (torch.arange(200) % 7).to(device)
    sampler = NegativeSampler(200, targets).to(device)
    index = torch.arange(0, 200, 9, device=device)
    sync = device.type == "cuda"
    if sync:
        torch.cuda.set_sync_debug_mode("error")
    try:
        negatives = sampler(index, 150)  # classes 0-3 leave 171 entries, 4-6 leave 172: all distinct
        mixed = sampler(index, 172)  # classes 0-3 draw with replacement, 4-6 without
    finally:
        if sync:
            torch.cuda.set_sync_debug_mode(0)
    assert negatives.device == index.device and mixed.device == index.device
    assert not (targets[negatives] == targets[index].unsqueeze(1)).any()
    assert not (targets[mixed] == targets[index].unsqueeze(1)).any()


def test_other_class_law_is_uniform_over_the_other_classes():
    targets = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 5])
    torch.manual_seed(0)
    draws = NegativeSampler(9, targets, replacement=True)(torch.tensor([3]), 90_000)[0]
    freq = torch.bincount(draws, minlength=9).double() / draws.numel()
    allowed = targets != 2
    expected = 1.0 / int(allowed.sum())  # six entries of other classes, 1/6 each
    assert (freq[~allowed] == 0).all()
    # binomial standard deviation sqrt(p (1 - p) / n) ~ 0.0012; allow 5 of them
    assert (freq[allowed] - expected).abs().max() < 5 * math.sqrt(expected / 90_000)


def test_uniform_law_covers_every_entry():
    torch.manual_seed(0)
    draws = NegativeSampler(7, replacement=True)(torch.zeros(3, dtype=torch.long), 20_000)
    freq = torch.bincount(draws.flatten(), minlength=7).double() / draws.numel()
    assert (freq - 1 / 7).abs().max() < 0.01


def test_sampling_is_reproducible_under_manual_seed():
    sampler = NegativeSampler(30, torch.arange(30) % 3)
    index = torch.arange(5)
    torch.manual_seed(7)
    a = sampler(index, 11)
    torch.manual_seed(7)
    b = sampler(index, 11)
    assert torch.equal(a, b)


def test_hidden_labels_are_classes_of_their_own():
    # entries 2 and 3 are unlabelled (-1): any anchor may draw them; as anchors they exclude only themselves
    targets = torch.tensor([0, 0, -1, -1, 1, 1])
    sampler = NegativeSampler(6, targets, replacement=True)
    torch.manual_seed(0)
    drawn = sampler(torch.tensor([0, 2, 4]), 400)
    assert set(drawn[0].tolist()) == {2, 3, 4, 5}  # class 0: the unlabelled and class 1
    assert set(drawn[1].tolist()) == {0, 1, 3, 4, 5}  # an unlabelled anchor: everything but itself
    assert set(drawn[2].tolist()) == {0, 1, 2, 3}
    distinct = NegativeSampler(6, targets)(torch.tensor([2]), 5)
    assert sorted(distinct[0].tolist()) == [0, 1, 3, 4, 5]


def test_sampler_tables_are_not_checkpoint_state():
    assert NegativeSampler(6, torch.tensor([0, 1, 0, 1, 2, 2])).state_dict() == {}


@pytest.mark.parametrize(
    "targets,match",
    [
        (torch.zeros(5, dtype=torch.long), "at least two classes"),
        (torch.tensor([0, 1, 0]), r"shape \[5\]"),
        (torch.rand(5), "integer class labels"),
    ],
)
def test_sampler_rejects_bad_targets(targets, match):
    with pytest.raises((ValueError, TypeError), match=match):
        NegativeSampler(5, targets)


# -------------------------------------------------------------------------------------- memory bank
def test_bank_starts_uniform_within_the_authors_bound():
    torch.manual_seed(0)
    bank = MemoryBank(200, 12)
    bound = 1 / math.sqrt(12 / 3)
    assert bank.memory.abs().max() <= bound
    assert bank.memory.min() < -0.9 * bound and bank.memory.max() > 0.9 * bound


def test_bank_update_applies_the_momentum_exactly():
    torch.manual_seed(0)
    bank = MemoryBank(10, 4, momentum=0.9).double()
    before = bank.memory.clone()
    index = torch.tensor([7, 2, 5])
    x = unit(torch.randn(3, 4, dtype=torch.float64))
    bank.update(index, x)
    expected = before.clone()
    for row, i in enumerate(index.tolist()):
        v = 0.9 * before[i] + 0.1 * x[row]
        expected[i] = v / math.sqrt(float((v * v).sum()))
    torch.testing.assert_close(bank.memory, expected, rtol=1e-14, atol=0)
    untouched = torch.tensor([i not in (7, 2, 5) for i in range(10)])
    assert torch.equal(bank.memory[untouched], before[untouched])


def test_bank_update_writes_in_place_and_a_graph_that_saved_the_bank_says_so():
    # The losses form their gradients before the update (tests/test_perf_contracts.py); a graph of
    # one's own that saved the bank gets autograd's error, not a silently wrong gradient.
    torch.manual_seed(0)
    bank = MemoryBank(6, 3)
    memory, address = bank.memory, bank.memory.data_ptr()
    anchor = torch.randn(2, 3, requires_grad=True)
    scores = anchor @ bank.memory.t()
    bank.update(torch.tensor([0, 1]), torch.randn(2, 3))
    assert bank.memory is memory and bank.memory.data_ptr() == address
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scores.sum().backward()


def test_bank_round_trips_through_state_dict_bit_exactly():
    torch.manual_seed(0)
    bank = MemoryBank(8, 5)
    bank.update(torch.tensor([1, 4]), torch.randn(2, 5))
    fresh = MemoryBank(8, 5)
    fresh.load_state_dict(bank.state_dict())
    assert torch.equal(fresh.memory, bank.memory)


def test_bank_rejects_a_momentum_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MemoryBank(4, 2, momentum=1.0)


# -------------------------------------------------------------------------------------------- queue
def test_queue_overwrites_the_oldest_slots_and_wraps():
    torch.manual_seed(0)
    queue = QueueBank(5, 2)
    initial = queue.memory.clone()
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    queue.update(torch.arange(3), a)
    queue.update(torch.arange(3), b)
    assert torch.equal(queue.memory[0], b[2])
    assert torch.equal(queue.memory[1:3], a[1:3])
    assert torch.equal(queue.memory[3:5], b[0:2])
    assert int(queue.ptr) == 1
    assert not torch.equal(queue.memory, initial)


def test_queue_positive_is_the_current_embedding_detached():
    x = torch.randn(3, 4, requires_grad=True)
    pos = QueueBank(8, 4).positive(torch.arange(3), x)
    assert torch.equal(pos, x.detach()) and not pos.requires_grad


def test_queue_round_trips_memory_and_pointer():
    torch.manual_seed(0)
    queue = QueueBank(6, 3)
    queue.update(torch.arange(4), torch.randn(4, 3))
    fresh = QueueBank(6, 3)
    fresh.load_state_dict(queue.state_dict())
    assert torch.equal(fresh.memory, queue.memory) and int(fresh.ptr) == 4


def test_queue_rejects_a_batch_larger_than_itself():
    with pytest.raises(ValueError, match="queue_size at least as large as the batch"):
        QueueBank(2, 3).update(torch.arange(3), torch.randn(3, 3))
