"""BipartiteGraph / cross_cosine: values against a float64 loop, zero vectors, gradients, the dtype policy,
bad shapes, and the reuse of each side's RelationGraph."""

from __future__ import annotations

import math

import pytest
import torch

import relkd.graphs.ops as ops
from relkd.graphs import BipartiteGraph, RelationGraph, cross_cosine


def cosine_loops(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Textbook cosine of every (row of a, row of b) pair; 0 when either vector is zero."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            dot = sum(float(a[i, d]) * float(b[j, d]) for d in range(a.shape[1]))
            na = math.sqrt(sum(float(a[i, d]) ** 2 for d in range(a.shape[1])))
            nb = math.sqrt(sum(float(b[j, d]) ** 2 for d in range(b.shape[1])))
            out[i, j] = 0.0 if na == 0 or nb == 0 else dot / (na * nb)
    return out


def pair(n: int = 7, m: int = 4, d: int = 5, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype)


def test_cosine_matches_the_loop_reference():
    a, b = pair()
    got = cross_cosine(a, b)
    assert got.shape == (7, 4) and got.dtype == torch.float64
    torch.testing.assert_close(got, cosine_loops(a, b), rtol=1e-12, atol=1e-14)


def test_gram_is_the_cross_inner_product():
    a, b = pair()
    expected = torch.tensor(
        [[sum(float(x) * float(y) for x, y in zip(r, c, strict=True)) for c in b] for r in a],
        dtype=torch.float64,
    )
    torch.testing.assert_close(BipartiteGraph(a, b).gram, expected, rtol=1e-12, atol=1e-12)


def test_zero_vectors_give_zero_cosine_and_finite_gradients():
    a, b = pair(4, 3)
    a[1] = 0.0
    b[2] = 0.0
    a.requires_grad_()
    c = cross_cosine(a, b)
    assert torch.all(c[1] == 0) and torch.all(c[:, 2] == 0)
    torch.testing.assert_close(c.detach(), cosine_loops(a.detach(), b), rtol=1e-12, atol=1e-14)
    c.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_gradcheck_both_sides():
    a, b = pair(5, 3, 4)
    assert torch.autograd.gradcheck(cross_cosine, (a.requires_grad_(), b.requires_grad_()))


def test_batched_graphs_relate_matching_batch_entries():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 5, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, generator=g).double()
    got = cross_cosine(a, b)
    assert got.shape == (2, 5, 4)
    for k in range(2):
        torch.testing.assert_close(got[k], cosine_loops(a[k], b[k]), rtol=1e-12, atol=1e-14)


def test_low_precision_is_promoted_to_float32():
    a, b = pair(dtype=torch.float32)
    got = cross_cosine(a.bfloat16(), b.bfloat16())
    assert got.dtype == torch.float32
    # float32 relations of the bfloat16-rounded inputs, not a bfloat16 product
    torch.testing.assert_close(
        got.double(), cosine_loops(a.bfloat16().float(), b.bfloat16().float()), atol=1e-6, rtol=0
    )


def test_reads_each_sides_cached_norms(monkeypatch):
    a, b = pair()
    ga, gb = RelationGraph(a), RelationGraph(b)
    _ = ga.cosine, gb.cosine  # each side's Gram matrix and inverse norms, computed once
    calls = []
    gram = ops.gram
    monkeypatch.setattr(ops, "gram", lambda x: calls.append(x.shape) or gram(x))
    graph = BipartiteGraph(ga, gb)
    got = graph.cosine
    assert calls == []  # no side recomputes its Gram matrix for the norms
    assert graph.source is ga and graph.target is gb
    torch.testing.assert_close(got, cosine_loops(a, b), rtol=1e-12, atol=1e-14)
    assert graph.cosine is got  # cached


def test_detach_cuts_autograd():
    a, b = pair()
    graph = BipartiteGraph(a.requires_grad_(), b)
    assert graph.cosine.requires_grad and not graph.detach().cosine.requires_grad


@pytest.mark.parametrize(
    "a, b, match",
    [
        (torch.randn(4, 3), torch.randn(5, 2), r"same D .* got \(4, 3\) and \(5, 2\)"),
        (torch.randn(2, 4, 3), torch.randn(3, 5, 3), r"batch shape, got \(2, 4, 3\) and \(3, 5, 3\)"),
        (torch.randn(4), torch.randn(5, 4), r"\[N, D\]"),
    ],
)
def test_bad_shapes_raise(a, b, match):
    with pytest.raises(ValueError, match=match):
        cross_cosine(a, b)


def test_non_tensor_raises():
    with pytest.raises(TypeError, match="source as a tensor or RelationGraph, got list"):
        BipartiteGraph([[1.0, 2.0]], torch.randn(2, 2))
