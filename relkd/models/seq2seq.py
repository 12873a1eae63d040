r"""Sequence-to-sequence transformers for text: encoder-decoder teachers and students with feature taps.

``seq2seq_transformer`` wraps a ``transformers`` encoder-decoder:

* warm-started from two encoders (``encoder`` / ``decoder``: a model folder, a hub name or ``minilm``,
  the offline all-MiniLM-L6-v2), as ``transformers.EncoderDecoderModel`` builds it (Rothe, Narayan &
  Severyn, "Leveraging Pre-trained Checkpoints for Sequence Generation Tasks", TACL 2020): the decoder
  is the encoder's architecture with causal self-attention, a new cross-attention in every layer and
  a language-model head tied to its word embeddings;
* built from ``BertConfig`` fields (``encoder_config`` / ``decoder_config``) with random weights;
* or a complete pre-trained seq2seq model (``pretrained``: BART, T5, Pegasus, Marian ...).

Input: the ``[B, 2 L]`` ids of a :func:`relkd.data.text.datasets.summarization` item (any tensor whose
trailing dimensions hold ``2 L`` ids, e.g. ``[B, 1, 1, 2 L]``), read as ``[B, 2, L]``: the document,
then the summary's labels (the tokens the decoder predicts, end token included), each right-padded with
the pad id. The decoder reads the labels shifted right behind its start token (teacher forcing); with
``trim`` (default) each half is cut to its longest row. The output is the decoder's prediction of the
first summary token, ``[B, V]``, so that the engine's test top-1 on such data is that token's accuracy;
:meth:`Seq2SeqTransformer.generate` writes whole summaries.

Taps:

========================  ==========================================================================
``token_logits``          the decoder's logits ``[B, T, V]`` at every label position
``mask``                  the label mask ``[B, T]`` (1 = a label to predict, 0 = padding), the rows the
                          token losses read
``decoder_mask``          the decoder-input mask ``[B, T]``: the start token and every non-padding
                          input, one row more than ``mask`` after each shorter summary's end token (the
                          rows Shleifer & Rush's ``distillation.py`` distils: ``decoder_input_ids.ne(pad)``)
``decoder_hidden<i>``     the decoder's embedding output (``i = 0``) and layer i's ``[B, T, D]``
``decoder_states``        all of them stacked, ``[B, layers + 1, T, D]`` (made only when tapped)
``encoder_hidden<i>``     likewise for the encoder, ``[B, S, D]``; ``encoder_states`` stacked
``encoder_mask``          the document mask ``[B, S]``
``embedding``             the decoder's last states averaged over the labels, ``[B, D]``: what the
                          student writes about each document, teacher-forced (also ``penultimate``, so
                          relational losses and ``relkd viz`` read it)
``encoder_embedding``     the encoder's last states averaged over the document
========================  ==========================================================================

Layer subsets: ``decoder_layers: [0, 2, 5]`` keeps those decoder layers of the loaded weights (Shleifer
& Rush's students copy alternating teacher layers, keeping the first and the last:
:func:`relkd.models.text.layers_to_copy`); :func:`copy_seq2seq` copies a teacher's weights into a built
student. ``freeze: [encoder, embeddings]`` excludes parts from training (the authors' ``--freeze_encoder
--freeze_embeds``); frozen parameters keep ``requires_grad`` False, so no stage trains them.

**Shapes:** input ``[B, 2 L]`` int64 -> ``[B, V]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from relkd.hub import MINILM, load_tokenizer, quiet_load, resolve_pretrained, transformers_module
from relkd.models.text import layers_to_copy
from relkd.models.zoo import register

__all__ = ["FREEZABLE", "Seq2SeqTransformer", "copy_seq2seq", "minilm_seq2seq", "seq2seq_transformer"]

FREEZABLE = ("encoder", "decoder", "embeddings")
# Where the transformer blocks of an encoder or decoder live, by family: BART/Pegasus/Marian (layers),
# T5 (block), BERT (encoder.layer), BERT as a decoder (bert.encoder.layer), GPT-2 (transformer.h).
BLOCK_PATHS = (
    "layers",
    "block",
    "encoder.layer",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "transformer.h",
)
SINGLE_TAPS = ("encoder_states", "decoder_states", "embedding", "encoder_embedding", "mask", "decoder_mask",
               "encoder_mask", "token_logits")  # fmt: skip
DEPTH_FIELDS = ("num_hidden_layers", "num_layers", "encoder_layers", "decoder_layers", "num_decoder_layers")


def _blocks_path(part: nn.Module) -> str:
    for path in BLOCK_PATHS:
        try:
            module = part.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return path
    raise ValueError(
        f"no transformer blocks found in {type(part).__name__} (looked for {', '.join(BLOCK_PATHS)})"
    )


def _keep_layers(part: nn.Module, layers: Sequence[int], side: str) -> None:
    path = _blocks_path(part)
    blocks = part.get_submodule(path)
    layers = list(layers)
    if not layers or not all(0 <= i < len(blocks) for i in layers):
        raise ValueError(f"{side}_layers {layers}: the {side} has layers 0..{len(blocks) - 1}")
    parent, _, name = path.rpartition(".")
    kept = nn.ModuleList(blocks[i] for i in layers)
    setattr(part.get_submodule(parent) if parent else part, name, kept)
    for index, block in enumerate(kept):  # attention layers address the generation cache by position
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    for field in DEPTH_FIELDS:
        if isinstance(getattr(part.config, field, None), int):
            setattr(part.config, field, len(layers))


class Seq2SeqTransformer(nn.Module):
    """An encoder-decoder with its taps; see the module docstring.

    Args:
        model: a ``transformers`` encoder-decoder (``EncoderDecoderModel`` or a seq2seq LM).
        pad_token_id, start_token_id, end_token_id: the tokenizer's padding id, the decoder's start
            token and the end token that closes a summary.
        tokenizer: the tokenizer's name (for evaluators that decode summaries).
        generation: default options of :meth:`generate` (``max_new_tokens``, ``num_beams`` ...).
        trim: cut each half of a batch to its longest row.
    """

    def __init__(
        self,
        model: nn.Module,
        pad_token_id: int,
        start_token_id: int,
        end_token_id: int,
        tokenizer: str | None = None,
        generation: Mapping[str, Any] | None = None,
        trim: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id, self.start_token_id, self.end_token_id = (
            int(pad_token_id), int(start_token_id), int(end_token_id)
        )  # fmt: skip
        self.tokenizer, self.trim = tokenizer, trim
        self.generation = {"max_new_tokens": 32, "num_beams": 1, **dict(generation or {})}
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.encoder_depth = len(self.encoder_blocks())
        self.decoder_depth = len(self.decoder_blocks())
        self.taps = nn.ModuleDict(
            {
                "encoder_hidden": nn.ModuleList(nn.Identity() for _ in range(self.encoder_depth + 1)),
                "decoder_hidden": nn.ModuleList(nn.Identity() for _ in range(self.decoder_depth + 1)),
                **{k: nn.Identity() for k in SINGLE_TAPS},
            }
        )
        taps = {f"encoder_hidden{i}": f"taps.encoder_hidden.{i}" for i in range(self.encoder_depth + 1)}
        taps.update({f"decoder_hidden{i}": f"taps.decoder_hidden.{i}" for i in range(self.decoder_depth + 1)})
        taps.update({k: f"taps.{k}" for k in self.taps if not k.endswith("_hidden")})
        taps["penultimate"] = "taps.embedding"
        self.default_taps = taps

    # --- structure ---------------------------------------------------------------------------------

    def encoder_blocks(self) -> nn.ModuleList:
        """The encoder's transformer blocks, in order."""
        encoder = self.model.get_encoder()
        return encoder.get_submodule(_blocks_path(encoder))

    def decoder_blocks(self) -> nn.ModuleList:
        """The decoder's transformer blocks, in order."""
        decoder = self.model.get_decoder()
        return decoder.get_submodule(_blocks_path(decoder))

    def freeze(self, parts: Sequence[str]) -> None:
        """Stop training ``parts``: ``encoder``, ``decoder``, ``embeddings`` (every embedding table,
        the tied output projection included)."""
        unknown = [p for p in parts if p not in FREEZABLE]
        if unknown:
            raise ValueError(f"freeze: {unknown[0]!r} is not one of {FREEZABLE}")
        for part in parts:
            if part == "encoder":
                self.model.get_encoder().requires_grad_(False)
            elif part == "decoder":
                self.model.get_decoder().requires_grad_(False)
            else:
                for module in self.model.modules():
                    if isinstance(module, nn.Embedding):
                        module.requires_grad_(False)

    # --- data --------------------------------------------------------------------------------------

    def split(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, 2 L]`` (or ``[B, ..., 2 L]``) ids -> the documents ``[B, L]`` and the labels ``[B, L]``."""
        ids = inputs.reshape(inputs.shape[0], -1).long()
        if ids.shape[1] % 2:
            raise ValueError(
                f"expected a document and its summary side by side, [B, 2 L] ids, got {tuple(inputs.shape)}"
            )
        return ids.chunk(2, dim=1)

    @staticmethod
    def pack(documents: Tensor, labels: Tensor, pad_token_id: int) -> Tensor:
        """The ``[B, 2 L]`` input of documents ``[B, <= L]`` and labels ``[B, <= L]``, ``L`` the longer."""
        length = max(documents.shape[1], labels.shape[1])
        out = documents.new_full((documents.shape[0], 2 * length), pad_token_id)
        out[:, : documents.shape[1]] = documents
        out[:, length : length + labels.shape[1]] = labels
        return out

    def decoder_inputs(self, labels: Tensor) -> Tensor:
        """The labels shifted right behind the start token: what the decoder reads, ``[B, T]``."""
        start = labels.new_full((labels.shape[0], 1), self.start_token_id)
        return torch.cat([start, labels[:, :-1]], dim=1)

    def _trimmed(self, ids: Tensor) -> Tensor:
        if not self.trim or ids.is_meta or ids.shape[1] <= 1:
            return ids
        return ids[:, : max(1, int((ids != self.pad_token_id).sum(1).max()))]

    # --- forward -----------------------------------------------------------------------------------

    def forward(self, inputs: Tensor) -> Tensor:
        documents, labels = self.split(inputs)
        documents, labels = self._trimmed(documents), self._trimmed(labels)
        keep = documents != self.pad_token_id
        wanted = labels != self.pad_token_id
        decoder_ids = self.decoder_inputs(labels)
        meta = documents.is_meta
        decoder_keep = torch.cat([torch.ones_like(wanted[:, :1]), wanted[:, :-1]], dim=1)
        out = self.model(
            input_ids=documents,
            # transformers builds masks from their values, which meta tensors have not: no mask there
            attention_mask=None if meta else keep.long(),
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=None if meta else decoder_keep.long(),
            output_hidden_states=True,
            use_cache=False,
            return_dict=True,
        )
        taps, states = self.taps, (out.encoder_hidden_states, out.decoder_hidden_states)
        encoder = [tap(h) for tap, h in zip(taps["encoder_hidden"], states[0], strict=True)]
        decoder = [tap(h) for tap, h in zip(taps["decoder_hidden"], states[1], strict=True)]
        for name, states in (("encoder_states", encoder), ("decoder_states", decoder)):
            if self.taps[name]._forward_hooks:  # the stacked copy is made only when tapped
                self.taps[name](torch.stack(states, 1))
        dtype = decoder[-1].dtype
        mask = self.taps["mask"](wanted.to(dtype))
        self.taps["decoder_mask"](decoder_keep.to(dtype))
        encoder_mask = self.taps["encoder_mask"](keep.to(dtype))
        self.taps["embedding"](_masked_mean(decoder[-1], mask))
        self.taps["encoder_embedding"](_masked_mean(encoder[-1], encoder_mask))
        logits = self.taps["token_logits"](out.logits)
        return logits[:, 0]

    @torch.no_grad()
    def generate(self, documents: Tensor, **options: Any) -> Tensor:
        """Summaries of ``documents`` ``[B, S]`` (pad-padded ids), ``[B, T]`` in the labels' format: the
        tokens after the start token, the end token included, padding after it. Options go to
        ``transformers``' ``generate`` over the network's ``generation`` defaults (greedy unless
        ``num_beams`` > 1; never sampled)."""
        documents = self._trimmed(documents.long())
        kwargs = {**self.generation, **options}
        out = self.model.generate(
            input_ids=documents,
            attention_mask=(documents != self.pad_token_id).long(),
            decoder_start_token_id=self.start_token_id,
            bos_token_id=self.start_token_id,
            eos_token_id=self.end_token_id,
            pad_token_id=self.pad_token_id,
            do_sample=False,
            **kwargs,
        )
        summaries = out[:, 1:]
        ended = (summaries == self.end_token_id).long().cumsum(1) - (summaries == self.end_token_id).long()
        return summaries.masked_fill(ended > 0, self.pad_token_id)

    def extra_repr(self) -> str:
        return (
            f"encoder_layers={self.encoder_depth}, decoder_layers={self.decoder_depth}, "
            f"vocab={self.vocab_size}, generation={self.generation}"
        )


def _masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)


def copy_seq2seq(
    student: Seq2SeqTransformer,
    teacher: Seq2SeqTransformer,
    encoder_layers: Sequence[int] | None = None,
    decoder_layers: Sequence[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Initialise ``student`` from ``teacher`` (Shleifer & Rush's ``make_student.py``): every weight
    outside the transformer blocks (embeddings, the language-model head, final norms) as it is, teacher
    encoder blocks ``encoder_layers`` and decoder blocks ``decoder_layers`` into the student's blocks 0,
    1, ... (default :func:`relkd.models.text.layers_to_copy`: alternating layers, the first and the last
    kept). Returns the two layer lists.

    Raises:
        ValueError: different architectures or widths, or a layer list that does not fit.
    """
    maps = {}
    for side, own, source, given in (
        ("encoder", student.encoder_blocks(), teacher.encoder_blocks(), encoder_layers),
        ("decoder", student.decoder_blocks(), teacher.decoder_blocks(), decoder_layers),
    ):
        layers = list(layers_to_copy(len(source), len(own)) if given is None else given)
        if len(layers) != len(own) or not all(0 <= i < len(source) for i in layers):
            raise ValueError(
                f"{side}_layers {layers}: expected {len(own)} teacher layers in 0..{len(source) - 1}"
            )
        paths = {id(m): name for name, m in student.model.named_modules()}
        maps[paths[id(own)]] = layers
    own_state, source_state = student.model.state_dict(), teacher.model.state_dict()
    state = {}
    for key, value in own_state.items():
        source_key = key
        for path, layers in maps.items():
            if key.startswith(path + "."):
                index, _, rest = key[len(path) + 1 :].partition(".")
                source_key = f"{path}.{layers[int(index)]}.{rest}"
        if source_key not in source_state or source_state[source_key].shape != value.shape:
            found = tuple(source_state[source_key].shape) if source_key in source_state else "nothing"
            raise ValueError(
                f"copy_seq2seq: the student's {key} {tuple(value.shape)} has no teacher counterpart "
                f"({source_key}: {found}); student and teacher must share architecture and widths"
            )
        state[key] = source_state[source_key]
    with torch.no_grad():
        student.model.load_state_dict(state)
    encoder_map, decoder_map = maps.values()
    return list(encoder_map), list(decoder_map)


