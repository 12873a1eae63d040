"""Every registered loss, forward + backward: relkd against the Gram floor and the reference code path.

    python -m benchmarks.losses                                   # CPU, 1 thread, the full grid
    python -m benchmarks.losses --losses sp pkt --batches 256 --dims 128 2048
    python -m benchmarks.losses --compile --losses rkd_distance sp cc pkt --out results/
    python -m benchmarks.losses --device cuda --amp --out results/

For each loss and ``(B, D)`` its forms run in the same process, interleaved in rounds (see
:mod:`benchmarks._measure`): the Gram floor (forward + backward of ``X @ X.T`` on ``X [B, D]``, the least
any pairwise relation can cost), relkd's form, the reference code path
(:mod:`benchmarks.reference`: RepDistiller, torchdistill, the authors) and, with ``--compile``, relkd's
form compiled by :func:`relkd.compile`. Inputs: ``[B, D]`` student and teacher embeddings (``kd``:
``[B, D]`` logits; ``crd``/``hkd``: ``N = 50,000``, ``K = 16384``, a 128-d projection, a training step
with the bank update, and ``_eval`` the same in eval mode; ``kd_svd``/``mhgd``: three
``[B, D / 16, 4, 4]`` feature maps). A reference whose estimated memory exceeds ``--max-reference-gib``
is skipped and marked.

Reported: the median over rounds and the range of the round medians of the CPU time (on CUDA: the
synchronised wall time) and of the wall time; the paired ratios relkd / reference and relkd / floor
(round by round); the peak tensor memory of one call above what was allocated before it. Prints
markdown; ``--out DIR`` also writes ``losses{tag}.md`` and ``losses{tag}.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import benchmarks.reference as R
import relkd
import relkd.losses as L
from benchmarks._measure import fmt_range, format_mib, interleaved, meta, paired_ratio, peak_memory
from relkd.losses import functional as F

NUM_DATA, NEGATIVES, CLASSES = 50_000, 16384, 100


# ----------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One loss at one ``(B, D)``: relkd's callable, its inputs, the reference form if any."""

    relkd: Callable[..., torch.Tensor]
    inputs: tuple
    reference: Callable[..., torch.Tensor] | None = None
    reference_gib: float = 0.0
    params: tuple[torch.Tensor, ...] = ()
    note: str = ""
    same_value: bool = True
    leaves: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        flat = [x for a in self.inputs for x in (a if isinstance(a, list | tuple) else [a])]
        self.leaves = [x for x in flat if isinstance(x, torch.Tensor) and x.requires_grad]
        self.leaves += list(self.params)


CaseFn = Callable[[int, int, torch.device], Case]
CASES: dict[str, CaseFn] = {}
# Benchmark names that are not registered losses: the functional pieces of ``rkd``, CRD/HKD in eval
# mode, and CC's vectorised reference.
EXTRA = ("rkd_distance", "rkd_angle", "crd_eval", "hkd_eval", "cc_vectorized")


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
    return Case(F.kd, _pair(b, d, device, scale=3.0), R.kd, note="D = classes")


@case("rkd_distance")
def _rkd_distance(b: int, d: int, device: torch.device) -> Case:
    return Case(F.rkd_distance, _pair(b, d, device), R.rkd_distance, _gib(8 * b * b))


# The reference angle: ~3 B^2 D floats of normalised differences and ~3 B^3 of cosines and gradients.
def _angle_gib(b: int, d: int) -> float:
    return _gib(3 * b * b * d + 3 * b**3)


@case("rkd_angle")
def _rkd_angle(b: int, d: int, device: torch.device) -> Case:
    return Case(F.rkd_angle, _pair(b, d, device), R.rkd_angle, _angle_gib(b, d))


@case("rkd")
def _rkd(b: int, d: int, device: torch.device) -> Case:
    return Case(L.RKDLoss(), _pair(b, d, device), R.rkd, _angle_gib(b, d))


@case("sp")
def _sp(b: int, d: int, device: torch.device) -> Case:
    return Case(F.similarity_preserving, _pair(b, d, device), R.sp, _gib(8 * b * b))


