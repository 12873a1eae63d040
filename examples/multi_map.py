"""KD-SVD and MHGD in your own training loop: several feature maps of a small CNN.

    python examples/multi_map.py                   # digits: about a minute of one CPU core
    python examples/multi_map.py fashion_mnist     # Fashion-MNIST (10,000 training images)

The setting of relkd's built-in digits experiment (``relkd run``): the teacher (a CNN) learns from
every labelled training image; each student (a narrower CNN) gets 100 of the labels (10 per class)
and sees the other images without labels, through the distillation terms only. Trains the student
alone, with KD-SVD and with MHGD, and prints the test accuracies. What the two losses need:

- several feature maps per network: the last layer of each stage, taken with forward hooks
  (``relkd.models.FeatureTaps``) and passed as lists, ``loss([s1, s2, s3], [t1, t2, t3])``; the
  models stay as they are;
- the channel counts, measured on a probe batch by ``relkd.losses.build(name, student=, teacher=,
  example=)`` (it finds the stages ``layer1``..``layer3`` as the taps ``stage1``..``stage3``). Where
  student and teacher widths differ, the loss maps the student's maps with a 1x1 convolution per layer,
  a trainable part of the loss: ``loss.parameters()`` go to the optimiser with the student's;
- the authors' update rule in place of ``loss.backward()``: ``relkd.train.clip_to_ce_backward(ce,
  distill, params, ramp=relkd.methods.sigmoid(epoch))`` clips each parameter's distillation gradient to
  the norm of its cross-entropy gradient, times a ramp that rises from 0.5 to 1 over the first epochs.
  Both losses are plain sums by default (``reduction="sum"``, the authors' scale: here MHGD's
  gradient is hundreds to thousands of times the cross-entropy's, KD-SVD's tens of times) and rely on
  it, as the built-in methods do (``train: {clip_to_ce: true, clip_to_ce_ramp: sigmoid}`` in
  ``relkd/configs/methods/kd_svd.yaml`` and ``mhgd.yaml``). Without the rule, use
  ``reduction="mean"``;
- MHGD's two stages: its attention heads first learn to relate the teacher's layers on their own
  (``loss.pretrain_loss(teacher_maps)``, 40 epochs of SGD with Nesterov momentum, lr 0.1, as the
  authors), then ``loss.freeze_heads()``, then the student distils through the frozen heads.

Weights of the built-in methods: cross-entropy + 1 x the loss, under the clipping rule.
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
from relkd.methods import sigmoid
from relkd.models import FeatureTaps
from relkd.train import clip_to_ce_backward

TAPS = {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3"}  # tap name -> module path


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


def train_student(model, x, y, epochs, seed, distill=None, loss=None):
    """AdamW, lr 3e-3, cosine schedule, over the student's and ``loss``'s parameters. Each step takes
    32 labelled images for the cross-entropy and, with ``distill(x_batch)``, 64 unlabelled ones more
    for the distillation loss, whose gradient is clipped to the cross-entropy's (the authors' rule). An
    epoch is one pass over the unlabelled images; the student alone takes the same steps on the same
    labelled images."""
    labelled, unlabelled = (y >= 0).nonzero().flatten(), (y < 0).nonzero().flatten()
    params = [*model.parameters(), *(loss.parameters() if loss is not None else ())]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(unlabelled) // 64))
    rng = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        for rest in unlabelled[torch.randperm(len(unlabelled), generator=rng)].split(64):
            lab = labelled[torch.randint(len(labelled), (32,), generator=rng)]
            idx = lab if distill is None else torch.cat([lab, rest])
            ce = F.cross_entropy(model(x[idx])[:32], y[lab])
            opt.zero_grad()
            if distill is None:
                ce.backward()
            else:
                clip_to_ce_backward(ce, distill(x[idx]), params, ramp=sigmoid(epoch))
            opt.step()
            sched.step()
    return model


def pretrain_heads(mhgd, teacher, t_taps, x, epochs, seed):
    """MHGD's first stage: its heads learn to relate the teacher's layers, on every training image (no
    labels needed), with the authors' optimiser (SGD, Nesterov momentum 0.9, lr 0.1, constant); then
    they are frozen."""
    mhgd.train()  # batch statistics in the heads' batch norms
    opt = torch.optim.SGD(mhgd.heads.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=rng).split(64):
            with torch.no_grad():
                teacher(x[idx])
            loss = mhgd.pretrain_loss([t_taps[k] for k in TAPS])  # + the authors' penalty on the heads
            opt.zero_grad()
            loss.backward()
            opt.step()
    mhgd.freeze_heads()


def main(
    epochs: int = 15,
    seed: int = 0,
    data: str = "digits",
    labels: int = 100,
    head_epochs: int = 40,
    losses: tuple[str, ...] = ("kd_svd", "mhgd"),
) -> dict[str, float]:
    """Test accuracies of the teacher, the student alone and a student per loss in ``losses``;
    ``head_epochs``: MHGD's head pre-training (the authors' 40)."""
    xtr, ytr, xte, yte = load(data)
    y = hide_labels(ytr, labels, seed)  # the students' labels
    torch.manual_seed(seed)
    teacher = train_teacher(CNN(width=32), xtr, ytr, epochs, seed)
    t_taps = FeatureTaps(teacher, TAPS)  # filled at every forward of the teacher
    acc = {"teacher": accuracy(teacher, xte, yte)}

    torch.manual_seed(seed)
    acc["student"] = accuracy(train_student(CNN(width=8), xtr, y, epochs, seed), xte, yte)

    for name in losses:
        torch.manual_seed(seed)
        student = CNN(width=8)
        s_taps = FeatureTaps(student, TAPS)
        loss = relkd.losses.build(name, student=student, teacher=teacher, example=xtr[:8])
        if name == "mhgd":
            pretrain_heads(loss, teacher, t_taps, xtr, head_epochs, seed)
        loss.train()

        def distill(xb, loss=loss, s_taps=s_taps):
            with torch.no_grad():
                teacher(xb)
            return loss([s_taps[k] for k in TAPS], [t_taps[k] for k in TAPS])

        train_student(student, xtr, y, epochs, seed, distill, loss)
        acc[name] = accuracy(student, xte, yte)
        s_taps.remove()

    for name, value in acc.items():
        print(f"{name:>8}: {value:.3f}")
    return acc


if __name__ == "__main__":
    main(data=sys.argv[1] if len(sys.argv) > 1 else "digits")
