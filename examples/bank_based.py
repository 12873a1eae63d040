"""CRD and HKD in your own training loop: losses with memory banks keyed by the dataset index.

    python examples/bank_based.py                   # digits: about 10 s of one CPU core
    python examples/bank_based.py fashion_mnist     # Fashion-MNIST (10,000 training images)

The setting of relkd's built-in digits experiment (``relkd run``): the teacher (an MLP) learns from
every labelled training image; each student (a smaller MLP) gets 100 of the labels (10 per class) and
sees the other images without labels, through the distillation terms only. Trains the student alone,
with CRD and with HKD (+ KD), and prints the test accuracies. What the two losses need beyond the
features:

- the **index** of each sample in the training set, with every batch: the banks keep one entry per
  training image and a sample's positive is its own entry. Here a batch is ``x[idx]``, so ``idx``
  itself is the index; with a ``DataLoader``, return the index from the dataset's ``__getitem__``;
- the **training set's size and labels**, once, when the loss is built: ``num_data`` (CRD's banks) and
  ``targets``, the labels of the whole training set, ``-1`` where a label is unknown (as here for all
  but 100 images; each such image is a class of its own). An anchor's negatives are drawn from the
  *other* classes, as the authors' loaders do;
- the **sizes** of the features, measured on a probe batch by ``relkd.losses.build(name,
  student=, teacher=, example=, num_data=, targets=)``;
- their **trainable parts** (projections to 128-d, HKD's graph encoders) are the loss's parameters:
  give ``loss.parameters()`` to the optimiser with the student's. The banks (and CRD's normaliser
  ``Z``) are buffers: they move with ``loss.to(device)`` and live in ``loss.state_dict()``, so a
  checkpoint that holds the loss's state dict resumes them exactly (``checkpoint=`` saves one).

Weights of the built-in methods (``relkd/configs/methods/crd.yaml``, ``hkd.yaml``): CE + 0.8 x CRD;
CE + 1 x KD (T = 4) + 3 x HKD. Both draw 1,024 negatives, as relkd's digits experiment: the authors'
16,384 are more than this training set has images.
"""

from __future__ import annotations

import sys

import torch
from setting import accuracy, hide_labels, load, mlp, train_student, train_teacher
from torch import nn

import relkd.losses
from relkd.models import FeatureTaps


def main(
    epochs: int = 15, seed: int = 0, data: str = "digits", labels: int = 100, checkpoint: str | None = None
) -> dict[str, float]:
    """Test accuracies of the teacher, the student alone, with CRD and with HKD + KD. ``checkpoint``: a
    path prefix; each distilled student is saved to ``{checkpoint}crd.pt`` / ``hkd.pt`` with its loss's
    state (projections, banks) and the optimiser's."""
    xtr, ytr, xte, yte = load(data)
    y = hide_labels(ytr, labels, seed)  # the students' labels, -1 where unknown: the losses' targets
    size = xtr[0].numel()
    torch.manual_seed(seed)
    teacher = train_teacher(mlp(size, 256), xtr, ytr, epochs, seed)
    t_taps = FeatureTaps(teacher, {"emb": "fc:input"})
    acc = {"teacher": accuracy(teacher, xte, yte)}

    torch.manual_seed(seed)
    student = mlp(size, 32)
    train_student(student, xtr, y, epochs, seed)
    acc["student"] = accuracy(student, xte, yte)

    def build(name: str, student: nn.Module) -> nn.Module:
        return relkd.losses.build(
            name, student=student, teacher=teacher, example=xtr[:8],  # widths of the embeddings
            num_data=len(xtr), targets=y, num_negatives=1024,
        )  # fmt: skip

    # CRD: CE + 0.8 CRD on the embeddings
    torch.manual_seed(seed)
    student = mlp(size, 32)
    s_taps = FeatureTaps(student, {"emb": "fc:input"})
    crd = build("crd", student)

    def crd_distill(logits, idx):
        with torch.no_grad():
            teacher(xtr[idx])
        return 0.8 * crd(s_taps["emb"], t_taps["emb"], idx)

    params = [*student.parameters(), *crd.parameters()]  # the projections train with the student
    opt = train_student(student, xtr, y, epochs, seed, crd_distill, params=params, modules=[crd])
    acc["crd"] = accuracy(student, xte, yte)
    save(checkpoint, "crd", student, crd, opt)
    s_taps.remove()

    # HKD: CE + 1 KD + 3 HKD on the embeddings and the logits
    torch.manual_seed(seed)
    student = mlp(size, 32)
    s_taps = FeatureTaps(student, {"emb": "fc:input"})
    hkd, kd = build("hkd", student), relkd.losses.build("kd", T=4.0)

    def hkd_distill(logits, idx):
        with torch.no_grad():
            t_logits = teacher(xtr[idx])
        return 1.0 * kd(logits, t_logits) + 3.0 * hkd(s_taps["emb"], t_taps["emb"], logits, t_logits, idx)

    params = [*student.parameters(), *hkd.parameters()]  # projections and graph encoders
    opt = train_student(student, xtr, y, epochs, seed, hkd_distill, params=params, modules=[hkd])
    acc["hkd"] = accuracy(student, xte, yte)
    save(checkpoint, "hkd", student, hkd, opt)

    for name, value in acc.items():
        print(f"{name:>8}: {value:.3f}")
    return acc


def save(prefix: str | None, name: str, student: nn.Module, loss: nn.Module, opt) -> None:
    """The student, the loss (its projections and banks) and the optimiser: a resumable checkpoint."""
    if prefix is not None:
        state = {"student": student.state_dict(), "loss": loss.state_dict(), "optimizer": opt.state_dict()}
        torch.save(state, f"{prefix}{name}.pt")


if __name__ == "__main__":
    main(data=sys.argv[1] if len(sys.argv) > 1 else "digits")
