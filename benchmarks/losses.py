"""Every registered loss, forward + backward: relkd against the Gram floor and the textbook form.

    python -m benchmarks.losses                                   # CPU, 1 thread, the full grid
    python -m benchmarks.losses --losses rkd_angle sp --batches 256 --dims 2048
    python -m benchmarks.losses --device cuda --amp --compile --out results/

For each ``(B, D)`` the Gram floor comes first: forward + backward of ``X @ X.T`` on ``X [B, D]``, the
least any pairwise relation can cost. Then every loss on ``[B, D]`` student and teacher embeddings
(``kd``: ``[B, D]`` logits; ``crd``/``hkd``: ``N = 50,000``, ``K = 16384``, a 128-d projection; the
multi-layer losses: three ``[B, D / 16, 4, 4]`` feature maps): median forward+backward time, peak
memory above the inputs, the ratio to the floor and to the textbook form of the same formula
(:mod:`benchmarks.textbook`, always run eagerly): ``speed-up`` and ``memory saving`` are the
textbook's time and memory over relkd's. A textbook case whose estimated memory exceeds
``--max-textbook-gib`` is skipped and says so. ``--compile`` compiles the relkd forms (not the
textbook, nor the floor); ``--amp`` runs every step under bfloat16 autocast.

Time: the median of up to 5 steps after a warm-up step; a step slower than 2 s is timed on the
warm-up and on the memory step only. On the CPU it is the CPU time of the process (see :func:`timed`),
on CUDA the synchronised wall time. Memory: the peak of the tensor memory a step allocates above what
was allocated before it, measured on the step after the warm-up; on CUDA from ``max_memory_allocated``,
on the CPU from the CPU allocator's running total (:func:`peak_memory_cpu`). Prints markdown tables;
``--out DIR`` also writes ``losses.md`` and ``losses.json`` there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import benchmarks.textbook as T
import relkd.losses as L
from benchmarks._measure import MiB, peak_memory_cuda
from relkd.losses import functional as F

NUM_DATA, NEGATIVES, CLASSES = 50_000, 16384, 100
SLOW_STEP_S = 2.0


# ----------------------------------------------------------------------------------- measurement
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


def peak_memory_cpu(fn: Callable[[], Any]) -> float | None:
    """MiB of tensor memory at the peak of ``fn()`` above what was allocated before it.

    The CPU counterpart of CUDA's ``max_memory_allocated``: the running total of PyTorch's CPU
    allocator, read from the profiler's allocation records (``None`` where this torch lacks them).
    """
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        return None
    allocs = [e for e in _walk(events) if e.tag == _EventType.Allocation]
    if not allocs:
        return 0.0
    first = min(allocs, key=lambda e: e.start_time_ns).extra_fields
    base = first.total_allocated - first.alloc_size
    return max(0.0, (max(e.extra_fields.total_allocated for e in allocs) - base) / MiB)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float | None:
    return peak_memory_cuda(fn, device) if device.type == "cuda" else peak_memory_cpu(fn)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one ``fn()``: wall time on CUDA (synchronised), CPU time of the process on the CPU.

    The CPU time does not count the time the process waits for a core, so a shared machine gives the
    same answer as a free one (with one thread, it is the wall time on a free core).
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def measure(step: Callable[[], Any], device: torch.device) -> dict[str, float | None]:
    """``{"ms", "mib"}`` of a step: a warm-up step, a memory step, then the timed steps."""
    first = timed(step, device)
    seconds: list[float] = []
    mib = peak_memory(lambda: seconds.append(timed(step, device)), device)
    if min(first, *seconds) > SLOW_STEP_S:
        return {"ms": 1e3 * statistics.mean([first, *seconds]), "mib": mib}
    repeats = 3 if seconds[0] > SLOW_STEP_S / 5 else 5
    return {"ms": 1e3 * median_time(step, device, repeats, warmup=0), "mib": mib}


def elementwise_throughput(device: torch.device) -> dict[str, float]:
    """``a.mul_(b)`` on 2^24 float32 elements: elements/s and GB/s (two reads and one write each)."""
    a, b = torch.rand(2, 1 << 24, device=device).unbind()
    seconds = median_time(lambda: a.mul_(b), device, repeats=7)
    return {"gelem_per_s": a.numel() / seconds / 1e9, "gb_per_s": 12 * a.numel() / seconds / 1e9}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return f"{model or platform.processor()}, {torch.get_num_threads()} thread(s) of {os.cpu_count()} cores"


# ----------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One loss at one ``(B, D)``: the relkd callable, its inputs and the textbook form, if any."""

    relkd: Callable[..., torch.Tensor]
    inputs: tuple
    textbook: Callable[..., torch.Tensor] | None = None
    textbook_gib: float = 0.0
    params: tuple[torch.Tensor, ...] = ()
    triplets: int = 0
    note: str = ""
    leaves: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        flat = [x for a in self.inputs for x in (a if isinstance(a, list | tuple) else [a])]
        self.leaves = [x for x in flat if isinstance(x, torch.Tensor) and x.requires_grad]
        self.leaves += list(self.params)


