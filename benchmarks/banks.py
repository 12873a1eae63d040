"""CRD and HKD scoring: relkd's one product against the bank vs gathering ``B x K x 128`` bank rows.

    python -m benchmarks.banks                        # B = 64, K = 16384, N = 50,000, CPU
    python -m benchmarks.banks --device cuda --out results/

relkd scores every anchor against the whole bank with one ``[B, 128] x [128, N]`` product and picks
the ``K`` sampled columns (:func:`relkd.losses.contrast.bank_scores`); the authors' code gathers the
``K`` (CRD: ``1 + K``) bank rows of every anchor into a ``B x K x 128`` tensor and scores it with
``bmm`` (:mod:`benchmarks.reference`). Both forms get the same embeddings (unit rows, all trained, as
the projections and graph encoders are), banks, indices and negatives:

1. values: the loss and its gradient for every embedding, both forms in float64, as the largest
   relative difference (the goal is 1e-6);
2. cost: forward + backward in float32, both forms interleaved in rounds (:mod:`benchmarks._measure`):
   median time with the range of the round medians, the paired ratio, and the peak memory.

Prints a markdown table; ``--out DIR`` also writes ``banks.md`` and ``banks.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import benchmarks.reference as T
from benchmarks._measure import fmt_range, format_mib, interleaved, meta, paired_ratio, peak_memory
from relkd.losses.contrast import nce_normalizer
from relkd.losses.functional import crd, hkd

Inputs = dict[str, torch.Tensor]


def make_inputs(b: int, k: int, n: int, dim: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    """Unit embeddings (leaves), unit banks, dataset indices and negatives, all from one seed."""
    g = torch.Generator().manual_seed(0)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    out = {name: unit(b, dim) for name in ("student", "teacher", "student_graph", "teacher_graph")}
    out["student_bank"], out["teacher_bank"] = unit(n, dim), unit(n, dim)
    out["index"] = torch.randperm(n, generator=g)[:b]
    out["negatives"] = torch.randint(0, n, (b, k), generator=g)
    out = {key: v.to(device, dtype) if v.is_floating_point() else v.to(device) for key, v in out.items()}
    for key in ("student", "teacher", "student_graph", "teacher_graph"):
        out[key].requires_grad_()
    return out


def _normalizer(x: Inputs, n: int, temperature: float = 0.07) -> torch.Tensor:
    """CRD's ``(Z_s, Z_t)`` as set on a first batch: ``N * mean(exp(s / tau))`` over its score rows."""
    with torch.no_grad():
        rows = torch.cat([x["index"].unsqueeze(1), x["negatives"]], 1)
        z_s = (x["teacher_bank"][rows] @ x["student"].unsqueeze(2)).squeeze(2)
        z_t = (x["student_bank"][rows] @ x["teacher"].unsqueeze(2)).squeeze(2)
        return torch.stack([nce_normalizer(z, n, temperature) for z in (z_s, z_t)])


def crd_forms(x: Inputs, n: int) -> dict[str, Callable[[], torch.Tensor]]:
    z = _normalizer(x, n)
    banks, idx = (x["student_bank"], x["teacher_bank"]), x["index"]
    positives = (x["student_bank"][idx], x["teacher_bank"][idx])
    return {
        "relkd": lambda: crd(x["student"], x["teacher"], *positives, *banks, x["negatives"], n, z),
        "gather": lambda: T.crd_gather(x["student"], x["teacher"], idx, *banks, x["negatives"], n, z),
    }


def hkd_forms(x: Inputs, n: int) -> dict[str, Callable[[], torch.Tensor]]:
    args = (
        x["student"],
        x["teacher"],
        x["student_bank"],
        x["teacher_bank"],
        x["index"],
        x["negatives"],
        x["student_graph"],
        x["teacher_graph"],
    )
    return {"relkd": lambda: hkd(*args), "gather": lambda: T.hkd_gather(*args)}


