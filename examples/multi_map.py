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
from setting import CNN, accuracy, hide_labels, load, train_student, train_teacher

import relkd.losses
from relkd.models import FeatureTaps

TAPS = {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3"}  # tap name -> module path


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
    student = CNN(width=8)
    train_student(student, xtr, y, epochs, seed)
    acc["student"] = accuracy(student, xte, yte)

    for name in losses:
        torch.manual_seed(seed)
        student = CNN(width=8)
        s_taps = FeatureTaps(student, TAPS)
        loss = relkd.losses.build(name, student=student, teacher=teacher, example=xtr[:8])
        if name == "mhgd":
            pretrain_heads(loss, teacher, t_taps, xtr, head_epochs, seed)
        loss.train()

        def distill(logits, idx, loss=loss, s_taps=s_taps):
            with torch.no_grad():
                teacher(xtr[idx])
            return loss([s_taps[k] for k in TAPS], [t_taps[k] for k in TAPS])

        params = [*student.parameters(), *loss.parameters()]  # the 1x1 connectors train too
        train_student(student, xtr, y, epochs, seed, distill, params=params, clip_to_ce=True)
        acc[name] = accuracy(student, xte, yte)
        s_taps.remove()

    for name, value in acc.items():
        print(f"{name:>8}: {value:.3f}")
    return acc


if __name__ == "__main__":
    main(data=sys.argv[1] if len(sys.argv) > 1 else "digits")
