"""Text networks: taps, padding invariance, the layer copy (a copied block gives its teacher block's
outputs), the published layer maps, the masked-LM head's switch and a forward on the meta device."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import BertConfig, BertModel  # noqa: E402

from relkd.models import FeatureTaps, resolve_taps  # noqa: E402
from relkd.models.text import TextTransformer, copy_layers, layers_to_copy  # noqa: E402

TINY = {"hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 32, "vocab_size": 120, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}  # fmt: skip
PAD, MASK = 0, 103


def tiny(layers=4, head="mlm", seed=0, **kw) -> TextTransformer:
    torch.manual_seed(seed)
    encoder = BertModel(BertConfig(**{**TINY, "num_hidden_layers": layers}), add_pooling_layer=False)
    classes = None if head == "mlm" else kw.pop("num_classes", 3)
    return TextTransformer(encoder, head=head, num_classes=classes, mask_token_id=MASK, pad_token_id=PAD,
                           **kw).eval()  # fmt: skip


def ids(*rows, length=10):
    out = torch.full((len(rows), length), PAD)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def test_published_layer_maps():
    assert layers_to_copy(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's extract_distilbert.py
    assert layers_to_copy(12, 3) == [0, 6, 11] and layers_to_copy(6, 3) == [0, 2, 5]
    assert layers_to_copy(4, 2) == [0, 3] and layers_to_copy(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        layers_to_copy(3, 4)


def test_a_copied_block_gives_its_teacher_blocks_outputs():
    teacher, student = tiny(4, seed=1), tiny(2, seed=2)
    assert copy_layers(student, teacher, [1, 3]) == [1, 3]
    h = torch.randn(2, 5, 16)
    for own, source in zip(student.layer_blocks(), [1, 3], strict=True):
        out_s, out_t = own(h), teacher.layer_blocks()[source](h)
        out_s = out_s[0] if isinstance(out_s, tuple) else out_s
        out_t = out_t[0] if isinstance(out_t, tuple) else out_t
        torch.testing.assert_close(out_s, out_t, rtol=0, atol=0)
    x = ids([5, 6, 7], [8, 9])
    torch.testing.assert_close(student.encoder.embeddings(x), teacher.encoder.embeddings(x), rtol=0, atol=0)
    assert torch.equal(student.mlm.bias, teacher.mlm.bias)


def test_the_first_copied_layer_reproduces_the_teachers_first_hidden_state():
    teacher, student = tiny(4, seed=1), tiny(2, seed=2)
    copy_layers(student, teacher)  # [0, 3]
    x = ids([5, 6, 7, 8], [9, 10])
    names = ["hidden1", "hidden2"]
    with (
        FeatureTaps(teacher, resolve_taps(teacher, ["hidden1", "hidden4"])) as t,
        FeatureTaps(student, resolve_taps(student, names)) as s,
    ):
        teacher(x)
        student(x)
        torch.testing.assert_close(s["hidden1"], t["hidden1"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="same width"):
        copy_layers(tiny(2, seed=3), _wider())


def _wider():
    return TextTransformer(
        BertModel(BertConfig(**{**TINY, "hidden_size": 32}), add_pooling_layer=False), "mlm"
    )


def test_padding_changes_nothing():
    net = tiny(2, head="classifier")
    short, long = ids([5, 6, 7], length=4), ids([5, 6, 7], length=12)
    with FeatureTaps(net, resolve_taps(net, ["embedding", "mask", "last_hidden"])) as taps:
        a = net(short)
        emb_a, hid_a = taps["embedding"], taps["last_hidden"]
        b = net(long)
        assert taps["mask"].shape == (1, 3)  # trimmed to the longest row
        torch.testing.assert_close(taps["embedding"], emb_a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(taps["last_hidden"], hid_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    untrimmed = tiny(2, head="classifier", trim=False)
    torch.testing.assert_close(untrimmed(long), untrimmed(short), rtol=1e-5, atol=1e-6)


def test_taps_and_outputs():
    net = tiny(2, head="mlm", attentions=True)
    x = ids([5, MASK, 7, 8], [9, 10, MASK])
    names = ["hidden0", "hidden2", "last_hidden", "hidden_states", "attention1", "embedding", "penultimate",
             "mask", "token_logits"]  # fmt: skip
    with FeatureTaps(net, resolve_taps(net, names)) as taps:
        out = net(x)
        f = taps.features
        assert f["hidden_states"].shape == (2, 3, 4, 16) and f["attention1"].shape == (2, 2, 4, 4)
        assert f["token_logits"].shape == (2, 4, 120) and f["mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
        # the output is the prediction at each row's first [MASK]
        torch.testing.assert_close(out, f["token_logits"][[0, 1], [1, 2]])
        manual = (f["last_hidden"] * f["mask"][..., None]).sum(1) / f["mask"].sum(1, keepdim=True)
        torch.testing.assert_close(f["embedding"], manual)
    assert net.mlm.embeddings[0].weight is net.encoder.get_input_embeddings().weight  # tied
    assert tiny(2, head="embedding")(x).shape == (2, 16)


def test_the_mlm_head_switch_is_saved_with_the_weights():
    net = tiny(2, head="classifier", mlm_head=True)
    x = ids([5, 6, 7])
    with FeatureTaps(net, resolve_taps(net, ["token_logits"])) as taps:
        net(x)
        assert "token_logits" in taps.features
        net.disable_mlm_head()
        net(x)
        assert "token_logits" not in taps.features
    fresh = tiny(2, head="classifier", mlm_head=True)
    fresh.load_state_dict(net.state_dict())
    assert not fresh.mlm_active and net.mlm_logits(torch.zeros(1, 2, 16)).shape == (1, 2, 120)
    with pytest.raises(RuntimeError, match="no masked-LM head"):
        tiny(2, head="classifier").mlm_logits(torch.zeros(1, 2, 16))


def test_a_forward_on_the_meta_device_gives_shapes():
    with torch.device("meta"):
        net = TextTransformer(BertModel(BertConfig(**TINY), add_pooling_layer=False), "classifier", 3)
    out = net(torch.empty(2, 1, 1, 10, device="meta"))  # how shape checks build a text input
    assert out.shape == (2, 3) and out.is_meta


def test_registered_constructor_from_a_config_and_bad_heads():
    from relkd import models

    net = models.create("text_transformer", num_classes=4, config=TINY, layers=[0, 2])
    assert net.num_layers == 2 and net.classifier.out_features == 4
    assert net.default_taps["penultimate"] == "taps.embedding"
    with pytest.raises(ValueError, match="head"):
        models.create("text_transformer", num_classes=4, config=TINY, head="pooler")
    with pytest.raises(ValueError, match="vocabulary"):
        models.create("text_transformer", num_classes=4, config=TINY, head="mlm")
