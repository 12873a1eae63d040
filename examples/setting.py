"""The setting every example shares: the data, the two network families, the teacher's training and
the student's training loop, in plain PyTorch (no relkd engine).

It is the setting of relkd's built-in digits experiment (``relkd run``): the teacher learns from every
labelled training image; each student gets ``labels`` of them (10 per class by default) and sees the
other images without labels, through the distillation terms only. An example imports what it needs
from here and keeps to what differs: its losses and how they are called.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import relkd.data
from relkd.methods import sigmoid
from relkd.train import clip_to_ce_backward

__all__ = ["CNN", "accuracy", "hide_labels", "load", "mlp", "train_student", "train_teacher"]


def mlp(in_features: int, width: int, num_classes: int = 10) -> nn.Sequential:
    """Two hidden layers of ``width`` units; ``fc`` is the classifier."""
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            hidden=nn.Sequential(
                nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
            ),
            fc=nn.Linear(width, num_classes),
        )
    )


class CNN(nn.Module):
    """Three conv stages (``width``, ``2 width``, ``4 width`` channels; the last two halve the map),
    global average pooling and a linear classifier ``fc``."""

    def __init__(self, width: int, num_classes: int = 10) -> None:
        super().__init__()

        def stage(a: int, b: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(a, b, 3, stride, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU())

        self.layer1 = stage(1, width, 1)
        self.layer2 = stage(width, 2 * width, 2)
        self.layer3 = stage(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def load(name: str = "digits") -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)``: normalised images ``[N, 1, H, W]``, labels ``[N]``."""
    if name == "digits":
        data = load_digits()
        split = train_test_split(
            data.images[:, None], data.target, test_size=450, random_state=0, stratify=data.target
        )
        xtr, xte, ytr, yte = (torch.tensor(a) for a in split)
        mean, std = xtr.mean(), xtr.std()  # normalised with the training images' statistics
        return ((xtr - mean) / std).float(), ytr.long(), ((xte - mean) / std).float(), yte.long()
    bundle = relkd.data.build(name, train_subset=10000, augment=False)  # normalised, not augmented
    train, test = (
        next(iter(torch.utils.data.DataLoader(d, batch_size=len(d)))) for d in (bundle.train, bundle.test)
    )
    return train["input"], train["target"], test["input"], test["target"]


def hide_labels(y: torch.Tensor, labels: int, seed: int) -> torch.Tensor:
    """``y`` with ``-1`` (unknown) except for ``labels`` images, a seeded class-balanced choice; the
    others (``labels`` must leave some) are the students' unlabelled images."""
    keep, _ = relkd.data.class_balanced_indices(y, labels, 10, seed)
    return torch.full_like(y, -1).index_copy(0, keep, y[keep])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train_teacher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """The cross-entropy on every training image: AdamW, lr 3e-3, cosine schedule, batches of 64."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // 64))
    rng = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=rng).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train_student(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int,
    distill: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ce_weight: float = 1.0,
    params: Iterable[torch.Tensor] | None = None,
    modules: Sequence[nn.Module] = (),
    clip_to_ce: bool = False,
) -> torch.optim.Optimizer:
    """AdamW, lr 3e-3, cosine schedule, over ``params`` (default: the student's; add a loss's own
    parameters here). Each step takes 32 labelled images for ``ce_weight`` x the cross-entropy and, with
    ``distill(logits, idx)``, 64 unlabelled ones more: the distillation terms see the whole batch
    (``idx``, its positions in the training set, labelled first). An epoch is one pass over the
    unlabelled images; the student alone takes the same steps on the same labelled images. ``modules``
    (a loss with memory banks) are put in train mode with the student every epoch. ``clip_to_ce``: the
    distillation gradient is clipped to the cross-entropy's, ramped by ``sigmoid(epoch)`` (KD-SVD's and
    MHGD's rule, :func:`relkd.train.clip_to_ce_backward`). Returns the optimiser (its state belongs in a
    resumable checkpoint)."""
    labelled, unlabelled = (y >= 0).nonzero().flatten(), (y < 0).nonzero().flatten()
    params = list(model.parameters() if params is None else params)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(unlabelled) // 64))
    rng = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for module in (model, *modules):
            module.train()
        for rest in unlabelled[torch.randperm(len(unlabelled), generator=rng)].split(64):
            lab = labelled[torch.randint(len(labelled), (32,), generator=rng)]
            idx = lab if distill is None else torch.cat([lab, rest])
            logits = model(x[idx])
            ce = ce_weight * F.cross_entropy(logits[:32], y[lab]) if ce_weight else 0.0
            term = distill(logits, idx) if distill is not None else 0.0
            opt.zero_grad()
            if clip_to_ce and distill is not None:
                clip_to_ce_backward(ce, term, params, ramp=sigmoid(epoch))
            else:
                (ce + term).backward()
            opt.step()
            sched.step()
    return opt
