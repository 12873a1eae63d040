"""Time one HKD training step (forward + backward of the loss) and measure its peak memory.

The defaults are the CIFAR-100 setting: B = 64, penultimate width D = 256 for both networks,
K = 16384 negatives, N = 50,000 examples, 100 classes. Runs on CUDA when available. Needs relkd
importable (``pip install -e .``, or ``PYTHONPATH=.`` from the repository root).

    .venv/bin/python benchmarks/hkd_step.py                # HKD, 20 steps
    .venv/bin/python benchmarks/hkd_step.py --loss crd     # CRD in the same setting
    .venv/bin/python benchmarks/hkd_step.py --device cpu --threads 2

Peak memory is the step's own: on CUDA ``max_memory_allocated`` above what the loss and the inputs
already hold; on the CPU the growth of the process's peak resident set (``ru_maxrss``) over the
steps, which counts only memory beyond the largest footprint reached before them.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import relkd.losses as L


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--loss", default="hkd", choices=["hkd", "crd"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=256, help="penultimate width of both networks")
    p.add_argument("--negatives", type=int, default=16384)
    p.add_argument("--num-data", type=int, default=50_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    targets = torch.randint(0, args.classes, (args.num_data,))
    extra = {"hkd": {"targets": targets}, "crd": {"num_data": args.num_data, "targets": targets}}
    loss = L.build(
        args.loss,
        student_dim=args.dim,
        teacher_dim=args.dim,
        num_negatives=args.negatives,
        **extra[args.loss],
    ).to(device)
    b, d = args.batch, args.dim
    student = torch.randn(b, d, device=device, requires_grad=True)
    teacher = torch.randn(b, d, device=device)
    logits_s, logits_t = (
        torch.randn(b, args.classes, device=device),
        torch.randn(b, args.classes, device=device),
    )

    def step() -> None:
        index = torch.randperm(args.num_data, device=device)[:b]
        taps = ({"penultimate": student, "logits": logits_s}, {"penultimate": teacher, "logits": logits_t})
        loss.distill(*taps, {"index": index}).backward()
        student.grad = None

    sync(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - held) / 2**20
        what = "CUDA max_memory_allocated above the held state"
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**10
        what = "growth of peak RSS (ru_maxrss)"
    banks = sum(buf.numel() * buf.element_size() for buf in loss.buffers()) / 2**20
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
    print(
        f"{args.loss}: B={b} D={d} K={args.negatives} N={args.num_data} on {name}\n"
        f"  step (forward + backward): median {1e3 * statistics.median(times):.1f} ms, "
        f"mean {1e3 * statistics.mean(times):.1f} ms over {args.steps} steps\n"
        f"  peak step memory: {peak:.1f} MiB ({what}); banks and buffers held: {banks:.1f} MiB"
    )


if __name__ == "__main__":
    main()
