"""RKD, SP, CC and PKT in your own training loop, sharing one relation graph per network.

    python examples/relational.py                   # digits: a few seconds of one CPU core
    python examples/relational.py fashion_mnist     # Fashion-MNIST (10,000 training images)

The setting of relkd's built-in digits experiment (``relkd run``): the teacher (an MLP) learns from
every labelled training image; each student (a smaller MLP) gets 100 of the labels (10 per class) and
sees the other images without labels, through the distillation terms only. Trains the student alone
and with the four relational losses together, and prints the test accuracies. It shows:

- the embeddings (the classifier's input) taken with a forward hook, ``relkd.models.FeatureTaps(model,
  {"emb": "fc:input"})``, so the models stay as they are;
- one ``relkd.graphs.RelationGraph`` per network and step, passed to every loss: each loss reads its
  relations (distances, angles, cosines, kernels) from the graph, so each side's Gram matrix is
  computed once however many losses read it. Tensors work too (``rkd(s_emb, t_emb)``); the loss
  detaches the teacher's side;
- the weights of the built-in methods (``relkd/configs/methods/{rkd,sp,cc,pkt}.yaml``, the CIFAR-100
  benchmark's): cross-entropy + 1 x RKD (its defaults: distance 25, angle 50) + 3000 x SP + 24 x CC
  (the paper's Gaussian kernel, weighted to the benchmark's gradient scale) + 30000 x PKT.

SP reads the last feature map before pooling (the tap ``feature_map`` of relkd's models); in an MLP
that is the last hidden layer, the embedding itself, so all four losses share one graph here. On a
CNN, give SP the graph of that map: ``RelationGraph.from_features(feature_map)`` flattens
``[B, C, H, W]`` to ``[B, C*H*W]``.
"""

from __future__ import annotations

import sys

import torch
from setting import accuracy, hide_labels, load, mlp, train_student, train_teacher

import relkd.losses
from relkd.graphs import RelationGraph
from relkd.models import FeatureTaps

WEIGHTS = {"rkd": 1.0, "sp": 3000.0, "cc": 24.0, "pkt": 30000.0}


def main(epochs: int = 15, seed: int = 0, data: str = "digits", labels: int = 100) -> dict[str, float]:
    """Test accuracies of the teacher, the student alone and the student with the four losses."""
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

    torch.manual_seed(seed)
    student = mlp(size, 32)
    s_taps, t_taps = FeatureTaps(student, {"emb": "fc:input"}), FeatureTaps(teacher, {"emb": "fc:input"})
    losses = {name: relkd.losses.build(name) for name in WEIGHTS}

    def distill(logits, idx):
        with torch.no_grad():
            teacher(xtr[idx])
        g_s, g_t = RelationGraph(s_taps["emb"]), RelationGraph(t_taps["emb"])
        return sum(weight * losses[name](g_s, g_t) for name, weight in WEIGHTS.items())

    train_student(student, xtr, y, epochs, seed, distill)
    acc["rkd+sp+cc+pkt"] = accuracy(student, xte, yte)
    for name, value in acc.items():
        print(f"{name:>14}: {value:.3f}")
    return acc


if __name__ == "__main__":
    main(data=sys.argv[1] if len(sys.argv) > 1 else "digits")
