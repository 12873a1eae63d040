"""Build a run's parts from its config: device, networks, data, loaders, config hashes.

Models get what the dataset decides (``num_classes``, and ``in_channels`` / ``in_shape`` when their
constructor takes them) unless the config's ``args`` set it. Datasets are loaded once per process and
cut into the seed's labelled subset per run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from relkd import distributed as D
from relkd import models
from relkd.data import DataBundle, build, make_loader
from relkd.data.seeding import derive_seed
from relkd.data.subset import split_bundle
from relkd.train.batches import TrainBatches
from relkd.train.checkpoint import CheckpointError, load_checkpoint, load_state
from relkd.train.parallel import per_rank

__all__ = [
    "build_model",
    "config_hash",
    "load_bundle",
    "load_weights",
    "make_batches",
    "make_eval_loader",
    "resolve_device",
    "used_teachers",
]

# Stream number of the transfer loader's seed: its order must not mirror the labelled loader's.
TRANSFER_STREAM = 2


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as ``torch.device`` reads it. Under
    ``torchrun`` a CUDA device without an index is this process's, ``cuda:LOCAL_RANK``."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None and D.is_distributed():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def build_model(spec: Any, bundle: DataBundle) -> nn.Module:
    """``models.create(spec.model, **spec.args)`` with the dataset's classes and input shape."""
    kwargs = dict(spec.args)
    kwargs.setdefault("num_classes", bundle.num_classes)
    if ":" not in spec.model:
        params = inspect.signature(models.MODELS.get(spec.model)).parameters
        if not {"in_channels", "in_shape"} & set(kwargs):
            if "in_shape" in params:
                kwargs["in_shape"] = (bundle.in_channels, *bundle.image_size)
            elif "in_channels" in params:
                kwargs["in_channels"] = bundle.in_channels
    network = models.create(spec.model, **kwargs)
    if getattr(spec, "init", None):
        init_weights(spec.init, network, getattr(spec, "init_skip", ()))
    return network


def init_weights(path: str, network: nn.Module, skip: Sequence[str] = (), name: str = "student") -> None:
    """Load the weights of ``path`` into ``network`` (see :func:`load_weights`), except the parameters
    and buffers whose names start with one of ``skip``, which keep their values.

    Raises:
        CheckpointError: unreadable, or weights that do not fit the network outside ``skip``.
    """
    state = _state_of(path, name)
    kept = network.state_dict()
    merged = {
        k: (kept[k] if any(k == s or k.startswith(s + ".") for s in skip) else state.get(k)) for k in kept
    }
    missing = sorted(k for k, v in merged.items() if v is None)
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(
            f"{path}: no weights for {', '.join(missing[:8])}{more}: the checkpoint holds another "
            "architecture; list the parts to keep at random initialisation in init_skip"
        )
    load_state(path, "initial", network, merged)


@functools.lru_cache(maxsize=4)
def _full_bundle(name: str, root: str | None, augment: bool, options: str) -> DataBundle:
    return build(name, root=root, augment=augment, **json.loads(options))


def load_bundle(data: Any, seed: int) -> DataBundle:
    """The dataset of ``data`` (a :class:`relkd.config.DataConfig`) for the run seed ``seed``: its
    labelled subset and transfer set (cut to ``transfer_size``) chosen with ``data.subset_seed``, else
    ``seed``."""
    bundle = _full_bundle(data.name, data.root, data.augment, json.dumps(data.options, sort_keys=True))
    if data.classes is not None:
        bundle = _keep_classes(bundle, data.classes)
    if data.train_subset is None:
        return bundle
    subset_seed = seed if data.subset_seed is None else data.subset_seed
    bundle = split_bundle(bundle, data.train_subset, data.unlabeled, subset_seed)
    if bundle.transfer is None or data.transfer_size is None or data.transfer_size >= len(bundle.transfer):
        return bundle
    generator = torch.Generator().manual_seed(derive_seed(subset_seed, TRANSFER_STREAM))
    keep = torch.randperm(len(bundle.transfer), generator=generator)[: data.transfer_size].sort().values
    return dataclasses.replace(bundle, transfer=bundle.transfer.subset(keep))


