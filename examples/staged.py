"""FitNet's two stages in your own training loop: hints for the lower student, then KD.

    python examples/staged.py                   # digits: about 10 s of one CPU core
    python examples/staged.py fashion_mnist     # Fashion-MNIST (10,000 training images)

The setting of relkd's built-in digits experiment (``relkd run``): the teacher (a CNN) learns from
every labelled training image; each student (a narrower CNN) gets 100 of the labels (10 per class)
and sees the other images without labels, through the distillation terms only. Trains the student
alone, with KD alone, and with FitNet's two stages (Romero et al., ICLR 2015), and prints the test
accuracies:

1. **Hints.** The student up to its guided layer (here ``layer2``, the tap ``stage2`` the loss reads)
   learns, through a trainable regressor, to reproduce the teacher's hint layer (its ``layer2``): the
   mean squared error at weight 100, no cross-entropy, so every training image serves. Only the
   parameters up to the guided layer and the regressor's are optimised.
2. **KD.** The whole student then trains with ``0.1 x CE + 0.9 x KD`` (T = 4); the regressor is dropped.

Both stages take the recipe's epochs, as the built-in ``fitnet_2stage`` method
(``relkd/configs/methods/fitnet_2stage.yaml``). The regressor (a convolution, batch norm and ReLU from
the student's map to the teacher's) is built by ``relkd.losses.build("fitnet", student=, teacher=,
example=)``, which measures both maps on a probe batch (it finds ``layer2`` as the tap ``stage2``);
it is part of the loss, so ``fitnet.parameters()`` go to the first stage's optimiser. The maps are
taken with forward hooks (``relkd.models.FeatureTaps``).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import relkd.data
import relkd.losses
from relkd.models import FeatureTaps


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


def train_student(model, x, y, epochs, seed, distill=None, ce_weight=1.0, params=None):
    """AdamW, lr 3e-3, cosine schedule, over ``params`` (default: the student's). Each step takes 32
    labelled images for ``ce_weight`` x the cross-entropy and, with ``distill(logits, idx)``, 64
    unlabelled ones more: the distillation terms see the whole batch (``idx``, its positions in the
    training set, labelled first). An epoch is one pass over the unlabelled images; the student alone
    takes the same steps on the same labelled images."""
    labelled, unlabelled = (y >= 0).nonzero().flatten(), (y < 0).nonzero().flatten()
    opt = torch.optim.AdamW(model.parameters() if params is None else params, lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(unlabelled) // 64))
    rng = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for rest in unlabelled[torch.randperm(len(unlabelled), generator=rng)].split(64):
            lab = labelled[torch.randint(len(labelled), (32,), generator=rng)]
            idx = lab if distill is None else torch.cat([lab, rest])
            logits = model(x[idx])
            loss = distill(logits, idx) if distill is not None else 0.0
            if ce_weight:
                loss = loss + ce_weight * F.cross_entropy(logits[:32], y[lab])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


def main(epochs: int = 15, seed: int = 0, data: str = "digits", labels: int = 100) -> dict[str, float]:
    """Test accuracies of the teacher, the student alone, with KD, and with FitNet's two stages."""
    xtr, ytr, xte, yte = load(data)
    y = hide_labels(ytr, labels, seed)  # the students' labels
    torch.manual_seed(seed)
    teacher = train_teacher(CNN(width=32), xtr, ytr, epochs, seed)
    acc = {"teacher": accuracy(teacher, xte, yte)}

    torch.manual_seed(seed)
    acc["student"] = accuracy(train_student(CNN(width=8), xtr, y, epochs, seed), xte, yte)

    kd = relkd.losses.build("kd", T=4.0)

    def kd_distill(logits, idx):
        with torch.no_grad():
            t_logits = teacher(xtr[idx])
        return 0.9 * kd(logits, t_logits)

    torch.manual_seed(seed)
    student = train_student(CNN(width=8), xtr, y, epochs, seed, kd_distill, ce_weight=0.1)
    acc["kd"] = accuracy(student, xte, yte)

    # FitNet, stage 1: the student up to layer2 and the regressor learn the teacher's layer2
    torch.manual_seed(seed)
    student = CNN(width=8)
    fitnet = relkd.losses.build("fitnet", student=student, teacher=teacher, example=xtr[:8])
    with (
        FeatureTaps(student, {"hint": "layer2"}) as s_taps,
        FeatureTaps(teacher, {"hint": "layer2"}) as t_taps,
    ):

        def hint(logits, idx):
            with torch.no_grad():
                teacher(xtr[idx])
            return 100.0 * fitnet(s_taps["hint"], t_taps["hint"])

        lower = [*student.layer1.parameters(), *student.layer2.parameters(), *fitnet.parameters()]
        train_student(student, xtr, y, epochs, seed, hint, ce_weight=0.0, params=lower)

    # FitNet, stage 2: KD on the whole student
    train_student(student, xtr, y, epochs, seed, kd_distill, ce_weight=0.1)
    acc["fitnet"] = accuracy(student, xte, yte)
    for name, value in acc.items():
        print(f"{name:>8}: {value:.3f}")
    return acc


if __name__ == "__main__":
    main(data=sys.argv[1] if len(sys.argv) > 1 else "digits")
