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
from setting import CNN, accuracy, hide_labels, load, train_student, train_teacher

import relkd.losses
from relkd.models import FeatureTaps


def main(epochs: int = 15, seed: int = 0, data: str = "digits", labels: int = 100) -> dict[str, float]:
    """Test accuracies of the teacher, the student alone, with KD, and with FitNet's two stages."""
    xtr, ytr, xte, yte = load(data)
    y = hide_labels(ytr, labels, seed)  # the students' labels
    torch.manual_seed(seed)
    teacher = train_teacher(CNN(width=32), xtr, ytr, epochs, seed)
    acc = {"teacher": accuracy(teacher, xte, yte)}

    torch.manual_seed(seed)
    student = CNN(width=8)
    train_student(student, xtr, y, epochs, seed)
    acc["student"] = accuracy(student, xte, yte)

    kd = relkd.losses.build("kd", T=4.0)

    def kd_distill(logits, idx):
        with torch.no_grad():
            t_logits = teacher(xtr[idx])
        return 0.9 * kd(logits, t_logits)

    torch.manual_seed(seed)
    student = CNN(width=8)
    train_student(student, xtr, y, epochs, seed, kd_distill, ce_weight=0.1)
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
