"""Bad input gets a clear error or a documented finite result, never a silent NaN."""

from __future__ import annotations

import warnings

import pytest
import torch

import relkd
from relkd.losses import functional as F
from relkd.losses._inputs import _warned

RELATIONAL = {
    "rkd_distance": F.rkd_distance,
    "rkd_angle": F.rkd_angle,
    "similarity_preserving": F.similarity_preserving,
    "correlation_congruence": F.correlation_congruence,
    "pkt": F.pkt,
}
names = list(RELATIONAL)


@pytest.mark.parametrize("name", names)
def test_different_batch_sizes(name):
    with pytest.raises(ValueError, match="same batch size, got 8 and 6"):
        RELATIONAL[name](torch.randn(8, 4), torch.randn(6, 4))


@pytest.mark.parametrize("name", names)
def test_wrong_rank(name):
    with pytest.raises(ValueError, match=r"got shape \(8,\)"):
        RELATIONAL[name](torch.randn(8), torch.randn(8, 4))


def test_kd_shape_errors():
    with pytest.raises(ValueError, match=r"\(4, 10\) and \(4, 5\)"):
        F.kd(torch.randn(4, 10), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        F.kd(torch.randn(4, 10, 2), torch.randn(4, 10, 2))
    with pytest.raises(ValueError, match="temperature"):
        F.kd(torch.randn(4, 10), torch.randn(4, 10), T=0)


@pytest.mark.parametrize("name", names)
def test_single_instance_is_zero_warns_once_and_backpropagates(name):
    _warned.discard(name)
    s = torch.randn(1, 5, requires_grad=True)
    with pytest.warns(UserWarning, match="no relation to distil"):
        loss = RELATIONAL[name](s, torch.randn(1, 3))
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RELATIONAL[name](s, torch.randn(1, 3))


def _degenerate_batches():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    dup = base.clone()
    dup[3] = dup[1]
    near = base.clone()
    near[4] = near[2] + 1e-7 * torch.randn(8, generator=g)
    zeros = base.clone()
    zeros[0] = 0.0
    far = base + 1e3  # large common offset: heavy cancellation in the Gram form
    far[5] = far[1] + 1e-3
    return {
        "duplicates": dup,
        "near_duplicates": near,
        "identical": torch.ones(6, 8) * 0.3,
        "all_zero": torch.zeros(6, 8),
        "zero_vector": zeros,
        "offset": far,
    }


@pytest.mark.parametrize("case", list(_degenerate_batches()))
@pytest.mark.parametrize("name", names)
def test_degenerate_batches_finite_and_bounded(name, case):
    s = _degenerate_batches()[case].clone().requires_grad_()
    t = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    loss = RELATIONAL[name](s, t)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()
    # A sum of O(B^2) bounded terms: the gradient of a normalised relation stays O(1 / scale).
    assert s.grad.abs().max() < 1e3, s.grad.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", names)
def test_half_precision_inputs(name, dtype):
    g = torch.Generator().manual_seed(2)
    s32 = torch.randn(10, 6, generator=g)
    t32 = torch.randn(10, 4, generator=g)
    s = s32.to(dtype).requires_grad_()
    loss = RELATIONAL[name](s, t32.to(dtype))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = RELATIONAL[name](s32.to(dtype).float(), t32.to(dtype).float())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


def test_autocast_keeps_relations_in_float32():
    s, t = torch.randn(10, 6), torch.randn(10, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.similarity_preserving(s, t)
        kd = F.kd(s, t[:, :4].repeat(1, 2)[:, :6])
    assert loss.dtype == kd.dtype == torch.float32
    torch.testing.assert_close(loss, F.similarity_preserving(s, t))


def test_float64_stays_float64():
    s, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    for fn in RELATIONAL.values():
        assert fn(s, t).dtype == torch.float64


def test_debug_mode_names_the_loss():
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    s[2, 1] = float("nan")
    relkd.set_debug(True)
    try:
        with pytest.raises(FloatingPointError, match="pkt: student input"):
            F.pkt(s, t)
        with pytest.raises(FloatingPointError, match="kd: teacher input"):
            F.kd(t, s)
    finally:
        relkd.set_debug(False)
    assert not relkd.is_debug()
    F.pkt(s, t)  # off by default: no check, no sync
