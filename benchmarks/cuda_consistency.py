"""Every pairwise/triplet relational loss on CUDA against the same loss on CPU, forward and backward.

    python -m benchmarks.cuda_consistency

For each loss: float64 value and gradient on CUDA vs CPU (relative difference), bf16 autocast
finiteness, and the fwd+bwd median time at B = 256, D = 2048 next to the Gram floor (X @ X.T, fwd+bwd).
"""

from __future__ import annotations

import torch

from benchmarks._measure import time_call
from relkd.losses import functional as F

LOSSES = {
    "rkd_distance": F.rkd_distance,
    "rkd_angle": F.rkd_angle,
    "sp": F.similarity_preserving,
    "cc": F.correlation_congruence,
    "pkt": F.pkt,
}


def main() -> None:
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}\n")
    g = torch.Generator().manual_seed(0)
    s64, t64 = (
        torch.randn(96, 40, generator=g, dtype=torch.float64),
        torch.randn(96, 24, generator=g, dtype=torch.float64),
    )
    print(
        "| loss | rel. diff value (f64) | rel. diff grad (f64) | bf16 autocast finite "
        "| fwd+bwd ms B=256 D=2048 | x Gram floor |"
    )
    print("|---|---|---|---|---|---|")
    x = torch.randn(256, 2048, device=dev, requires_grad=True)
    y = torch.randn(256, 2048, device=dev)

    def floor():
        x.grad = None
        (x @ x.T).sum().backward()

    t_floor = time_call(floor, dev, repeats=20, warmup=3)
    for name, fn in LOSSES.items():
        vals, grads = [], []
        for d in ("cpu", "cuda"):
            s = s64.detach().to(d).clone().requires_grad_()
            v = fn(s, t64.to(d))
            v.backward()
            vals.append(v.detach().cpu())
            grads.append(s.grad.cpu())
        dv = float((vals[0] - vals[1]).abs() / vals[0].abs().clamp_min(1e-30))
        dg = float((grads[0] - grads[1]).norm() / grads[0].norm().clamp_min(1e-30))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a = fn(torch.randn(128, 64, device=dev), torch.randn(128, 32, device=dev))
        finite = bool(torch.isfinite(a)) and a.dtype == torch.float32

        def step(fn=fn):
            x.grad = None
            fn(x, y).backward()

        t = time_call(step, dev, repeats=10, warmup=2)
        print(f"| {name} | {dv:.1e} | {dg:.1e} | {finite} | {1e3 * t:.3f} | {t / t_floor:.1f} |")
    print(f"\nGram floor (X @ X.T fwd+bwd, B=256, D=2048): {1e3 * t_floor:.3f} ms")


if __name__ == "__main__":
    main()
