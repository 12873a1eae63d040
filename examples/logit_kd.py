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

import torch
from setting import accuracy, hide_labels, load, mlp, train_student, train_teacher

import relkd.losses


def main(epochs: int = 15, seed: int = 0, data: str = "digits", labels: int = 100) -> dict[str, float]:
    """Test accuracies of the teacher, the student alone and the student with KD."""
    xtr, ytr, xte, yte = load(data)
    y = hide_labels(ytr, labels, seed)  # the students' labels
    size = xtr[0].numel()
    torch.manual_seed(seed)
    teacher = train_teacher(mlp(size, 256), xtr, ytr, epochs, seed)
    acc = {"teacher": accuracy(teacher, xte, yte)}

    torch.manual_seed(seed)
    student = mlp(size, 32)
    train_student(student, xtr, y, epochs, seed)
    acc["student"] = accuracy(student, xte, yte)

    kd = relkd.losses.build("kd", T=4.0)

    def distill(logits, idx):
        with torch.no_grad():
            t_logits = teacher(xtr[idx])
        return 0.9 * kd(logits, t_logits)

    torch.manual_seed(seed)
    student = mlp(size, 32)
    train_student(student, xtr, y, epochs, seed, distill, ce_weight=0.1)
    acc["kd"] = accuracy(student, xte, yte)
    for name, value in acc.items():
        print(f"{name:>8}: {value:.3f}")
    return acc


if __name__ == "__main__":
    main(data=sys.argv[1] if len(sys.argv) > 1 else "digits")
