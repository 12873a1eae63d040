"""Plug relkd losses into your own training loop: any model, features taken with a forward hook.

    python examples/own_training_loop.py

Trains a small teacher on scikit-learn's digits, then a smaller student with CE + KD + RKD + CC, and
prints both test accuracies. The losses are plain modules called on embeddings and logits, at the
weights of relkd's built-in methods: KD 0.9 (T = 4), RKD 1 (its defaults: distance 25, angle 50), CC 24.
One example per family of losses (logit, relational, bank-based, multi-map, staged) is in this folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import relkd.losses as L


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def penultimate(model: nn.Sequential) -> dict:
    """Keep the input of the last layer (the embedding) on every forward; the model is unchanged."""
    store = {}
    model[-1].register_forward_hook(lambda m, inp, out: store.__setitem__("emb", inp[0]))
    return store


def train(model, x, y, epochs, extra=None):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            if extra is not None:
                loss = loss + extra(logits, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(epochs: int = 15, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    data = load_digits()
    xtr, xte, ytr, yte = train_test_split(
        data.data / 16.0, data.target, test_size=450, random_state=0, stratify=data.target
    )
    xtr, xte = torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)

    teacher = mlp(256)
    train(teacher, xtr, ytr, epochs)
    teacher.eval()

    # --- the part that is relkd: losses are plain modules called on embeddings and logits ---
    student = mlp(32)
    s_feat, t_feat = penultimate(student), penultimate(teacher)
    kd, rkd, cc = L.build("kd", T=4.0), L.build("rkd"), L.build("cc")

    def distill(logits, idx):
        with torch.no_grad():
            t_logits = teacher(xtr[idx])
        return (
            0.9 * kd(logits, t_logits)
            + 1.0 * rkd(s_feat["emb"], t_feat["emb"])
            + 24.0 * cc(s_feat["emb"], t_feat["emb"])
        )

    train(student, xtr, ytr, epochs, extra=distill)
    acc = {"teacher": accuracy(teacher, xte, yte), "student": accuracy(student, xte, yte)}
    print(f"teacher test accuracy: {acc['teacher']:.3f}")
    print(f"student test accuracy: {acc['student']:.3f}")
    return acc


if __name__ == "__main__":
    main()