FORMS = {"crd": crd_forms, "hkd": hkd_forms}
LEAVES = {"crd": ("student", "teacher"), "hkd": ("student", "teacher", "student_graph", "teacher_graph")}


def agreement(loss: str, b: int, k: int, n: int, device: torch.device) -> dict[str, float]:
    """Largest relative difference of the value and of each gradient, both forms in float64."""
    x = make_inputs(b, k, n, 128, torch.float64, device)
    leaves = [x[key] for key in LEAVES[loss]]
    results = {}
    for form, fn in FORMS[loss](x, n).items():
        value = fn()
        results[form] = (value.detach(), torch.autograd.grad(value, leaves))
    (v1, g1), (v2, g2) = results["relkd"], results["gather"]
    grad = max(float((a - e).abs().max() / e.abs().max()) for a, e in zip(g1, g2, strict=True))
    return {"value_rel_diff": float((v1 - v2).abs() / v2.abs()), "grad_rel_diff": grad}


def cost(loss: str, b: int, k: int, n: int, device: torch.device, rounds: int) -> dict[str, dict]:
    """Interleaved time and peak MiB of forward + backward of each form in float32."""
    x = make_inputs(b, k, n, 128, torch.float32, device)
    leaves = [x[key] for key in LEAVES[loss]]
    steps = {}
    for form, fn in FORMS[loss](x, n).items():

        def step(fn: Callable[[], torch.Tensor] = fn) -> None:
            for leaf in leaves:
                leaf.grad = None
            fn().backward()

        steps[form] = step
    times = interleaved(steps, device, rounds=rounds)
    clock = "wall" if device.type == "cuda" else "cpu"
    out = {
        form: {"ms": t.summary(clock), "mib": peak_memory(steps[form], device)} for form, t in times.items()
    }
    out["ratio"] = paired_ratio(times["gather"], times["relkd"], clock)
    return out


def markdown(info: dict, rows: list[dict]) -> str:
    lines = [
        f"{info['date']}, {info['machine']}, torch {info['torch']}, device {info['device']}, commit "
        f"{info['commit']}; {info['rounds']} interleaved rounds, median [lowest-highest round median].",
        "",
        "| loss | B | K | N | relkd ms | gather ms | speed-up | relkd MiB | gather MiB | memory saving "
        "| value rel. diff (f64) | gradient rel. diff (f64) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours, theirs = r["relkd"], r["gather"]
        mem = ""
        if ours["mib"] is not None and theirs["mib"] is not None:
            mem = f"{theirs['mib'] / max(ours['mib'], 0.1):.1f}x"
        ratio = r["ratio"]
        lines.append(
            f"| {r['loss']} | {r['B']} | {r['K']} | {r['N']} | {fmt_range(ours['ms'], '.1f')} | "
            f"{fmt_range(theirs['ms'], '.1f')} | {ratio[0]:.1f}x [{ratio[1]:.1f}-{ratio[2]:.1f}] | "
            f"{format_mib(ours['mib'])} | {format_mib(theirs['mib'])} | {mem} | {r['value_rel_diff']:.1e} | "
            f"{r['grad_rel_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", nargs="+", default=list(FORMS), choices=list(FORMS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--negatives", type=int, default=16384)
    p.add_argument("--num-data", type=int, default=50_000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    info = meta(device, rounds=a.rounds)
    rows = []
    for loss in a.losses:
        row = {"loss": loss, "B": a.batch, "K": a.negatives, "N": a.num_data}
        row.update(agreement(loss, a.batch, a.negatives, a.num_data, device))
        row.update(cost(loss, a.batch, a.negatives, a.num_data, device, a.rounds))
        print(json.dumps(row), flush=True)
        rows.append(row)
    text = markdown(info, rows)
    print("\n" + text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "banks.md").write_text(text + "\n")
        (a.out / "banks.json").write_text(json.dumps({"meta": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
