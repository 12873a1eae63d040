"""Losses under ``torch.compile`` and autocast, and the cost of a step that combines several losses.

* compile: no graph break in any loss path (``torch._dynamo.explain``), and the compiled loss gives
  eager's value and gradient: through AOTAutograd (``aot_eager``, fast) for every registered loss,
  through inductor (slow) for the relational forms, which also guards the generated backward;
* autocast: relations are computed in float32 from bfloat16 features, so a loss inside a bfloat16
  autocast region equals the loss of the same features upcast, outside it;
* one Gram product per side when RKD, SP, CC and PKT share their graphs.
"""

from __future__ import annotations

import pytest
import torch

import relkd.graphs.ops as ops
import relkd.losses as L
from relkd.graphs import RelationGraph
from relkd.losses import functional as F

FORMS = {
    "kd": F.kd,
    "rkd_distance": F.rkd_distance,
    "rkd_angle": F.rkd_angle,
    "sp": F.similarity_preserving,
    "cc": F.correlation_congruence,
    "pkt": F.pkt,
}
RELATIONAL = [name for name in FORMS if name != "kd"]


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pair(device: torch.device, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(20, 9, generator=g, dtype=dtype).to(device).requires_grad_()
    return s, torch.randn(20, 9, generator=g, dtype=dtype).to(device)


def _breaks(explanation) -> list[str]:
    return [f"{r.reason} at {r.user_stack[-1] if r.user_stack else '?'}" for r in explanation.break_reasons]


@pytest.mark.parametrize("name", FORMS)
def test_functional_form_has_no_graph_break(name, device):
    explanation = torch._dynamo.explain(FORMS[name])(*_pair(device))
    assert explanation.graph_break_count == 0, _breaks(explanation)


def test_distill_has_no_graph_break(loss_case, loss_name, device):
    case = loss_case(loss_name).to(device, torch.float32)
    explanation = torch._dynamo.explain(case.loss.distill)(case.student, case.teacher, case.batch)
    assert explanation.graph_break_count == 0, _breaks(explanation)


def _value_and_grads(case) -> tuple[torch.Tensor, list[torch.Tensor]]:
    value = case()
    grads = torch.autograd.grad(value, case.leaves, allow_unused=True)
    return value.detach(), [g for g in grads if g is not None]


@pytest.mark.slow
def test_distill_compiles_to_eager_values(loss_case, loss_name, device):
    base = loss_case(loss_name)
    eager, compiled = base.to(device, torch.float64), base.to(device, torch.float64)
    compiled.loss.distill = torch.compile(compiled.loss.distill, backend="aot_eager", fullgraph=True)
    (v1, g1), (v2, g2) = _value_and_grads(eager), _value_and_grads(compiled)
    torch.testing.assert_close(v2, v1, rtol=1e-10, atol=1e-12)
    for got, expected in zip(g2, g1, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", RELATIONAL)
def test_inductor_gives_eager_values_and_gradients(name, device):
    s, t = _pair(device)
    expected = FORMS[name](s, t)
    (expected_grad,) = torch.autograd.grad(expected, s)
    value = torch.compile(FORMS[name], fullgraph=True)(s, t)
    (grad,) = torch.autograd.grad(value, s)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", FORMS)
def test_relations_stay_float32_under_autocast(name, device):
    s, t = (x.detach().to(torch.bfloat16) for x in _pair(device, torch.float32))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        value = FORMS[name](s, t)
    expected = FORMS[name](s.float(), t.float())
    assert value.dtype == torch.float32
    # A bfloat16 Gram matrix would be off by about 1e-2.
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)


def test_every_loss_runs_under_autocast(loss_case, loss_name, device):
    case = loss_case(loss_name).to(device, torch.float32)
    expected = case().detach()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        value = case()
    value.backward()
    grads = [x.grad for x in case.leaves if x.grad is not None]
    assert torch.isfinite(value) and grads and all(bool(torch.isfinite(g).all()) for g in grads)
    torch.testing.assert_close(value.float(), expected, rtol=2e-2, atol=1e-4)


def test_losses_sharing_graphs_build_one_gram_per_side(monkeypatch):
    calls = []
    gram = ops.gram
    monkeypatch.setattr(ops, "gram", lambda x: calls.append(x.requires_grad) or gram(x))
    s, t = _pair(torch.device("cpu"))
    gs, gt = RelationGraph(s), RelationGraph(t)
    total = sum(loss(gs, gt) for loss in (L.RKDLoss(), L.SPLoss(), L.CCLoss(), L.PKTLoss()))
    total.backward()
    assert sorted(calls) == [False, True]


def test_a_teacher_graph_with_gradients_is_detached_once(monkeypatch):
    calls = []
    gram = ops.gram
    monkeypatch.setattr(ops, "gram", lambda x: calls.append(x.requires_grad) or gram(x))
    s, t = _pair(torch.device("cpu"))
    gs, gt = RelationGraph(s), RelationGraph(t.requires_grad_())
    total = sum(loss(gs, gt) for loss in (L.RKDLoss(), L.SPLoss(), L.PKTLoss()))
    total.backward()
    assert sorted(calls) == [False, True] and t.grad is None