def _keep_classes(bundle: DataBundle, classes: list[int]) -> DataBundle:
    """The bundle's training and test images of ``classes`` only (labels unchanged)."""
    from relkd.config import ConfigError

    bad = [c for c in classes if not 0 <= c < bundle.num_classes]
    if bad:
        raise ConfigError(
            f"data.classes: {bad[0]} is not a class of {bundle.name} (0 .. {bundle.num_classes - 1})"
        )
    if not all(hasattr(d, "subset") for d in (bundle.train, bundle.test)):
        raise ConfigError(f"data.classes: the {bundle.name} data set cannot be cut to some classes")
    wanted = torch.tensor(sorted(set(classes)))

    def keep(dataset: Any) -> Any:
        return dataset.subset(torch.isin(dataset.targets, wanted).nonzero().flatten())

    return dataclasses.replace(bundle, train=keep(bundle.train), test=keep(bundle.test))


def make_batches(bundle: DataBundle, data: Any, seed: int, device: torch.device) -> tuple[TrainBatches, Any]:
    """The training batches and the test loader of a run (this rank's shards under ``torchrun``).

    Training loaders cut each epoch's seeded order into the configured (global) batches, those of one
    process, and give each rank its contiguous ``1 / W`` of every batch; a last batch that ``W`` does
    not divide goes whole to every rank, flagged (:mod:`relkd.data.loaders`), and is computed alike
    on each, so no image is repeated. The test loader shards the test set without repeats (the counts
    are summed over ranks by :func:`relkd.train.evaluate.evaluate`).
    """
    shard = {"loader": data.loader, "rank": D.rank(), "world_size": D.world_size()}
    batch = per_rank(data.batch_size, "data.batch_size")
    labelled = make_loader(bundle.train, batch, True, seed, data.num_workers, device=device, **shard)
    transfer = None
    if bundle.transfer is not None:
        transfer = make_loader(
            bundle.transfer,
            per_rank(data.transfer_batch_size or data.batch_size, "data.transfer_batch_size"),
            True,
            derive_seed(seed, TRANSFER_STREAM),
            data.num_workers,
            device=device,
            **shard,
        )
    test = make_loader(
        bundle.test, data.test_batch_size, False, 0, data.num_workers, device=device, even=False, **shard
    )
    return TrainBatches(labelled, transfer), test


def make_eval_loader(bundle: DataBundle, data: Any, device: torch.device) -> Any:
    """The training images without augmentation, in order, in test-sized batches (this rank's shard):
    what evaluators such as retrieval galleries read."""
    shard = {"loader": data.loader, "rank": D.rank(), "world_size": D.world_size()}
    return make_loader(
        bundle.train, data.test_batch_size, False, 0, data.num_workers, device=device, augment=False,
        even=False, **shard,
    )  # fmt: skip


def used_teachers(config: Any) -> list[str]:
    """The suite's teachers that some method uses, in the suite's order."""
    used = {t for method in config.methods.values() for t in (method.teachers or {}).values()}
    return [name for name in config.teachers if name in used]


def config_hash(*parts: Any) -> str:
    """A SHA-256 of the parts (dataclasses, mappings, numbers, strings) as canonical JSON.

    A dataclass field left at its default is omitted, so a config key added to relkd later (with a
    default that keeps the old behaviour) does not change the hash of the runs already on disk."""

    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            values = {f.name: (f, getattr(x, f.name)) for f in dataclasses.fields(x)}
            return {name: plain(v) for name, (f, v) in values.items() if not _default(f, v)}
        if isinstance(x, Mapping):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _default(field: dataclasses.Field, value: Any) -> bool:
    if field.default is not dataclasses.MISSING:
        return value == field.default
    if field.default_factory is not dataclasses.MISSING:
        return value == field.default_factory()
    return False


def _state_of(path: str, name: str) -> dict[str, Any]:
    """The state dict in a checkpoint file: a relkd checkpoint's network ``name`` (else its only or first
    network), or a plain state dict, or one under ``model`` / ``state_dict``; ``module.`` prefixes
    (DataParallel) removed."""
    state = load_checkpoint(path)
    if "students" in state and isinstance(state["students"], dict) and state["students"]:
        networks = state["students"]
        state = networks[name] if name in networks else next(iter(networks.values()))
    elif "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    elif "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(path: str, model: nn.Module, name: str) -> None:
    """Load network weights from a relkd checkpoint (``final.pt``: ``students[name]``) or a file that
    holds a state dict (plain, or under ``model`` / ``state_dict``, as other KD code bases save).

    Raises:
        CheckpointError: unreadable file, or weights that do not fit ``model``.
    """
    state = _state_of(path, name)
    try:
        load_state(path, name, model, state)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (loading the {name} weights)") from None
