"""RKD angle, forward + backward: chunk sizes, the fused (compiled) chunk body, and the reference.

    python -m benchmarks.rkd_angle                                # B in {256, 1024}, D = 128, CPU
    python -m benchmarks.rkd_angle --batches 512 --chunks 1 4 16 64 --fused
    python -m benchmarks.rkd_angle --device cuda --dims 128 2048 --fused

Every form runs interleaved in rounds in one process (:mod:`benchmarks._measure`): relkd's Gram-chunked
pass with the default chunk (:func:`relkd.graphs.angles.default_chunk`, by a memory budget) and with
each of ``--chunks`` anchors per chunk, eager and, with ``--fused``, with the compiled chunk body
(the first call compiles it and is not timed), and the reference (RepDistiller's ``B x B x D``
difference tensor and ``B^3`` product) where its estimated memory fits ``--max-reference-gib``.
Prints a markdown table: median time with the range of the round medians, the number of chunks, the
peak memory above the inputs.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import torch

import benchmarks.reference as R
from benchmarks._measure import fmt_range, format_mib, interleaved, meta, peak_memory
from relkd.graphs.angles import default_chunk
from relkd.losses.functional import rkd_angle


def forms(b: int, d: int, device: torch.device, a: argparse.Namespace) -> dict[str, tuple[Callable, int]]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(b, d, generator=g).to(device).requires_grad_()
    t = torch.randn(b, d, generator=g).to(device)

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            s.grad = None
            fn().backward()

        return run

    out = {}
    chunk = default_chunk(b, device)
    for c in dict.fromkeys([chunk, *a.chunks]):
        tag = "default" if c == chunk else "chunk"
        out[f"relkd {tag} {c}"] = (step(lambda c=c: rkd_angle(s, t, chunk=c)), c)
        if a.fused:
            out[f"relkd fused {tag} {c}"] = (step(lambda c=c: rkd_angle(s, t, chunk=c, fused=True)), c)
    if 4 * (3 * b * b * d + 3 * b**3) / 2**30 <= a.max_reference_gib:
        out["reference"] = (step(lambda: R.rkd_angle(s, t)), 0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--dims", type=int, nargs="+", default=[128])
    p.add_argument("--chunks", type=int, nargs="*", default=[], help="anchors per chunk, besides the default")
    p.add_argument("--fused", action="store_true", help="also the compiled chunk body")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-reference-gib", type=float, default=4.0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    info = meta(device, rounds=a.rounds)
    lines = [
        f"{info['date']}, {info['machine']}, torch {info['torch']}, device {info['device']}, "
        f"commit {info['commit']}.",
        "",
        "| B | D | form | chunks | ms | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    clock = "wall" if device.type == "cuda" else "cpu"
    for b in a.batches:
        for d in a.dims:
            steps = forms(b, d, device, a)
            times = interleaved(
                {k: fn for k, (fn, _) in steps.items()}, device, rounds=a.rounds, calls=1, warmup=1
            )
            for name, (fn, c) in steps.items():
                chunks = math.ceil(b / c) if c else ""
                row = {"B": b, "D": d, "form": name, "chunks": chunks, "ms": times[name].summary(clock)}
                row["mib"] = peak_memory(fn, device)
                print(json.dumps(row), flush=True)
                cells = [
                    str(b),
                    str(d),
                    name,
                    str(chunks),
                    fmt_range(row["ms"], ".1f"),
                    format_mib(row["mib"]),
                ]
                lines.append("| " + " | ".join(cells) + " |")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
