"""RKD angle loss, forward+backward: relkd's Gram-chunked form vs the textbook B x B x D / B^3 form.

    python -m benchmarks.rkd_angle                 # B in {256, 1024}, D = 128, on CPU
    python -m benchmarks.rkd_angle --device cuda --dims 128 2048

Prints a markdown table: median time, peak memory above the inputs, and the ratio of the two forms.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks._measure import peak_memory_cpu_child, peak_memory_cuda, run_child, time_call
from relkd.losses.functional import rkd_angle


def textbook_rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The form of the authors' code: normalised difference tensors and a batched B^3 product."""

    def cosines(x):
        diff = x.unsqueeze(0) - x.unsqueeze(1)
        e = F.normalize(diff, p=2, dim=2)
        return torch.bmm(e, e.transpose(1, 2)).view(-1)

    with torch.no_grad():
        t = cosines(teacher)
    return F.smooth_l1_loss(cosines(student), t)


FORMS = {"relkd": rkd_angle, "textbook": textbook_rkd_angle}


def case(form: str, b: int, d: int, device: str, repeats: int, measure: str) -> dict:
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(b, d, generator=g).to(dev).requires_grad_()
    t = torch.randn(b, d, generator=g).to(dev)
    fn = FORMS[form]

    def step():
        s.grad = None
        fn(s, t).backward()

    if measure == "memory":
        mem = peak_memory_cuda(step, dev) if dev.type == "cuda" else peak_memory_cpu_child(step)
        return {"peak_mib": mem}
    return {"seconds": time_call(step, dev, repeats=repeats)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--dims", type=int, nargs="+", default=[128])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--max-textbook-gib",
        type=float,
        default=16.0,
        help="skip the textbook form when its estimated memory exceeds this",
    )
    p.add_argument("--child", nargs=4, metavar=("FORM", "B", "D", "MEASURE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        form, b, d, measure = a.child
        print(json.dumps(case(form, int(b), int(d), a.device, a.repeats, measure)))
        return

    print(f"device: {a.device}, threads: {torch.get_num_threads()}, torch {torch.__version__}\n")
    print("| B | D | form | fwd+bwd (ms) | peak memory (MiB) | time vs textbook | memory vs textbook |")
    print("|---|---|---|---|---|---|---|")
    for b in a.batches:
        for d in a.dims:
            rows = {}
            for form in FORMS:
                # Textbook: ~3 B^2 D difference tensors and ~3 B^3 cosine tensors, forward and backward.
                est_gib = 4 * (3 * b * b * d + 3 * b**3) / 2**30
                if form == "textbook" and est_gib > a.max_textbook_gib:
                    rows[form] = {"error": f"skipped: needs about {est_gib:.0f} GiB"}
                    continue
                args = ["--device", a.device, "--repeats", str(a.repeats), "--child", form, str(b), str(d)]
                mem = run_child("benchmarks.rkd_angle", [*args, "memory"])
                tim = run_child("benchmarks.rkd_angle", [*args, "time"])
                rows[form] = {**mem, **tim}
            base = rows["textbook"]
            for form, r in rows.items():
                if "error" in r:
                    print(f"| {b} | {d} | {form} | {r['error']} | | | |")
                    continue
                ratio_t = ratio_m = ""
                if form != "textbook" and "seconds" in base:
                    ratio_t = f"{base['seconds'] / r['seconds']:.1f}x faster"
                    ratio_m = f"{base['peak_mib'] / max(r['peak_mib'], 1e-9):.0f}x less"
                print(
                    f"| {b} | {d} | {form} | {1e3 * r['seconds']:.1f} | {r['peak_mib']:.0f} "
                    f"| {ratio_t} | {ratio_m} |"
                )


if __name__ == "__main__":
    main()
