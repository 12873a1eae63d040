"""The weight of the paper's CC kernel that matches the CIFAR-100 benchmark's CC gradient scale.

The CIFAR-100 benchmark's CC (RepDistiller's ``distiller_zoo/CC.py``, relkd's ``cc_chain``: trainable
128-d linear embeddings of both penultimate features, then the chain of residual products) runs at
weight 0.02. relkd's ``cc`` is the paper's Taylor-RBF kernel on the normalised penultimate features,
whose gradient at the same weight is thousands of times smaller. This script measures, at
initialisation, the weight ``w`` that gives the kernel the chain's gradient scale relative to the
cross-entropy:

    w * |grad L_kernel| / |grad CE| = 0.02 * |grad L_chain| / |grad CE|

with every gradient taken over the student's parameters (the global L2 norm) on one batch, for
resnet32x4 (teacher) -> resnet8x4 (student) from ``relkd.models.create``, 100 classes, batch 64 (the
benchmark's). Inputs are CIFAR-shaped: Fashion-MNIST test images resized to 32x32, repeated over three
channels and standardised, with their labels (``--data fashion_mnist``, the default: natural images,
whose features vary between examples as CIFAR's do), or standard-normal 32x32x3 tensors with uniform
random labels (``--data random``: white noise, whose features at initialisation are nearly the same for
every example, so the kernel's relations, and its gradient, are far smaller). The student is in train mode;
the teacher is in eval mode, as in distillation, with its batch-norm statistics first estimated on
``--bn-batches`` batches of the same inputs (a trained teacher's statistics match its inputs; freshly
initialised ones, 0 and 1, would leave the deep teacher's features an arbitrary scale). No weight of
either network is trained. One line per seed (new networks, embeddings and batch), then the mean.

    python -m benchmarks.cc_calibration                      # 10 seeds, Fashion-MNIST inputs, CPU
    python -m benchmarks.cc_calibration --data random --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from relkd import models
from relkd.losses import CCChainLoss
from relkd.losses.functional import correlation_chain, correlation_congruence
from relkd.models import FeatureTaps, resolve_taps

CHAIN_WEIGHT = 0.02  # RepDistiller scripts/run_cifar_distill.sh: --distill correlation -a 0 -b 0.02


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "random"])
    p.add_argument("--fashion-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bn-batches", type=int, default=4, help="batches that estimate the teacher's BN stats")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    return p.parse_args()


def batches(args: argparse.Namespace, seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of CIFAR-shaped inputs ``[B, 3, 32, 32]`` and labels ``[B]``."""
    g = torch.Generator().manual_seed(seed)
    if args.data == "random":
        return [
            (
                torch.randn(args.batch, 3, 32, 32, generator=g),
                torch.randint(0, 100, (args.batch,), generator=g),
            )
            for _ in range(count)
        ]
    from relkd.data.fashion_mnist import read_idx

    root = Path(args.fashion_root)
    images = torch.from_numpy(read_idx(root / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0)
    labels = torch.from_numpy(read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    images = (images - images.mean()) / images.std()
    pick = torch.randperm(len(images), generator=g)[: count * args.batch].view(count, args.batch)
    out = []
    for rows in pick:
        x = F.interpolate(images[rows].unsqueeze(1), size=32, mode="bilinear", align_corners=False)
        out.append((x.expand(-1, 3, -1, -1).contiguous(), labels[rows]))
    return out


def grad_norm(value: torch.Tensor, params: list[torch.nn.Parameter], retain: bool = True) -> float:
    grads = torch.autograd.grad(value, params, retain_graph=retain, allow_unused=True)
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))


def measure(args: argparse.Namespace, seed: int) -> dict[str, float]:
    device = torch.device(args.device)
    torch.manual_seed(seed)
    teacher = models.create(args.teacher, num_classes=100).to(device)
    student = models.create(args.student, num_classes=100).to(device).train()
    data = batches(args, seed, args.bn_batches + 1)
    for m in teacher.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average over the estimation batches
    teacher.train()
    with torch.no_grad():
        for x, _ in data[:-1]:
            teacher(x.to(device))
    teacher.eval()

    x, y = (t.to(device) for t in data[-1])
    with FeatureTaps(teacher, resolve_taps(teacher, ["penultimate"])) as taps, torch.no_grad():
        teacher(x)
        f_t = taps["penultimate"]
    with FeatureTaps(student, resolve_taps(student, ["penultimate"])) as taps:
        logits = student(x)
        f_s = taps["penultimate"]
    chain = CCChainLoss(f_s.shape[1], f_t.shape[1]).to(device)  # the benchmark's LinearEmbed, 128-d
    params = [p for p in student.parameters() if p.requires_grad]

    ce = F.cross_entropy(logits, y)
    l_chain = correlation_chain(chain.embed_s(f_s), chain.embed_t(f_t))
    l_kernel = correlation_congruence(f_s, f_t)
    g_ce = grad_norm(ce, params)
    g_chain = grad_norm(CHAIN_WEIGHT * l_chain, params)
    g_kernel = grad_norm(l_kernel, params)
    feat = [
        float(torch.autograd.grad(v, f_s, retain_graph=True)[0].norm())
        for v in (ce, CHAIN_WEIGHT * l_chain, l_kernel)
    ]
    return {
        "seed": seed,
        "ce": float(ce.detach()),
        "chain_loss": float(l_chain.detach()),
        "kernel_loss": float(l_kernel.detach()),
        "chain_over_ce": g_chain / g_ce,
        "kernel_over_ce": g_kernel / g_ce,
        "weight": g_chain / g_kernel,
        "weight_feature_grad": feat[1] / feat[2],
        "chain_over_ce_feature": feat[1] / feat[0],
    }


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    rows = [measure(args, seed) for seed in args.seeds]
    print(
        f"{args.teacher} -> {args.student}, batch {args.batch}, {args.data} inputs; gradients over the "
        "student's parameters\n"
    )
    head = ["seed", "CE", "chain loss", "kernel loss", "0.02 chain / CE", "kernel / CE", "weight"]
    print("| " + " | ".join([*head, "weight (feature grad)"]) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['seed']} | {r['ce']:.3f} | {r['chain_loss']:.4g} | {r['kernel_loss']:.4g} | "
            f"{r['chain_over_ce']:.4g} | {r['kernel_over_ce']:.4g} | {r['weight']:.4g} | "
            f"{r['weight_feature_grad']:.4g} |"
        )
    weights = [r["weight"] for r in rows]
    spread = statistics.stdev(weights) if len(weights) > 1 else 0.0
    summary = {
        "weight_mean": statistics.fmean(weights),
        "weight_std": spread,
        "weight_min": min(weights),
        "weight_max": max(weights),
        "ratio_0.02_chain_to_kernel_at_0.02": statistics.fmean(r["weight"] for r in rows) / CHAIN_WEIGHT,
    }
    print(
        f"\nweight giving the kernel the chain's gradient scale: {summary['weight_mean']:.4g} "
        f"(std {spread:.3g}, range {summary['weight_min']:.4g} to {summary['weight_max']:.4g}); at 0.02 the "
        f"kernel's gradient is {summary['ratio_0.02_chain_to_kernel_at_0.02']:.4g} times smaller"
    )
    if args.out is not None:
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows, **summary}, indent=2)
        )


if __name__ == "__main__":
    main()
