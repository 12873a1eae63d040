"""Shared fixtures: the device under test, and every registered loss built with small inputs."""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import relkd.losses as L

B, D, CLASSES, NUM_DATA, NEGATIVES = 12, 10, 4, 60, 16
STAGES = ((4, 3, 3), (6, 3, 3), (8, 2, 2))
# token-level taps of the text losses: sequence length, vocabulary and stacked layers
LENGTH, VOCAB, LAYERS = 7, 11, 3

# Constructor arguments of the registered losses that need any; a new loss that needs some must be
# added here (the tests that build every registered loss say so).
LOSS_KWARGS: dict[str, Callable[[], dict[str, Any]]] = {
    "crd": lambda: {"student_dim": D, "teacher_dim": D, "num_data": NUM_DATA, "num_negatives": NEGATIVES},
    "hkd": lambda: {
        "student_dim": D,
        "teacher_dim": D,
        "targets": torch.arange(NUM_DATA) % CLASSES,
        "num_negatives": NEGATIVES,
        "k": 4,
    },
    "mhgd": lambda: {"teacher_channels": [c for c, *_ in STAGES]},
    "fitnet": lambda: {"student_shape": STAGES[1], "teacher_shape": STAGES[1]},
    "sskd": lambda: {"student_dim": D, "teacher_dim": D},
    "cc_chain": lambda: {"student_dim": D, "teacher_dim": D},
    "mgd": lambda: {"student_dim": D, "teacher_dim": D, "num_classes": CLASSES},
    "arcface": lambda: {"student_dim": D, "num_classes": CLASSES},
    "lce": lambda: {"student_dim": D, "teacher_dim": D, "num_classes": CLASSES},
}


def registered_losses() -> list[str]:
    """One name per registered loss class (aliases folded)."""
    names: dict[Any, str] = {}
    for name in L.available():
        names.setdefault(L.LOSSES.get(name), name)
    return sorted(names.values())


@pytest.fixture(scope="session")
def device() -> torch.device:
    """``cuda`` when ``RELKD_TEST_DEVICE=cuda`` and a GPU is present, otherwise ``cpu``."""
    wanted = os.environ.get("RELKD_TEST_DEVICE", "cpu")
    if wanted not in ("cpu", "cuda"):
        raise ValueError(f"RELKD_TEST_DEVICE must be 'cpu' or 'cuda', got {wanted!r}")
    return torch.device("cuda" if wanted == "cuda" and torch.cuda.is_available() else "cpu")


class _FixedNegatives(torch.nn.Module):
    """Stands in for a loss's negative sampler so that every device scores the same negatives."""

    def __init__(self, negatives: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("negatives", negatives)

    def forward(self, index: torch.Tensor, num_negatives: int) -> torch.Tensor:
        return self.negatives


@dataclass
class LossCase:
    """A built loss and the tapped features and batch fields its ``distill`` reads."""

    loss: L.DistillLoss
    student: dict[str, Any]
    teacher: dict[str, Any]
    batch: dict[str, torch.Tensor]

    def __call__(self) -> torch.Tensor:
        return self.loss.distill(self.student, self.teacher, self.batch)

    @property
    def leaves(self) -> list[torch.Tensor]:
        flat = [x for v in self.student.values() for x in (v if isinstance(v, list) else [v])]
        return [x for x in flat if x.requires_grad]

    def to(self, device: torch.device, dtype: torch.dtype) -> LossCase:
        """A copy on ``device`` in ``dtype`` with the same weights, state and inputs (fresh leaves)."""

        def move(v: Any, grad: bool) -> Any:
            if isinstance(v, list):
                return [move(x, grad) for x in v]
            if not v.is_floating_point():  # an attention mask stays boolean
                return v.to(device)
            return v.detach().to(device, dtype).requires_grad_(grad)

        loss = copy.deepcopy(self.loss).to(device=device, dtype=dtype)
        student = {k: move(v, True) for k, v in self.student.items()}
        teacher = {k: move(v, False) for k, v in self.teacher.items()}
        return LossCase(loss, student, teacher, {k: v.to(device) for k, v in self.batch.items()})


def _features(tap: str, g: torch.Generator, grad: bool, mask: torch.Tensor) -> Any:
    if tap == "mask":
        return mask
    if tap == "token_logits":
        x = 3 * torch.randn(B, LENGTH, VOCAB, generator=g)
    elif tap == "last_hidden":
        x = torch.randn(B, LENGTH, D, generator=g)
    elif tap in ("hidden_states", "decoder_states"):
        x = torch.randn(B, LAYERS, LENGTH, D, generator=g)
    elif tap == "logits":
        x = 3 * torch.randn(B, CLASSES, generator=g)
    elif tap.startswith("stage"):
        x = torch.randn(B, *STAGES[int(tap[5:]) - 1], generator=g)
    else:
        x = torch.randn(B, D, generator=g)
    return x.requires_grad_(grad)


@pytest.fixture
def loss_case() -> Callable[[str], LossCase]:
    """``loss_case(name)``: the registered loss ``name`` on the CPU in float32, seeded, with inputs
    for its taps; samplers are replaced by fixed negatives and two-stage losses are past pretraining."""

    def make(name: str) -> LossCase:
        if name not in LOSS_KWARGS and _needs_arguments(name):
            raise KeyError(f"loss {name!r} needs constructor arguments: add them to conftest.LOSS_KWARGS")
        torch.manual_seed(0)
        loss = L.build(name, **LOSS_KWARGS.get(name, dict)())
        if getattr(loss, "pretrain", False):
            loss.freeze_heads()
        g = torch.Generator().manual_seed(1)
        if hasattr(loss, "sampler"):
            loss.sampler = _FixedNegatives(torch.randint(0, NUM_DATA, (B, NEGATIVES), generator=g))
        # padded sequences: row i keeps its first 2 + i % (LENGTH - 1) tokens
        mask = torch.arange(LENGTH) < (2 + torch.arange(B) % (LENGTH - 1))[:, None]
        student = {tap: _features(tap, g, True, mask) for tap in loss.taps}
        teacher = {tap: _features(tap, g, False, mask) for tap in loss.taps}
        batch = {}
        if "mlm_labels" in loss.batch_keys:  # every third real token is a prediction target
            labels = torch.randint(0, VOCAB, (B, LENGTH), generator=g)
            chosen = mask & (torch.arange(LENGTH) % 3 == 0)
            batch["mlm_labels"] = torch.where(chosen, labels, torch.full_like(labels, -100))
        if "index" in loss.batch_keys:
            batch["index"] = torch.randperm(NUM_DATA, generator=g)[:B]
        if "target" in loss.batch_keys:
            batch["target"] = torch.arange(B) % CLASSES
        if hasattr(loss, "fit"):  # losses that first fit statistics of the teacher (LCE's class centres)
            loss.fit(teacher[loss.taps[0]], batch["target"])
        return LossCase(loss, student, teacher, batch)

    return make


def _needs_arguments(name: str) -> bool:
    params = inspect.signature(L.LOSSES.get(name)).parameters.values()
    return any(p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD for p in params)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes ``loss_name`` runs once per registered loss."""
    if "loss_name" in metafunc.fixturenames:
        metafunc.parametrize("loss_name", registered_losses())
