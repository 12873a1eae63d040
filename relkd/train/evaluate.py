"""Evaluation: test top-1/top-5, and student-teacher agreement on a fixed probe batch.

The probe batch is the same test images for every run (a permutation seeded with 0), so agreement
curves of different methods and seeds are measured on the same instances.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from relkd import distributed as D
from relkd.train.metrics import topk_correct

__all__ = ["agreement_metrics", "evaluate", "probe_inputs"]

PROBE_SEED = 0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Tensor]],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of ``model`` in eval mode over ``loader``; one host sync.

    Under data parallelism every rank evaluates its shard of the test set and the hit counts are
    summed over ranks (one all-reduce), so every rank returns the accuracy on the whole test set.
    """
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    for batch in loader:
        with autocast():
            logits = model(batch["input"])
        target = batch["target"]
        counts += torch.cat([topk_correct(logits, target), counts.new_full((1,), target.shape[0])])
    model.train(was_training)
    if D.is_distributed():
        dist.all_reduce(counts)
    acc1, acc5, total = counts.tolist()
    if total == 0:
        raise ValueError("the test loader yielded no image; check the dataset's test split")
    return 100.0 * acc1 / total, 100.0 * acc5 / total


def probe_inputs(dataset: Dataset, size: int, device: torch.device) -> Tensor:
    """``min(size, len(dataset))`` test images chosen by a permutation seeded with 0, stacked."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(PROBE_SEED))
    items = [dataset[int(i)]["input"] for i in order[:size]]
    return torch.stack(items).to(device)


@torch.no_grad()
def agreement_metrics(
    student: nn.Module,
    teacher: nn.Module,
    student_features: Callable[[], Tensor],
    teacher_features: Callable[[], Tensor],
    inputs: Tensor,
    metric: Callable[[Tensor, Tensor], dict[str, float]],
) -> dict[str, Any]:
    """``metric(student embedding, teacher embedding)`` on ``inputs``, both networks in eval mode.

    ``student_features`` / ``teacher_features`` read the tapped embedding after each forward.
    """
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    teacher(inputs)
    t = teacher_features()
    student(inputs)
    s = student_features()
    student.train(modes[0])
    teacher.train(modes[1])
    return metric(s.float().flatten(1), t.float().flatten(1))