@case("cc")
def _cc(b: int, d: int, device: torch.device) -> Case:
    note = "reference: torchdistill's row loop"
    return Case(F.correlation_congruence, _pair(b, d, device), R.cc, _gib(12 * b * b), note=note)


@case("cc_vectorized")
def _cc_vectorized(b: int, d: int, device: torch.device) -> Case:
    note = "cc against the power series over the whole matrix"
    return Case(F.correlation_congruence, _pair(b, d, device), R.cc_vectorized, _gib(12 * b * b), note=note)


@case("pkt")
def _pkt(b: int, d: int, device: torch.device) -> Case:
    return Case(F.pkt, _pair(b, d, device), R.pkt, _gib(12 * b * b))


def _index(b: int, device: torch.device) -> torch.Tensor:
    return torch.randperm(NUM_DATA, generator=torch.Generator().manual_seed(b))[:b].to(device)


def _crd(b: int, d: int, device: torch.device, train: bool) -> Case:
    torch.manual_seed(0)
    loss = L.build("crd", student_dim=d, teacher_dim=d, num_data=NUM_DATA, num_negatives=NEGATIVES)
    loss = loss.to(device).train(train)
    fs, ft = _pair(b, d, device)
    index = _index(b, device)
    with torch.no_grad():
        loss.train()(fs, ft, index)  # the first training step sets Z
    loss.train(train)
    neg = loss.sampler(index, NEGATIVES)
    banks = (loss.student_bank.memory.clone(), loss.teacher_bank.memory.clone())
    z = loss.normalizer.clone()

    def relkd(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        return loss(fs, ft, index, neg)

    def reference(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        s, t = loss.embed_s(fs), loss.embed_t(ft)
        value = R.crd_gather(s, t, index, *banks, neg, NUM_DATA, z)
        if train:
            R.crd_update(banks[0], index, s.detach())
            R.crd_update(banks[1], index, t.detach())
        return value

    rows = 2 * b * (NEGATIVES + 1) * 128
    note = "training step: bank update included" if train else "eval mode: no bank update"
    return Case(relkd, (fs, ft), reference, _gib(1.5 * rows), tuple(loss.parameters()), note=note)


@case("crd")
def _crd_train(b: int, d: int, device: torch.device) -> Case:
    return _crd(b, d, device, train=True)


@case("crd_eval")
def _crd_eval(b: int, d: int, device: torch.device) -> Case:
    return _crd(b, d, device, train=False)


def _hkd(b: int, d: int, device: torch.device, train: bool) -> Case:
    torch.manual_seed(0)
    targets = torch.arange(NUM_DATA) % CLASSES
    loss = L.build("hkd", student_dim=d, teacher_dim=d, targets=targets, num_negatives=NEGATIVES)
    loss = loss.to(device).train(train)
    fs, ft = _pair(b, d, device)
    ls, lt = _pair(b, CLASSES, device, scale=3.0)
    index = _index(b, device)
    neg = loss.sampler(index, NEGATIVES)
    banks = (loss.student_bank.memory.clone(), loss.teacher_bank.memory.clone())

    def relkd(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        return loss(fs, ft, ls, lt, index, neg)

    def reference(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        # The same projections and graph encoders; the scoring of the negatives is the authors'.
        s, t = loss.embed_s(fs), loss.embed_t(ft)
        gs, gt = loss.gnn_s(s, loss._knn(ls, s.dtype)), loss.gnn_t(t, loss._knn(lt, t.dtype))
        value = R.hkd_gather(s, t, *banks, index, neg, gs, gt)
        if train:
            R.crd_update(banks[0], index, s.detach(), momentum=0.9)
            R.crd_update(banks[1], index, t.detach(), momentum=0.9)
        return value

    rows = 2 * b * NEGATIVES * 128
    note = "training step: bank update included" if train else "eval mode: no bank update"
    return Case(relkd, (fs, ft), reference, _gib(1.5 * rows), tuple(loss.parameters()), note=note)


@case("hkd")
def _hkd_train(b: int, d: int, device: torch.device) -> Case:
    return _hkd(b, d, device, train=True)


@case("hkd_eval")
def _hkd_eval(b: int, d: int, device: torch.device) -> Case:
    return _hkd(b, d, device, train=False)


def _feature_maps(b: int, d: int, device: torch.device) -> tuple[list, list]:
    g = torch.Generator().manual_seed(b + d)
    shape = (b, max(1, d // 16), 4, 4)
    s = [torch.randn(shape, generator=g).to(device).requires_grad_() for _ in range(3)]
    return s, [torch.randn(shape, generator=g).to(device) for _ in range(3)]


@case("kd_svd")
def _kd_svd(b: int, d: int, device: torch.device) -> Case:
    note = "reference: RepDistiller's KDSVD (another normalisation: same method, not the same value)"
    return Case(
        L.build("kd_svd").to(device), _feature_maps(b, d, device), R.kd_svd, note=note, same_value=False
    )


@case("mhgd")
def _mhgd(b: int, d: int, device: torch.device) -> Case:
    loss = L.build("mhgd", teacher_channels=[max(1, d // 16)] * 3).to(device)
    loss.freeze_heads()
    return Case(loss, _feature_maps(b, d, device), note="no reference code path in PyTorch")


def benchmark_names(requested: Sequence[str] | None) -> list[str]:
    """One name per registered loss (aliases folded) plus :data:`EXTRA`; a registered loss without a
    case is listed too, so that the table shows it is not measured."""
    if requested:
        return list(requested)
    by_loss: dict[Any, list[str]] = {}
    for name in L.available():
        by_loss.setdefault(L.LOSSES.get(name), []).append(name)
    names = {next((n for n in group if n in CASES), group[0]) for group in by_loss.values()}
    return [n for n in CASES if n in names or n in EXTRA] + sorted(names - set(CASES))


# ------------------------------------------------------------------------------------------ runs
def _step(fn: Callable[..., torch.Tensor], c: Case, amp: bool, device: torch.device) -> Callable[[], None]:
    def step() -> None:
        for x in c.leaves:
            x.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = fn(*c.inputs)
        loss.backward()

    return step


def floor_step(b: int, d: int, device: torch.device, amp: bool) -> Callable[[], None]:
    """Forward + backward of ``X @ X.T`` for ``X [B, D]``."""
    x, _ = _pair(b, d, device)
    ones = torch.ones(b, b, device=device)

    def step() -> None:
        x.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            g = x @ x.T
        g.backward(ones)

    return step


def _compiled(fn: Callable) -> Callable:
    """A compiled copy of ``fn`` (:func:`relkd.compile` compiles a module in place), one per loss and
    size: shapes are specialised."""
    if isinstance(fn, torch.nn.Module):
        fn = copy.deepcopy(fn)
    if hasattr(relkd, "compile"):
        return relkd.compile(fn)
    return torch.compile(fn, dynamic=False)


def run_case(name: str, b: int, d: int, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """One loss at ``(B, D)``: the floor, relkd's form, the reference and (``--compile``) the compiled
    form, interleaved in rounds; then the peak memory of each."""
    row: dict[str, Any] = {"loss": name, "B": b, "D": d}
    if name not in CASES:
        return {**row, "error": "no benchmark case"}
    if name not in L.LOSSES and name not in EXTRA:
        return {**row, "error": "not registered"}
    c = CASES[name](b, d, device)
    row["note"] = c.note
    forms = {"floor": floor_step(b, d, device, args.amp), "relkd": _step(c.relkd, c, args.amp, device)}
    if args.compile:
        forms["compiled"] = _step(_compiled(c.relkd), c, args.amp, device)
    if c.reference is None:
        row["reference"] = "none"
    elif c.reference_gib > args.max_reference_gib:
        row["reference"] = f"skipped: needs about {c.reference_gib:.0f} GiB"
    else:
        forms["reference"] = _step(c.reference, c, args.amp, device)
        row["reference"] = "ran"
    times = interleaved(forms, device, rounds=args.rounds, calls=args.calls, warmup=2 if args.compile else 1)
    clock = "wall" if device.type == "cuda" else "cpu"
    row["floor_ms"], row["floor_wall_ms"] = times["floor"].summary(clock), times["floor"].summary("wall")
    for form in ("relkd", "compiled", "reference"):
        if form not in times:
            continue
        row[f"{form}_ms"], row[f"{form}_wall_ms"] = times[form].summary(clock), times[form].summary("wall")
        for x in c.leaves:  # the step's gradients are then allocated within it
            x.grad = None
        row[f"{form}_mib"] = peak_memory(forms[form], device)
        if form == "relkd":
            row["x_floor"] = paired_ratio(times[form], times["floor"], clock)
        else:
            row[f"relkd_over_{form}"] = paired_ratio(times["relkd"], times[form], clock)
            row[f"relkd_over_{form}_wall"] = paired_ratio(times["relkd"], times[form], "wall")
    return row


def _ratio(r: tuple[float, float, float] | None) -> str:
    return "" if r is None else f"{r[0]:.2f} [{r[1]:.2f}-{r[2]:.2f}]"


def markdown(info: dict, rows: list[dict]) -> str:
    """The results as markdown: the setting and one row per loss and size."""
    compiled = any("compiled_ms" in r for r in rows)
    head = (
        "| loss | B | D | floor ms | relkd ms | x floor | reference ms | relkd / reference | "
        "relkd / reference (wall) | "
        + ("compiled ms | compiled / eager | " if compiled else "")
        + "relkd MiB | reference MiB |"
    )
    out = [
        f"{info['date']}, {info['machine']}, torch {info['torch']}, device {info['device']}, commit "
        f"{info['commit']}, AMP {'bf16' if info['amp'] else 'off'}, load average {info['load']} at the "
        f"start. Each loss's forms interleaved in {info['rounds']} rounds of {info['calls']} to 30 calls "
        "(a form over 1 s: 1 call, 3 rounds); "
        f"{'CPU time of the process' if info['device'] == 'cpu' else 'synchronised wall time'}, "
        "median [lowest-highest round median].",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        start = f"| {r['loss']} | {r['B']} | {r['D']} |"
        if "error" in r:
            continue
        ref = fmt_range(r["reference_ms"]) if "reference_ms" in r else r.get("reference", "")
        cells = [
            fmt_range(r["floor_ms"]),
            fmt_range(r["relkd_ms"]),
            _ratio(r.get("x_floor")),
            ref,
            _ratio(r.get("relkd_over_reference")),
            _ratio(r.get("relkd_over_reference_wall")),
        ]
        if compiled:
            cells += [
                fmt_range(r["compiled_ms"]) if "compiled_ms" in r else "",
                _inverse(r.get("relkd_over_compiled")),
            ]
        cells += [format_mib(r.get("relkd_mib")), format_mib(r.get("reference_mib"))]
        out.append(f"{start} " + " | ".join(cells) + " |")
    missing = sorted({r["loss"] for r in rows if "error" in r})
    if missing:
        out += ["", f"Registered losses without a benchmark case: {', '.join(missing)}."]
    return "\n".join(out)


def _inverse(r: tuple[float, float, float] | None) -> str:
    """compiled / eager from the stored eager / compiled ratio."""
    return "" if r is None else f"{1 / r[0]:.2f} [{1 / r[2]:.2f}-{1 / r[1]:.2f}]"


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", nargs="+", help="benchmark names (default: every registered loss)")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--dims", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=3, help="calls per form and round")
    p.add_argument("--compile", action="store_true", help="also relkd.compile each relkd form")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast around every step")
    p.add_argument("--max-reference-gib", type=float, default=4.0)
    p.add_argument("--out", type=Path, help="directory for losses{tag}.md and losses{tag}.json")
    p.add_argument("--tag", default="", help="suffix of the output file names, e.g. _compile")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = benchmark_names(args.losses)
    info = meta(device, amp=args.amp, rounds=args.rounds, calls=args.calls, compile=args.compile)
    rows = []
    for b in args.batches:
        for d in args.dims:
            for name in names:
                rows.append(run_case(name, b, d, device, args))
                print(json.dumps(rows[-1]), flush=True)
    text = markdown(info, rows)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"losses{args.tag}.md").write_text(text + "\n")
        (args.out / f"losses{args.tag}.json").write_text(json.dumps({"meta": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
