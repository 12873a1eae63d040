"""FitNet hints: the regressor RepDistiller's size rule picks, its output shape in every case, the loss
against the mean squared error written out with loops (through a regressor whose weights are set by
hand), gradients, shapes read the way the engine passes them, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import nn

import relkd.losses as L
from relkd import configs
from relkd.losses.fitnet import FitNetLoss, HintRegressor, hint


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    flat_a, flat_b = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    return sum((x - y) ** 2 for x, y in zip(flat_a, flat_b, strict=True)) / len(flat_a)


# ------------------------------------------------------------------------------- the regressor
CASES = [
    # student (C, H, W), teacher (C, H, W), layer, kernel, stride
    ((4, 8, 8), (6, 4, 4), nn.Conv2d, (3, 3), (2, 2)),
    ((4, 3, 3), (6, 6, 6), nn.ConvTranspose2d, (4, 4), (2, 2)),
    ((4, 4, 4), (6, 4, 4), nn.Conv2d, (1, 1), (1, 1)),
    ((4, 7, 5), (6, 4, 3), nn.Conv2d, (4, 3), (1, 1)),
]


@pytest.mark.parametrize(
    "s_shape,t_shape,layer,kernel,stride", CASES, ids=["smaller", "larger", "equal", "kernel"]
)
def test_regressor_maps_the_student_to_the_teachers_shape(s_shape, t_shape, layer, kernel, stride):
    r = HintRegressor(s_shape, t_shape).double()
    assert type(r.map) is layer and r.map.kernel_size == kernel and r.map.stride == stride
    assert isinstance(r.norm, nn.BatchNorm2d) and isinstance(r.relu, nn.ReLU)
    out = r(randn(3, *s_shape))
    assert out.shape == (3, *t_shape)


def test_linear_regressor_for_vectors():
    r = HintRegressor((5,), (9,)).double()
    assert isinstance(r.map, nn.Linear) and isinstance(r.norm, nn.Identity)
    assert r(randn(4, 5)).shape == (4, 9)


def test_regressor_without_relu():
    r = HintRegressor((2, 2, 2), (2, 2, 2), relu=False)
    assert isinstance(r.relu, nn.Identity)


# ------------------------------------------------------------------------------- values
def test_hint_is_the_mean_squared_error():
    s, t = randn(3, 2, 4, 4, seed=1), randn(3, 2, 4, 4, seed=2)
    torch.testing.assert_close(hint(s, t), torch.tensor(ref_mse(s, t), dtype=torch.float64))
    loss = FitNetLoss(regressor="none")
    torch.testing.assert_close(loss(s, t), torch.tensor(ref_mse(s, t), dtype=torch.float64))


def test_loss_through_a_hand_set_conv_regressor_in_training_mode():
    s, t = randn(4, 3, 2, 2, seed=3), randn(4, 2, 2, 2, seed=4).abs()
    loss = FitNetLoss(student_shape=(3, 2, 2), teacher_shape=(2, 2, 2)).double()
    weight = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        loss.regressor.map.weight.copy_(weight[:, :, None, None])
        loss.regressor.map.bias.copy_(torch.tensor([0.2, -0.1]))
    # Written out: 1x1 conv, batch norm with the batch's statistics (biased variance, eps 1e-5), ReLU.
    conv = torch.zeros(4, 2, 2, 2, dtype=torch.float64)
    for b in range(4):
        for o in range(2):
            for y in range(2):
                for x in range(2):
                    conv[b, o, y, x] = sum(weight[o, c] * s[b, c, y, x] for c in range(3)) + [0.2, -0.1][o]
    expected = torch.zeros_like(conv)
    for o in range(2):
        values = conv[:, o].reshape(-1).tolist()
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        expected[:, o] = ((conv[:, o] - mean) / math.sqrt(var + 1e-5)).clamp(min=0)
    torch.testing.assert_close(loss(s, t), torch.tensor(ref_mse(expected, t), dtype=torch.float64))


def test_loss_through_a_hand_set_linear_regressor():
    s, t = randn(5, 3, seed=5), randn(5, 2, seed=6)
    loss = FitNetLoss(student_shape=(3,), teacher_shape=(2,)).double()
    with torch.no_grad():
        loss.regressor.map.weight.copy_(torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 1.0]]))
        loss.regressor.map.bias.copy_(torch.tensor([0.1, -0.3]))
    expected = torch.zeros(5, 2, dtype=torch.float64)
    for b in range(5):
        expected[b, 0] = max(0.0, float(s[b, 0] + 2 * s[b, 1] - s[b, 2] + 0.1))
        expected[b, 1] = max(0.0, float(0.5 * s[b, 0] + s[b, 2] - 0.3))
    torch.testing.assert_close(loss(s, t), torch.tensor(ref_mse(expected, t), dtype=torch.float64))


# ------------------------------------------------------------------------------- gradients
def test_gradient_reaches_student_and_regressor_not_teacher():
    s, t = randn(4, 3, 4, 4, seed=7).requires_grad_(), randn(4, 5, 2, 2, seed=8).requires_grad_()
    loss = FitNetLoss(student_shape=(3, 4, 4), teacher_shape=(5, 2, 2)).double()
    loss(s, t).backward()
    assert t.grad is None and float(s.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in loss.parameters())
    assert {n for n, _ in loss.named_parameters()} >= {"regressor.map.weight", "regressor.map.bias"}


def test_gradcheck_through_the_regressor():
    loss = FitNetLoss(student_shape=(2, 3, 3), teacher_shape=(3, 2, 2)).double()
    t = randn(3, 3, 2, 2, seed=9)
    assert torch.autograd.gradcheck(lambda x: loss(x, t), (randn(3, 2, 3, 3, seed=10).requires_grad_(),))


# ------------------------------------------------------------------------------- engine sizes
def test_shapes_read_from_channels_and_dims_as_the_engine_passes_them():
    loss = FitNetLoss(
        student_channels=[4], teacher_channels=[6], student_dim=4 * 8 * 8, teacher_dim=6 * 4 * 4
    )
    assert loss.regressor.student_shape == (4, 8, 8) and loss.regressor.teacher_shape == (6, 4, 4)
    assert loss(torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)).shape == ()
    vectors = FitNetLoss(student_channels=[7], teacher_channels=[9], student_dim=7, teacher_dim=9)
    assert isinstance(vectors.regressor.map, nn.Linear)


def test_explicit_shapes_win_over_channels_and_dims():
    loss = FitNetLoss(student_shape=(2, 4, 1), teacher_shape=(3, 2, 1), student_channels=[2], student_dim=8)
    assert loss.regressor.student_shape == (2, 4, 1) and loss.regressor.map.kernel_size == (3, 1)


# ------------------------------------------------------------------------------- bad input
def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="no regressor maps a student map of 3x3 to a teacher map of 5x5"):
        HintRegressor((2, 3, 3), (2, 5, 5))
    with pytest.raises(ValueError, match=r"both \(C, H, W\) or both \(D,\)"):
        HintRegressor((4,), (2, 2, 2))
    with pytest.raises(ValueError, match="cannot read a square map"):
        FitNetLoss(student_channels=[2], teacher_channels=[2], student_dim=12, teacher_dim=8)
    with pytest.raises(ValueError, match="reads one tap"):
        FitNetLoss(student_channels=[2, 4], teacher_channels=[2], student_dim=8, teacher_dim=8)
    with pytest.raises(ValueError, match="needs the shapes of both taps"):
        FitNetLoss()
    with pytest.raises(ValueError, match="regressor must be one of"):
        FitNetLoss(regressor="conv")
    loss = FitNetLoss(student_shape=(2, 4, 4), teacher_shape=(3, 2, 2))
    with pytest.raises(ValueError, match="same batch size, got 4 and 3"):
        loss(torch.randn(4, 2, 4, 4), torch.randn(3, 3, 2, 2))
    with pytest.raises(ValueError, match="built for student features of shape"):
        loss(torch.randn(4, 2, 8, 8), torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="the teacher is"):
        loss(torch.randn(4, 2, 4, 4), torch.randn(4, 3, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        FitNetLoss(regressor="none")(torch.randn(4, 2, 4, 4), torch.randn(4, 3, 4, 4))


# ------------------------------------------------------------------------------- pinned defaults
def test_defaults():
    loss = L.build("fitnet", student_shape=(2, 2, 2), teacher_shape=(2, 2, 2))
    assert isinstance(loss, FitNetLoss) and loss.kind == "auto" and isinstance(loss.regressor.relu, nn.ReLU)
    assert FitNetLoss.taps == ("stage2",)


def test_method_configs():
    single = yaml.safe_load(configs.method_path("fitnet").read_text())
    assert single["losses"] == {"fitnet": {"weight": 100.0}} and "stages" not in single
    assert "ce_weight" not in single.get("train", {})
    staged = yaml.safe_load(configs.method_path("fitnet_2stage").read_text())
    hints, distil = staged["stages"]
    assert hints["terms"] == ["fitnet"] and hints["ce_weight"] == 0.0
    assert hints["trainable"] == ["student.until(stage2)", "loss.fitnet"]
    assert distil["terms"] == ["kd"] and distil["ce_weight"] == 0.1
    assert staged["losses"]["kd"] == {"weight": 0.9, "T": 4.0}