def _part(name: str | None, overrides: Mapping[str, Any], decoder: bool, meta: bool) -> nn.Module:
    """An encoder (``AutoModel``) or a decoder with cross-attention (``AutoModelForCausalLM``)."""
    transformers = transformers_module()
    role = {"is_decoder": True, "add_cross_attention": True} if decoder else {}
    auto = transformers.AutoModelForCausalLM if decoder else transformers.AutoModel
    extra = {} if decoder else {"add_pooling_layer": False}
    if name is None:
        config = transformers.BertConfig(**{**dict(overrides), **role})
        return auto.from_config(config, **extra)
    path = resolve_pretrained(name)
    config = transformers.AutoConfig.from_pretrained(path, **{**dict(overrides), **role})
    if meta:
        return auto.from_config(config, **extra)
    return quiet_load(auto.from_pretrained, path, config=config, **extra)


@register("seq2seq_transformer")
def seq2seq_transformer(
    pretrained: str | None = None,
    encoder: str | None = None,
    decoder: str | None = None,
    encoder_config: Mapping[str, Any] | None = None,
    decoder_config: Mapping[str, Any] | None = None,
    encoder_layers: Sequence[int] | None = None,
    decoder_layers: Sequence[int] | None = None,
    freeze: Sequence[str] = (),
    tokenizer: str | None = None,
    generation: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    trim: bool = True,
) -> Seq2SeqTransformer:
    """An encoder-decoder (see :class:`Seq2SeqTransformer` and the module docstring).

    Args:
        pretrained: a complete seq2seq model (``AutoModelForSeq2SeqLM``: folder or hub name); else the
            model is assembled from ``encoder`` and ``decoder``.
        encoder, decoder: encoder checkpoints (folder, hub name, ``minilm``) warm-starting each side;
            None builds that side from its config with random weights.
        encoder_config, decoder_config: config fields over the checkpoint's (or BERT-base's); the
            decoder's default to the encoder's when neither a decoder nor its config is given.
        encoder_layers, decoder_layers: keep only these blocks (0-based, in order) of each side.
        freeze: parts not trained: ``encoder``, ``decoder``, ``embeddings``.
        tokenizer: whose ids the network uses (default ``pretrained``, else ``encoder``, else ``minilm``).
        generation: default options of :meth:`Seq2SeqTransformer.generate`.
        num_classes: the data set's classes; must be the vocabulary size (summarization data) or None.
    """
    transformers = transformers_module()
    meta = torch.empty(()).device.type == "meta"
    tokenizer = tokenizer or pretrained or encoder or MINILM
    tok = load_tokenizer(tokenizer)
    pad = int(tok.pad_token_id or 0)
    if pretrained is not None:
        path = resolve_pretrained(pretrained)
        if meta:
            config = transformers.AutoConfig.from_pretrained(path)
            model = transformers.AutoModelForSeq2SeqLM.from_config(config)
        else:
            model = quiet_load(transformers.AutoModelForSeq2SeqLM.from_pretrained, path)
        start = model.config.decoder_start_token_id
        end = model.config.eos_token_id
    else:
        enc = _part(encoder, encoder_config or {}, decoder=False, meta=meta)
        dec_config = decoder_config if decoder_config is not None or decoder else encoder_config
        dec = _part(decoder, dec_config or {}, decoder=True, meta=meta)
        model = transformers.EncoderDecoderModel(encoder=enc, decoder=dec)
        start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        model.config.decoder_start_token_id, model.config.pad_token_id = start, pad
    if start is None or end is None:
        raise ValueError(f"the tokenizer {tokenizer!r} has no start or end token for a decoder")
    if encoder_layers is not None:
        _keep_layers(model.get_encoder(), encoder_layers, "encoder")
    if decoder_layers is not None:
        _keep_layers(model.get_decoder(), decoder_layers, "decoder")
    network = Seq2SeqTransformer(model, pad, start, end, tokenizer, generation, trim)
    if num_classes is not None and int(num_classes) != network.vocab_size:
        raise ValueError(
            f"a seq2seq network predicts the {network.vocab_size} tokens of its vocabulary, but the data set "
            f"has {num_classes} classes: use summarization data with the network's tokenizer"
        )
    network.freeze(list(freeze))
    return network


@register("minilm_seq2seq")
def minilm_seq2seq(num_classes: int | None = None, **kwargs: Any) -> Seq2SeqTransformer:
    """all-MiniLM-L6-v2 warm-starting both sides (offline): ``seq2seq_transformer(encoder=minilm,
    decoder=minilm)``; 6 + 6 layers, 384-d, a new cross-attention in each decoder layer."""
    return seq2seq_transformer(encoder=MINILM, decoder=MINILM, num_classes=num_classes, **kwargs)
