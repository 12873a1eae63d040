"""Hinton KD in your own training loop: the student matches the teacher's softened logits.

    python examples/logit_kd.py                   # digits: a few seconds of one CPU core
    python examples/logit_kd.py fashion_mnist     # Fashion-MNIST (10,000 training images)

The setting of relkd's built-in digits experiment (``relkd run``): the teacher (an MLP) learns from
every labelled training image; each student (a smaller MLP) gets 100 of the labels (10 per class) and
sees the other images without labels, through the distillation terms only. Trains the student alone
and with KD, and prints the test accuracies.

KD reads only the logits, so no hook is needed: ``relkd.losses.build("kd", T=4.0)`` is a plain module
called on ``(student_logits, teacher_logits)``. Where the numbers come from
(``relkd/configs/methods/kd.yaml``):

- ``T = 4`` and the objective ``0.1 x CE + 0.9 x KD`` are the CIFAR-100 benchmark's (Tian et al.,
  ICLR 2020; RepDistiller's ``--distill kd -r 0.1 -a 0.9 --kd_T 4``);
- the loss is already multiplied by ``T^2`` (Hinton et al., 2015, Sec. 2): the gradient of the
  softened KL shrinks as ``1 / T^2``, so the factor keeps the weights 0.1 / 0.9 meaningful for any ``T``;
- it is the KL divergence summed over the classes and averaged over the batch (``reduction="mean"``).

The teacher runs in ``eval()`` mode under ``torch.no_grad()``: it is a constant of the loss.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import relkd.data
import relkd.losses


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


def train_student(model, x, y, epochs, seed, distill=None, extra_params=(), ce_weight=1.0):
    """AdamW, lr 3e-3, cosine schedule. Each step takes 32 labelled images for ``ce_weight`` x the
    cross-entropy and, with ``distill(logits, idx)``, 64 unlabelled ones more: the distillation terms
    see the whole batch (``idx``, its positions in the training set, labelled first). An epoch is one
    pass over the unlabelled images; the student alone takes the same steps on the same labelled images."""
    labelled, unlabelled = (y >= 0).nonzero().flatten(), (y < 0).nonzero().flatten()
    opt = torch.optim.AdamW([*model.parameters(), *extra_params], lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(unlabelled) // 64))
    rng = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for rest in unlabelled[torch.randperm(len(unlabelled), generator=rng)].split(64):
            lab = labelled[torch.randint(len(labelled), (32,), generator=rng)]
            idx = lab if distill is None else torch.cat([lab, rest])
            logits = model(x[idx])
            loss = ce_weight * F.cross_entropy(logits[:32], y[lab])
            if distill is not None:
                loss = loss + distill(logits, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


def main(epochs: int = 15, seed: int = 0, data: str = "digits", labels: int = 100) -> dict[str, float]:
    """Test accuracies of the teacher, the student alone and the student with KD."""
    xtr, ytr, xte, yte = load(data)
    y = hide_labels(ytr, labels, seed)  # the students' labels
    size = xtr[0].numel()
    torch.manual_seed(seed)
    teacher = train_teacher(mlp(size, 256), xtr, ytr, epochs, seed)
    acc = {"teacher": accuracy(teacher, xte, yte)}

    torch.manual_seed(seed)
    acc["student"] = accuracy(train_student(mlp(size, 32), xtr, y, epochs, seed), xte, yte)

    kd = relkd.losses.build("kd", T=4.0)

    def distill(logits, idx):
        with torch.no_grad():
            t_logits = teacher(xtr[idx])
        return 0.9 * kd(logits, t_logits)

    torch.manual_seed(seed)
    student = train_student(mlp(size, 32), xtr, y, epochs, seed, distill, ce_weight=0.1)
    acc["kd"] = accuracy(student, xte, yte)
    for name, value in acc.items():
        print(f"{name:>8}: {value:.3f}")
    return acc


if __name__ == "__main__":
    main(data=sys.argv[1] if len(sys.argv) > 1 else "digits")
