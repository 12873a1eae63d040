"""Multi-process runs under ``torchrun``: the process group, each rank's device, its share of a batch.

``torchrun --nproc_per_node N -m relkd run CONFIG`` starts ``N`` copies of ``relkd run``; each reads
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` from the environment. :func:`distributed_session` joins
the process group (``nccl`` on CUDA, ``gloo`` on the CPU; multi-node runs use torchrun's rendezvous the
same way) for the duration of a suite and leaves it afterwards. What each rank then does is described
in :mod:`relkd.distributed`; the engine follows it (see :mod:`relkd.train.engine`).

A run on ``W`` processes is meant to be the run on one: every step sees the single-process batch
(each rank its contiguous ``1 / W`` of it, see :mod:`relkd.data.loaders`). A global batch that ``W``
does not divide reaches every rank whole, flagged ``replicated``; :func:`assemble` completes a batch
whose other part (the labelled or the transfer images of the step) was sharded, by gathering that
part, and :func:`replicated_step` then computes the step on every rank alike: global relations off
(no loss gathers, BatchNorm uses the batch it sees), DDP's average of equal gradients changing
nothing. No image is repeated, so every image of an epoch is weighted once in the loss and the
accuracy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from relkd import distributed as D
from relkd.config.validate import ConfigError
from relkd.data.loaders import REPLICATED

__all__ = [
    "assemble",
    "distributed_session",
    "launched_rank",
    "per_rank",
    "replicated_step",
    "use_global_batchnorm",
]

Batch = dict[str, torch.Tensor]


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched by ``torchrun``)."""
    return int(os.environ.get("RANK", "0"))


def _launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def distributed_session(device: torch.device) -> Iterator[torch.device]:
    """Join the process group when launched with ``WORLD_SIZE > 1`` and yield this rank's device.

    A CUDA ``device`` becomes ``cuda:LOCAL_RANK``. Outside ``torchrun``, or when a process group is
    already initialised (by the caller, who then also destroys it), ``device`` is yielded unchanged.
    """
    if _launched_world() <= 1 or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def per_rank(batch_size: int, key: str) -> int:
    """This rank's share ``batch_size / W`` of a global batch size.

    Raises:
        ConfigError: ``batch_size`` is not divisible by the number of processes.
    """
    world = D.world_size()
    if batch_size % world:
        raise ConfigError(
            f"{key}: the batch of {batch_size} images is split over {world} processes, so it must be "
            f"divisible by {world}; set it to {batch_size - batch_size % world or world} or "
            f"{batch_size + world - batch_size % world}"
        )
    return batch_size // world


def assemble(batch: Batch) -> tuple[Batch, bool]:
    """This rank's batch of a step, without the ``replicated`` flag, and whether the step is replicated.

    A batch whose rows are all flagged is the same on every rank (the step is replicated); one without
    flagged rows is this rank's shard. A batch that mixes both (a replicated labelled tail with a
    sharded transfer batch, say) gets each sharded run of rows gathered from every rank, in rank order,
    so that it becomes the whole single-process batch on every rank, and the step is replicated.
    Batches of one process carry no flag and pass through unchanged.
    """
    flags = batch.get(REPLICATED)
    if flags is None:
        return batch, False
    batch = {k: v for k, v in batch.items() if k != REPLICATED}
    flags = flags.cpu()
    if not bool(flags.any()):
        return batch, False
    if bool(flags.all()):
        return batch, True
    edges = [0, *(1 + torch.nonzero(flags[1:] != flags[:-1]).flatten()).tolist(), len(flags)]
    runs = [(a, b, bool(flags[a])) for a, b in zip(edges, edges[1:], strict=False)]
    return {
        key: torch.cat([v[a:b] if whole else _gather(v[a:b]) for a, b, whole in runs])
        for key, v in batch.items()
    }, True


def _gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(D.world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def replicated_step(replicated: bool) -> contextlib.AbstractContextManager:
    """The context of one training step: global relations off for a replicated step (every rank holds
    the whole batch), nothing otherwise."""
    return D.global_relations(False) if replicated else contextlib.nullcontext()


def use_global_batchnorm(modules: Iterable[nn.Module], sync_bn: bool | None) -> bool:
    """Apply ``train.sync_bn`` to the trained ``modules``: convert their BatchNorm layers with
    :func:`relkd.distributed.convert_global_batchnorm` when ``sync_bn`` is true, or when it is None
    (the default) and the run has ``W > 1`` processes and some BatchNorm layer; returns whether it did.

    One process is unaffected either way (the global batch is its batch).
    """
    modules = list(modules)
    if sync_bn is None:
        sync_bn = D.world_size() > 1 and any(D.has_batchnorm(m) for m in modules)
    if sync_bn:
        for m in modules:
            D.convert_global_batchnorm(m)
    return bool(sync_bn)
