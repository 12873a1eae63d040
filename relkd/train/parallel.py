"""Multi-process runs under ``torchrun``: the process group, each rank's device, its share of a batch.

``torchrun --nproc_per_node N -m relkd run CONFIG`` starts ``N`` copies of ``relkd run``; each reads
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` from the environment. :func:`distributed_session` joins
the process group (``nccl`` on CUDA, ``gloo`` on the CPU; multi-node runs use torchrun's rendezvous the
same way) for the duration of a suite and leaves it afterwards. What each rank then does is described
in :mod:`relkd.distributed`; the engine follows it (see :mod:`relkd.train.engine`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from relkd import distributed as D
from relkd.config.validate import ConfigError

__all__ = ["distributed_session", "launched_rank", "per_rank"]


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
