"""One CIFAR-shaped training epoch of a distillation step: eager vs compiled, float32 vs AMP.

    python -m benchmarks.train_epoch                              # CUDA if present, else a CPU fallback
    python -m benchmarks.train_epoch --device cpu --images 1024 --losses kd rkd
    python -m benchmarks.train_epoch --device cuda --out results/

The teacher ``resnet32x4`` (frozen, eval mode) and the student ``resnet8x4`` of the CIFAR-100 benchmark
run on random ``[N, 3, 32, 32]`` tensors held on the device (``N = 50,000``, batch 64: one epoch is
782 steps; the data's content does not change the cost). Each step is the engine's default one:
cross-entropy plus the chosen relkd losses on the penultimate features (``crd``: ``K = 16384``
negatives, banks of ``N`` entries, updated in place), backward, SGD. Modes: ``eager``, ``compiled``
(the step's networks and losses through :func:`relkd.compile`, shapes specialised; the first,
compiling steps are left out of the timing and reported apart), ``amp`` (bfloat16 autocast on CUDA)
and ``compiled+amp``. Reported per mode: the epoch's wall time (synchronised), steps per second, the
compile time, and the peak memory of a step (CUDA: ``max_memory_allocated``).

The CPU fallback (no CUDA device, or ``--device cpu``) runs the same code on fewer images, for a dry
run of the script; its times say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import relkd
import relkd.losses as L
from benchmarks._measure import MiB, meta, sync
from relkd import models

WEIGHTS = {"kd": 0.9, "rkd": 1.0, "crd": 0.8, "pkt": 30000.0, "sp": 3000.0, "cc": 24.0}


def build(args: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    teacher = models.create("resnet32x4", num_classes=100).to(device).eval().requires_grad_(False)
    student = models.create("resnet8x4", num_classes=100).to(device)
    taps = {"penultimate": "fc:input"}
    s_taps, t_taps = models.FeatureTaps(student, taps), models.FeatureTaps(teacher, taps)
    n = args.images
    extra = {
        "crd": {"student_dim": 256, "teacher_dim": 256, "num_data": n, "num_negatives": args.negatives},
    }
    losses = {name: L.build(name, **extra.get(name, {})).to(device) for name in args.losses}
    g = torch.Generator().manual_seed(1)
    data = torch.randn(n, 3, 32, 32, generator=g).to(device)
    labels = torch.randint(0, 100, (n,), generator=g).to(device)
    return student, teacher, s_taps, t_taps, losses, data, labels


def step_fn(student, teacher, s_taps, t_taps, losses):
    def step(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(x)
        t_feat = t_taps["penultimate"]
        logits = student(x)
        s_feat = s_taps["penultimate"]
        total = F.cross_entropy(logits, y)
        for name, loss in losses.items():
            if name == "kd":
                total = total + WEIGHTS[name] * loss(logits, t_logits)
            elif name == "crd":
                total = total + WEIGHTS[name] * loss(s_feat, t_feat, index)
            else:
                total = total + WEIGHTS[name] * loss(s_feat, t_feat)
        return total

    return step


def run_mode(mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    student, teacher, s_taps, t_taps, losses, data, labels = build(args, device)
    if "compiled" in mode:
        # The networks through wrappers (their own calls stay eager), the losses in place.
        student_c, teacher_c = torch.compile(student, dynamic=False), torch.compile(teacher, dynamic=False)
        losses = {name: relkd.compile(copy.deepcopy(loss)) for name, loss in losses.items()}
        step = step_fn(student_c, teacher_c, s_taps, t_taps, losses)
    else:
        step = step_fn(student, teacher, s_taps, t_taps, losses)
    params = list(student.parameters()) + [p for loss in losses.values() for p in loss.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    amp = "amp" in mode and device.type == "cuda"
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(2)).to(device)
    batches = [order[i : i + args.batch] for i in range(0, len(order) - args.batch + 1, args.batch)]

    def one(index: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = step(data[index], labels[index], index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for index in batches[: args.warmup]:  # compiles, in the compiled modes
        one(index)
    sync(device)
    first = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for index in batches:
        one(index)
    sync(device)
    epoch = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / MiB if device.type == "cuda" else None
    return {
        "mode": mode,
        "epoch_s": epoch,
        "steps": len(batches),
        "steps_per_s": len(batches) / epoch,
        "warmup_s": first,
        "peak_mib": peak,
    }


def markdown(info: dict, rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{info['date']}, {info['machine']}, torch {info['torch']}, commit {info['commit']}: resnet32x4 -> "
        f"resnet8x4, {args.images} random 32x32 images, batch {args.batch}, losses CE + "
        f"{' + '.join(args.losses)}.",
        "",
        "| mode | epoch s | steps/s | first steps s (compile) | peak MiB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(
            f"| {r['mode']} | {r['epoch_s']:.2f} | {r['steps_per_s']:.1f} | {r['warmup_s']:.1f} | {peak} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, help="default: 50,000 on CUDA, 512 on the CPU")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--negatives", type=int, default=16384)
    p.add_argument("--losses", nargs="+", default=["kd", "rkd", "crd"], choices=sorted(WEIGHTS))
    p.add_argument("--modes", nargs="+", default=["eager", "compiled", "amp", "compiled+amp"])
    p.add_argument("--warmup", type=int, default=3, help="steps before the timed epoch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.images is None:
        args.images = 50_000 if device.type == "cuda" else 512
    args.negatives = min(args.negatives, args.images // 2)
    info = meta(device, images=args.images, batch=args.batch, losses=args.losses)
    rows = []
    for mode in args.modes:
        rows.append(run_mode(mode, args, device))
        print(json.dumps(rows[-1]), flush=True)
    text = markdown(info, rows, args)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_epoch.md").write_text(text + "\n")
        (args.out / "train_epoch.json").write_text(json.dumps({"meta": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
