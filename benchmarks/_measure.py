"""Interleaved timing and peak memory, shared by the benchmark scripts.

Time. The forms of a comparison (the Gram floor, relkd, the reference code path, ...) run in rounds:
each round calls every form a few times, in an order rotated by one place per round, so the slow
drifts of a shared machine (other jobs, frequency, cache pressure) reach every form alike. A form's
time is the median over rounds of its median call in the round, and its range the lowest and the
highest of those round medians. Two clocks are read around every call: the wall time
(``time.perf_counter``; synchronised on CUDA) and the CPU time of the process (``time.process_time``;
with one thread, the time the thread ran, which leaves out the time another job held the core). A
ratio of two forms is taken round by round (paired) and summarised the same way.

Memory. The peak of the tensor memory a call allocates above what was allocated before it: on CUDA
``max_memory_allocated``, on the CPU the running total of PyTorch's CPU allocator read from the
profiler's allocation records (saved activations, gradients and temporaries all count).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MiB = 1024 * 1024
# A form whose first call takes longer than this many seconds is called once per round, in at most
# SLOW_ROUNDS rounds; a fast one is called often enough to fill ROUND_S per round (at most MAX_CALLS).
SLOW_CALL_S = 1.0
SLOW_ROUNDS = 3
ROUND_S = 0.03
MAX_CALLS = 30


# -------------------------------------------------------------------------------------------- time
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Per-round medians of one form, in seconds, on both clocks."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def summary(self, clock: str = "cpu") -> tuple[float, float, float]:
        """``(median, lowest, highest)`` of the round medians, in milliseconds."""
        values = getattr(self, clock)
        return 1e3 * statistics.median(values), 1e3 * min(values), 1e3 * max(values)


def _call(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    forms: dict[str, Callable[[], Any]],
    device: torch.device,
    rounds: int = 7,
    calls: int = 3,
    warmup: int = 1,
) -> dict[str, Timing]:
    """Time every form in ``rounds`` interleaved rounds of ``calls`` calls (see the module docstring).

    Each form is called ``warmup`` times first (compiled forms compile there); a form slower than
    :data:`SLOW_CALL_S` is then called once per round in at most :data:`SLOW_ROUNDS` rounds, a fast one
    ``calls`` times or as often as fills :data:`ROUND_S` (at most :data:`MAX_CALLS`).
    """
    first = {}
    for name, fn in forms.items():
        for _ in range(warmup):
            first[name] = _call(fn, device)[0]
    names = list(forms)
    out = {name: Timing() for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            slow = first[name] > SLOW_CALL_S
            if slow and r >= SLOW_ROUNDS:
                continue
            n = 1 if slow else max(calls, min(MAX_CALLS, int(ROUND_S / max(first[name], 1e-6))))
            samples = [_call(forms[name], device) for _ in range(n)]
            out[name].wall.append(statistics.median(w for w, _ in samples))
            out[name].cpu.append(statistics.median(c for _, c in samples))
    return out


def paired_ratio(a: Timing, b: Timing, clock: str = "cpu") -> tuple[float, float, float]:
    """``a / b`` round by round (over the rounds both ran): ``(median, lowest, highest)``."""
    ratios = [x / y for x, y in zip(getattr(a, clock), getattr(b, clock), strict=False) if y > 0]
    return statistics.median(ratios), min(ratios), max(ratios)


# ------------------------------------------------------------------------------------------ memory
def _walk(nodes: Sequence[Any]) -> Iterator[Any]:
    for node in nodes:
        yield node
        yield from _walk(node.children)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs lines on every use."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def allocations_cpu(fn: Callable[[], Any]) -> list[tuple[int, int]] | None:
    """``(bytes, running total)`` of every CPU tensor allocation (negative bytes: a free) made by ``fn()``,
    in order, from the profiler's allocation records; ``None`` where this torch lacks them."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        return None
    records = sorted(
        (e for e in _walk(events) if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns
    )
    return [(e.extra_fields.alloc_size, e.extra_fields.total_allocated) for e in records]


def peak_memory_cpu(fn: Callable[[], Any]) -> float | None:
    """MiB of CPU tensor memory at the peak of ``fn()`` above what was allocated before it."""
    records = allocations_cpu(fn)
    if records is None:
        return None
    if not records:
        return 0.0
    base = records[0][1] - records[0][0]
    return max(0.0, (max(total for _, total in records) - base) / MiB)


def peak_memory_cuda(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak MiB allocated by ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MiB


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float | None:
    return peak_memory_cuda(fn, device) if device.type == "cuda" else peak_memory_cpu(fn)


# --------------------------------------------------------------------------------------- reporting
def commit() -> str:
    """The repository's commit (``git describe --always --dirty``), or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return f"{model or platform.processor()}, {torch.get_num_threads()} thread(s) of {os.cpu_count()} cores"


def meta(device: torch.device, **extra: Any) -> dict[str, Any]:
    """Date, machine, torch, commit and the load of the machine when the run starts."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "date": datetime.date.today().isoformat(),
        "machine": machine(device),
        "torch": torch.__version__,
        "device": str(device),
        "commit": commit(),
        "load": round(load, 2),
        **extra,
    }


def fmt_range(ms: tuple[float, float, float], spec: str = ".2f") -> str:
    """``median [lowest-highest]``."""
    mid, lo, hi = ms
    return f"{mid:{spec}} [{lo:{spec}}-{hi:{spec}}]"


def format_mib(x: float | None) -> str:
    """MiB for a table: one decimal under 10."""
    return "" if x is None else f"{x:.1f}" if x < 10 else f"{x:.0f}"


def time_call(fn: Callable[[], None], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (a single form, not interleaved)."""
    for _ in range(warmup):
        fn()
    return statistics.median(_call(fn, device)[0] for _ in range(repeats))
