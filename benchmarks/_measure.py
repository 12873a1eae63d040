"""Timing and peak-memory measurement shared by the benchmark scripts.

Time: median wall time of ``repeats`` forward+backward calls after a warm-up (CUDA synchronised).
Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` above the inputs; on CPU each case runs
in a fresh subprocess and reports the growth of the peak resident set size (``ru_maxrss``) above the
resident size after the inputs were built — an upper bound on what the computation allocated.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

MiB = 1024 * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_cuda(fn: Callable[[], None], device: torch.device) -> float:
    """Peak MiB allocated by ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MiB


def peak_memory_cpu_child(fn: Callable[[], None]) -> float:
    """Call inside a fresh process: MiB of peak RSS growth during ``fn()``."""
    base = _rss_bytes()
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(0.0, (peak - base) / MiB)


def run_child(module: str, args: list[str], timeout: float = 1800) -> dict:
    """Run ``python -m module args`` and parse the JSON it prints on its last line."""
    # Large blocks straight from mmap, returned on free: the peak RSS then tracks the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])
