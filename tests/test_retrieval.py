"""Cross-model retrieval: a hand-ranked case, a per-query float64 reference with Python sorting, block
sizes, the self-match rule, and ``embed`` on a small model with its mode and hooks restored."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from relkd.evaluation import cross_model_retrieval, embed


def hand_case():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    gallery_labels = torch.tensor([0, 1, 0, 1])
    queries = torch.tensor([[1.0, 0.1], [-0.1, 1.0], [1.0, 1.2]])
    query_labels = torch.tensor([0, 0, 1])
    return queries, query_labels, gallery, gallery_labels


def test_hand_ranked_case():
    # Cosine rankings, worked out by hand:
    #   q0 (label 0): g0 (0), g3 (1), g1 (1), g2 (0) -> hit at 1; AP = (1/1 + 2/4) / 2 = 0.75
    #   q1 (label 0): g1 (1), g3 (1), g2 (0), g0 (0) -> first hit at 3; AP = (1/3 + 2/4) / 2
    #   q2 (label 1): g3 (1), g1 (1), g0, g2        -> hit at 1; AP = 1
    out = cross_model_retrieval(*hand_case(), ks=(1, 2, 3))
    assert out["top1"] == pytest.approx(200.0 / 3)
    assert out["top2"] == pytest.approx(200.0 / 3)
    assert out["top3"] == pytest.approx(100.0)
    assert out["map"] == pytest.approx(100.0 * (0.75 + (1 / 3 + 0.5) / 2 + 1.0) / 3)
    assert set(out) == {"top1", "top2", "top3", "map"}


def test_queries_without_a_relevant_item_are_left_out():
    q, qy, g, gy = hand_case()
    extra = cross_model_retrieval(torch.cat([q, q[:1]]), torch.cat([qy, torch.tensor([7])]), g, gy, ks=(1, 3))
    assert extra == pytest.approx(cross_model_retrieval(q, qy, g, gy, ks=(1, 3)))
    with pytest.raises(ValueError, match="no query has a relevant item"):
        cross_model_retrieval(q, torch.full((3,), 7), g, gy)


def reference(q, qy, g, gy, ks, metric, q_ids=None, g_ids=None):
    """Per query: score every gallery item in float64, sort with Python (ties by gallery order)."""
    hits, ap_sum, counted = [0] * len(ks), 0.0, 0
    for i in range(q.shape[0]):
        scores = []
        for j in range(g.shape[0]):
            if q_ids is not None and q_ids[i] == g_ids[j]:
                continue
            a, b = q[i].tolist(), g[j].tolist()
            if metric == "cosine":
                s = sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
                    sum(x * x for x in a) * sum(y * y for y in b)
                )
            else:
                s = -sum((x - y) ** 2 for x, y in zip(a, b, strict=True))
            scores.append((-s, j))
        ranked = [int(gy[j]) == int(qy[i]) for _, j in sorted(scores)]
        if not any(ranked):
            continue
        counted += 1
        first = ranked.index(True) + 1
        for n, k in enumerate(ks):
            hits[n] += first <= k
        ranks = [r + 1 for r, rel in enumerate(ranked) if rel]
        ap_sum += sum((n + 1) / r for n, r in enumerate(ranks)) / len(ranks)
    return {
        **{f"top{k}": 100.0 * h / counted for k, h in zip(ks, hits, strict=True)},
        "map": 100.0 * ap_sum / counted,
    }


@pytest.fixture
def random_case():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(13, 6, generator=g, dtype=torch.float64)
    gal = torch.randn(29, 6, generator=g, dtype=torch.float64)
    return q, torch.randint(0, 4, (13,), generator=g), gal, torch.randint(0, 4, (29,), generator=g)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_matches_reference(random_case, metric):
    ks = (1, 5, 10)
    out = cross_model_retrieval(*random_case, ks=ks, metric=metric)
    assert out == pytest.approx(reference(*random_case, ks, metric), rel=1e-12)


@pytest.mark.parametrize("block_size", [1, 4, 13, 1000])
def test_blocks_give_the_full_result(random_case, block_size):
    full = cross_model_retrieval(*random_case, ks=(1, 3), block_size=None)
    assert cross_model_retrieval(*random_case, ks=(1, 3), block_size=block_size) == full


def test_self_matches_are_ignored_when_both_sides_hold_the_same_images(random_case):
    q, qy, _, _ = random_case
    ids = torch.arange(13)
    out = cross_model_retrieval(q, qy, q, qy, ks=(1, 5), query_ids=ids, gallery_ids=ids, block_size=3)
    assert out == pytest.approx(reference(q, qy, q, qy, (1, 5), "cosine", ids, ids), rel=1e-12)
    # without the rule every query finds itself first
    assert cross_model_retrieval(q, qy, q, qy, ks=(1,))["top1"] == 100.0


def test_bad_inputs(random_case):
    q, qy, g, gy = random_case
    with pytest.raises(ValueError, match=r"\(13, 6\) and \(29, 5\)"):
        cross_model_retrieval(q, qy, g[:, :5], gy)
    with pytest.raises(ValueError, match="gallery labels of shape"):
        cross_model_retrieval(q, qy, g, gy[:3])
    with pytest.raises(ValueError, match="metric"):
        cross_model_retrieval(q, qy, g, gy, metric="dot")
    with pytest.raises(ValueError, match="ks"):
        cross_model_retrieval(q, qy, g, gy, ks=(0,))
    with pytest.raises(ValueError, match="both query_ids and gallery_ids"):
        cross_model_retrieval(q, qy, g, gy, query_ids=torch.arange(13))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_embed_runs_in_eval_mode_and_restores_the_model():
    torch.manual_seed(0)
    model = Tiny().double().train()
    x = torch.randn(7, 3, dtype=torch.float64)
    loader = [
        {"input": x[:4], "target": torch.tensor([0, 1, 0, 1])},
        {"input": x[4:], "target": torch.tensor([1, 1, 0])},
    ]
    feats, labels = embed(model, loader)
    hidden = torch.relu(x @ model.body[0].weight.T + model.body[0].bias)  # dropout off in eval mode
    expected = hidden / hidden.norm(dim=1, keepdim=True)
    torch.testing.assert_close(feats, expected, rtol=1e-12, atol=1e-12)
    assert labels.tolist() == [0, 1, 0, 1, 1, 1, 0]
    assert model.training and model.body[2].training
    assert not model._forward_pre_hooks and not model.fc._forward_pre_hooks
    logits, _ = embed(model, loader, tap="logits")
    out = hidden @ model.fc.weight.T + model.fc.bias
    torch.testing.assert_close(logits, out / out.norm(dim=1, keepdim=True), rtol=1e-12, atol=1e-12)
    with pytest.raises(KeyError, match="no default tap or module"):
        embed(model, loader, tap="nope")
    with pytest.raises(ValueError, match="no batch"):
        embed(model, [])
