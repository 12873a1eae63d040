"""Every registered loss on the device under test; ``RELKD_TEST_DEVICE=cuda`` selects a GPU.

On the CPU only the first check runs: the others compare the GPU with the CPU and check that the loss
path never waits for the GPU.
"""

from __future__ import annotations

import pytest
import torch

from relkd.losses import functional as F


def _needs_gpu(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("needs a GPU: run with RELKD_TEST_DEVICE=cuda")


def test_forward_backward_finite(loss_case, loss_name, device):
    case = loss_case(loss_name).to(device, torch.float32)
    value = case()
    value.backward()
    assert value.device.type == device.type and torch.isfinite(value)
    # A tap may be read without gradient (HKD builds its graph from detached logits).
    grads = [x.grad for x in case.leaves if x.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)


def test_matches_cpu(loss_case, loss_name, device):
    _needs_gpu(device)
    base = loss_case(loss_name)
    results = []
    for dev in (torch.device("cpu"), device):
        case = base.to(dev, torch.float64)
        value = case()
        value.backward()
        results.append((value.detach().cpu(), [x.grad.cpu() for x in case.leaves if x.grad is not None]))
    (v_cpu, g_cpu), (v_gpu, g_gpu) = results
    torch.testing.assert_close(v_gpu, v_cpu, rtol=1e-9, atol=1e-12)
    for got, expected in zip(g_gpu, g_cpu, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


def test_no_host_sync_in_the_loss_path(loss_case, loss_name, device):
    _needs_gpu(device)
    case = loss_case(loss_name).to(device, torch.float32)
    case().backward()  # the first call may initialise libraries, which synchronises once
    for x in case.leaves:
        x.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        case().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.slow
def test_fused_angle_matches_the_eager_pass(device):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(40, 16, generator=g).to(device).requires_grad_()
    t = torch.randn(40, 8, generator=g).to(device)
    expected = F.rkd_angle(s, t, chunk=7)
    (expected_grad,) = torch.autograd.grad(expected, s)
    value = F.rkd_angle(s, t, chunk=7, fused=True)
    (grad,) = torch.autograd.grad(value, s)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-9)