CaseFn = Callable[[int, int, torch.device], Case]
CASES: dict[str, CaseFn] = {}
# Registered losses whose benchmark case has another name (the functional pieces of ``rkd`` are
# measured on their own as well).
_EXTRA = ("rkd_distance", "rkd_angle")


def case(name: str) -> Callable[[CaseFn], CaseFn]:
    def deco(fn: CaseFn) -> CaseFn:
        CASES[name] = fn
        return fn

    return deco


def _pair(b: int, d: int, device: torch.device, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(b * 7919 + d)
    s = (scale * torch.randn(b, d, generator=g)).to(device).requires_grad_()
    return s, (scale * torch.randn(b, d, generator=g)).to(device)


def _gib(floats: float) -> float:
    return 4 * floats / 2**30


@case("kd")
def _kd(b: int, d: int, device: torch.device) -> Case:
    return Case(F.kd, _pair(b, d, device, scale=3.0), T.kd)


@case("rkd_distance")
def _rkd_distance(b: int, d: int, device: torch.device) -> Case:
    return Case(F.rkd_distance, _pair(b, d, device), T.rkd_distance, _gib(8 * b * b))


# The textbook angle: ~3 B^2 D floats of normalised differences and ~3 B^3 of cosines and gradients.
def _angle_gib(b: int, d: int) -> float:
    return _gib(3 * b * b * d + 3 * b**3)


@case("rkd_angle")
def _rkd_angle(b: int, d: int, device: torch.device) -> Case:
    return Case(F.rkd_angle, _pair(b, d, device), T.rkd_angle, _angle_gib(b, d), triplets=b**3)


_RKD = L.RKDLoss()


@case("rkd")
def _rkd(b: int, d: int, device: torch.device) -> Case:
    return Case(_RKD, _pair(b, d, device), T.rkd, _angle_gib(b, d), triplets=b**3)


@case("sp")
def _sp(b: int, d: int, device: torch.device) -> Case:
    return Case(F.similarity_preserving, _pair(b, d, device), T.sp, _gib(8 * b * b))


@case("cc")
def _cc(b: int, d: int, device: torch.device) -> Case:
    return Case(F.correlation_congruence, _pair(b, d, device), T.cc, _gib(12 * b * b))


@case("pkt")
def _pkt(b: int, d: int, device: torch.device) -> Case:
    return Case(F.pkt, _pair(b, d, device), T.pkt, _gib(12 * b * b))


def _index(b: int, device: torch.device) -> torch.Tensor:
    return torch.randperm(NUM_DATA, generator=torch.Generator().manual_seed(b))[:b].to(device)


@case("crd")
def _crd(b: int, d: int, device: torch.device) -> Case:
    torch.manual_seed(0)
    loss = L.build("crd", student_dim=d, teacher_dim=d, num_data=NUM_DATA, num_negatives=NEGATIVES)
    loss = loss.to(device)
    fs, ft = _pair(b, d, device)
    index = _index(b, device)
    with torch.no_grad():
        loss(fs, ft, index)  # a training step sets Z; the measured steps run in eval mode
    loss.eval()
    neg = loss.sampler(index, NEGATIVES)

    def relkd(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        return loss(fs, ft, index, neg)

    def textbook(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        s, t = loss.embed_s(fs), loss.embed_t(ft)
        banks = (loss.student_bank.memory, loss.teacher_bank.memory)
        return T.crd_gather(s, t, index, *banks, neg, NUM_DATA, loss.normalizer)

    rows = 2 * b * (NEGATIVES + 1) * 128
    note = "bank update excluded (eval mode)"
    return Case(relkd, (fs, ft), textbook, _gib(1.5 * rows), tuple(loss.parameters()), note=note)


@case("hkd")
def _hkd(b: int, d: int, device: torch.device) -> Case:
    torch.manual_seed(0)
    targets = torch.arange(NUM_DATA) % CLASSES
    loss = L.build("hkd", student_dim=d, teacher_dim=d, targets=targets, num_negatives=NEGATIVES)
    loss = loss.to(device).eval()
    fs, ft = _pair(b, d, device)
    ls, lt = _pair(b, CLASSES, device, scale=3.0)
    index = _index(b, device)
    neg = loss.sampler(index, NEGATIVES)

    def relkd(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        return loss(fs, ft, ls, lt, index, neg)

    def textbook(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        # The same projections and graph encoders; only the scoring of the negatives differs.
        s, t = loss.embed_s(fs), loss.embed_t(ft)
        gs, gt = loss.gnn_s(s, loss._knn(ls, s.dtype)), loss.gnn_t(t, loss._knn(lt, t.dtype))
        banks = (loss.student_bank.memory, loss.teacher_bank.memory)
        return T.hkd_gather(s, t, *banks, index, neg, gs, gt)

    rows = 2 * b * NEGATIVES * 128
    note = "bank update excluded (eval mode)"
    return Case(relkd, (fs, ft), textbook, _gib(1.5 * rows), tuple(loss.parameters()), note=note)


def _feature_maps(b: int, d: int, device: torch.device) -> tuple[list, list]:
    g = torch.Generator().manual_seed(b + d)
    shape = (b, max(1, d // 16), 4, 4)
    s = [torch.randn(shape, generator=g).to(device).requires_grad_() for _ in range(3)]
    return s, [torch.randn(shape, generator=g).to(device) for _ in range(3)]


@case("kd_svd")
def _kd_svd(b: int, d: int, device: torch.device) -> Case:
    return Case(L.build("kd_svd").to(device), _feature_maps(b, d, device))


@case("mhgd")
def _mhgd(b: int, d: int, device: torch.device) -> Case:
    loss = L.build("mhgd", teacher_channels=[max(1, d // 16)] * 3).to(device)
    loss.freeze_heads()
    return Case(loss, _feature_maps(b, d, device))


def benchmark_names(requested: Sequence[str] | None) -> list[str]:
    """One name per registered loss (aliases folded), plus the functional pieces of ``rkd``.

    A registered loss without a case is listed too, so that the table shows it is not measured.
    """
    if requested:
        return list(requested)
    by_loss: dict[Any, list[str]] = {}
    for name in L.available():
        by_loss.setdefault(L.LOSSES.get(name), []).append(name)
    names = {next((n for n in group if n in CASES), group[0]) for group in by_loss.values()}
    return [n for n in CASES if n in names or n in _EXTRA] + sorted(names - set(CASES))


# ------------------------------------------------------------------------------------------ runs
def _step(fn: Callable[..., torch.Tensor], c: Case, amp: bool, device: torch.device) -> Callable[[], None]:
    def step() -> None:
        for x in c.leaves:
            x.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = fn(*c.inputs)
        loss.backward()

    return step


def gram_floor(b: int, d: int, device: torch.device, amp: bool) -> float:
    """Median ms of forward + backward of ``X @ X.T`` for ``X [B, D]``."""
    x, _ = _pair(b, d, device)
    ones = torch.ones(b, b, device=device)

    def step() -> None:
        x.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            g = x @ x.T
        g.backward(ones)

    return 1e3 * median_time(step, device, repeats=7, warmup=2)


_COMPILED: dict[Any, Callable] = {}


def _compiled(fn: Callable, dynamic: bool | None) -> Callable:
    """One compiled callable per loss, reused across ``(B, D)`` (with ``dynamic``, one compilation)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=dynamic)
    return _COMPILED[fn]


def run_case(name: str, b: int, d: int, device: torch.device, args: argparse.Namespace) -> dict:
    row: dict[str, Any] = {"loss": name, "B": b, "D": d}
    if name not in CASES:
        return {**row, "error": "no benchmark case"}
    if name not in L.LOSSES and name not in _EXTRA:
        return {**row, "error": "not registered"}
    c = CASES[name](b, d, device)
    row["note"] = c.note
    fn = _compiled(c.relkd, args.dynamic or None) if args.compile else c.relkd
    row.update(measure(_step(fn, c, args.amp, device), device))
    if c.triplets:
        row["ms_per_m_triplets"] = row["ms"] / (c.triplets / 1e6)
    if c.textbook is None:
        row["textbook"] = "none"
    elif c.textbook_gib > args.max_textbook_gib:
        row["textbook"] = f"skipped: needs about {c.textbook_gib:.0f} GiB"
    else:
        with contextlib.suppress(torch.cuda.OutOfMemoryError):
            tb = measure(_step(c.textbook, c, args.amp, device), device)
            row.update(textbook_ms=tb["ms"], textbook_mib=tb["mib"])
        row.setdefault("textbook", "ran" if "textbook_ms" in row else "out of memory")
    return row


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "" if x is None else format(x, spec)


def format_mib(x: float | None) -> str:
    """MiB for a table: one decimal under 10."""
    return "" if x is None else f"{x:.1f}" if x < 10 else f"{x:.0f}"


def markdown(meta: dict, rows: list[dict]) -> str:
    """The results as markdown: the setting, the main table, and time per triplet for the angle."""
    out = [
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, device {meta['device']}, "
        f"compile {meta['compile']}, AMP {'bf16' if meta['amp'] else 'off'}. "
        f"Elementwise throughput (`a.mul_(b)`, 2^24 floats): {meta['gelem_per_s']:.2f} G elements/s, "
        f"{meta['gb_per_s']:.1f} GB/s.",
        "",
        "| loss | B | D | floor ms | relkd ms | x floor | textbook ms | speed-up | relkd MiB | "
        "textbook MiB | memory saving |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['loss']} | {r['B']} | {r['D']} | {_fmt(r.get('floor_ms'), '.2f')} |"
        if "error" in r:
            out.append(f"{head} {r['error']} | | | | | | |")
            continue
        tb = r.get("textbook_ms")
        speed = f"{tb / r['ms']:.1f}x" if tb else r.get("textbook", "")
        mem = ""
        if tb and r["mib"] is not None and r.get("textbook_mib") is not None:
            mem = f"{r['textbook_mib'] / max(r['mib'], 0.1):.1f}x"
        out.append(
            f"{head} {_fmt(r['ms'], '.2f')} | {r['ms'] / r['floor_ms']:.2f} | {_fmt(tb, '.2f')} | "
            f"{speed} | {format_mib(r['mib'])} | {format_mib(r.get('textbook_mib'))} | {mem} |"
        )
    angle = [r for r in rows if "ms_per_m_triplets" in r]
    if angle:
        out += [
            "",
            "Triplet losses, time per million triplets (forward + backward) against the elementwise "
            f"throughput of {meta['gelem_per_s']:.2f} G elements/s ({1 / meta['gelem_per_s']:.2f} ms "
            "per million elements):",
            "",
            "| loss | B | D | ms per 1M triplets | elementwise passes per triplet |",
            "|---|---|---|---|---|",
        ]
        for r in angle:
            passes = r["ms_per_m_triplets"] * meta["gelem_per_s"]
            out.append(f"| {r['loss']} | {r['B']} | {r['D']} | {r['ms_per_m_triplets']:.2f} | {passes:.1f} |")
    return "\n".join(out)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", nargs="+", help="benchmark names (default: every registered loss)")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--dims", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--compile", action="store_true", help="torch.compile the relkd forms")
    p.add_argument("--dynamic", action="store_true", help="compile once for every shape (dynamic=True)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast around every step")
    p.add_argument("--max-textbook-gib", type=float, default=4.0)
    p.add_argument("--out", type=Path, help="directory for losses.md and losses.json")
    p.add_argument("--tag", default="", help="suffix of the output file names, e.g. _amp")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = benchmark_names(args.losses)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(device),
        "torch": torch.__version__,
        "device": str(device),
        "compile": ("dynamic" if args.dynamic else "on") if args.compile else "off",
        "amp": args.amp,
        **elementwise_throughput(device),
    }
    rows = []
    for b in args.batches:
        for d in args.dims:
            floor = gram_floor(b, d, device, args.amp)
            for name in names:
                row = {**run_case(name, b, d, device, args), "floor_ms": floor}
                print(json.dumps(row), flush=True)
                rows.append(row)
    text = markdown(meta, rows)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"losses{args.tag}.md").write_text(text + "\n")
        (args.out / f"losses{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
