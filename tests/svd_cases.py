"""Feature maps with known singular vectors, shared by the KD-SVD and MHGD tests."""

from __future__ import annotations

import torch


def orthonormal(n: int, r: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return q


def known_features(batch: int, c: int, h: int, w: int, s: list[float], g: torch.Generator):
    """Feature maps whose ``HW x C`` matrices are ``U diag(s) V^T``; returns (maps, V ``[B, C, r]``)."""
    maps, vs = [], []
    for _ in range(batch):
        u, v = orthonormal(h * w, len(s), g), orthonormal(c, len(s), g)
        x = u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T
        maps.append(x.T.reshape(c, h, w))
        vs.append(v)
    return torch.stack(maps), torch.stack(vs)


def layers(spec, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [known_features(batch, *layer, g) for layer in spec]
