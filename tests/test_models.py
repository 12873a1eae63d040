"""The model zoo: registry, parameter counts against the CRD benchmark tables, forward shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from relkd import models

# CRD benchmark (Tian et al., ICLR 2020) zoo and published sizes in millions, 100 classes.
# resnet14 is 181,108 by the count formula below (0.18M); some tables print 0.17.
PUBLISHED_M = {
    "resnet8": 0.08,
    "resnet14": 0.18,
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet44": 0.67,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_1": 0.18,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,
    "shufflenetv1": 0.95,
    "shufflenetv2": 1.36,
    "resnet50": 23.71,
}
ZOO = sorted({*PUBLISHED_M, "vgg11", "vgg16", "vgg19"})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resnet_count(depth: int, widths: tuple[int, ...], k: int = 100) -> int:
    """Basic-block CIFAR ResNet: bias-free 3x3 convs, 2 parameters per BN channel."""
    n = (depth - 2) // 6
    total = 9 * 3 * widths[0] + 2 * widths[0]
    for stage, (c_in, c) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        first = 9 * c_in * c + 9 * c * c + 4 * c
        if stage > 0 or c_in != c:  # stride 2 or a width change: 1x1 projection + BN
            first += c_in * c + 2 * c
        total += first + (n - 1) * (18 * c * c + 4 * c)
    return total + widths[-1] * k + k


def wrn_count(depth: int, k: int, classes: int = 100) -> int:
    """Pre-activation wide blocks: BN(in) + 3x3(in->out) + BN(out) + 3x3(out->out) [+ 1x1]."""
    n = (depth - 4) // 6
    widths = (16, 16 * k, 32 * k, 64 * k)
    total = 9 * 3 * 16
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        total += 2 * a + 9 * a * b + 2 * b + 9 * b * b + (a * b if a != b else 0)
        total += (n - 1) * (4 * b + 18 * b * b)
    return total + 2 * widths[-1] + widths[-1] * classes + classes


def vgg_count(config: tuple[tuple[int, ...], ...], k: int = 100) -> int:
    """3x3 convs with bias, 2 parameters per BN channel, one linear layer 512 -> k."""
    total, c_in = 0, 3
    for block in config:
        for c in block:
            total += 9 * c_in * c + c + 2 * c
            c_in = c
    return total + 512 * k + k


def test_resnet56_count_by_hand() -> None:
    # stem 3*9*16 + 32; stage1: 9 blocks of 2*(9*16*16) + 4*16; stage2: first 9*16*32 + 9*32*32
    # + 128 + (16*32 + 64), then 8 blocks of 18*32*32 + 128; stage3 likewise at 64; fc 64*100 + 100.
    by_hand = (
        (432 + 32)
        + 9 * (4608 + 64)
        + (4608 + 9216 + 128 + 576 + 8 * (18432 + 128))
        + (18432 + 36864 + 256 + 2176 + 8 * (73728 + 256))
        + 6500
    )
    assert by_hand == 861_620
    assert n_params(models.create("resnet56")) == by_hand


@pytest.mark.parametrize(
    ("name", "depth", "widths"),
    [(f"resnet{d}", d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)]
    + [("resnet8x4", 8, (32, 64, 128, 256)), ("resnet32x4", 32, (32, 64, 128, 256))],
)
def test_resnet_counts_match_formula(name: str, depth: int, widths: tuple[int, ...]) -> None:
    assert n_params(models.create(name)) == resnet_count(depth, widths)


@pytest.mark.parametrize(("depth", "k"), [(16, 1), (16, 2), (40, 1), (40, 2)])
def test_wrn_counts_match_formula(depth: int, k: int) -> None:
    assert n_params(models.create(f"wrn_{depth}_{k}")) == wrn_count(depth, k)


def test_vgg_counts_match_formula() -> None:
    for name, config in models.vgg.CONFIGS.items():
        assert n_params(models.create(name)) == vgg_count(config), name


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_param_count_matches_published(name: str) -> None:
    published = PUBLISHED_M[name] * 1e6
    # 3 %, or half the tables' rounding unit (0.01M) where that is larger (the smallest models).
    tolerance = max(0.03 * published, 5_000)
    assert abs(n_params(models.create(name, num_classes=100)) - published) <= tolerance


@pytest.mark.parametrize("name", ZOO)
def test_zoo_forward_returns_logits(name: str) -> None:
    model = models.create(name, num_classes=7)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_zoo_defaults_to_100_classes_and_takes_in_channels() -> None:
    assert models.create("resnet8")(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    gray = models.create("wrn_16_1", num_classes=10, in_channels=1)
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_available_lists_the_zoo_and_filters() -> None:
    assert set(ZOO) <= set(models.available())
    assert models.available("wrn*") == ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
    assert "torchvision:resnet18" in models.available("torchvision:resnet*")


def test_reference_names_are_aliases() -> None:
    assert type(models.create("mobile_half")) is type(models.create("mobilenetv2"))
    assert type(models.create("ShuffleV1")) is type(models.create("shufflenetv1"))


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(KeyError, match="resnet32x4"):
        models.create("resnet32_x4")


@pytest.mark.parametrize("size", [8, 28])
@pytest.mark.parametrize("name", ["mlp", "lenet", "small_resnet"])
def test_small_models_on_small_images(name: str, size: int) -> None:
    kwargs = {"in_shape": (1, size, size)} if name == "mlp" else {}
    model = models.create(name, **kwargs)
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", ["mlp", "lenet", "small_resnet"])
def test_width_makes_a_wider_teacher(name: str) -> None:
    student = models.create(name, width=8)
    teacher = models.create(name, width=32)
    assert n_params(teacher) > 4 * n_params(student)


def test_mlp_shape_arguments() -> None:
    # 3 hidden layers of 128 on 64 inputs: (64*128 + 128) + 2*(128*128 + 128) + (128*10 + 10).
    assert n_params(models.create("mlp")) == 8320 + 2 * 16512 + 1290
    rgb = models.create("mlp", in_channels=3)
    assert rgb(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    flat = models.create("mlp", in_shape=(20,), num_classes=3)
    assert flat(torch.randn(4, 20)).shape == (4, 3)
    with pytest.raises(ValueError, match="in_channels=3 disagrees"):
        models.create("mlp", in_channels=3, in_shape=(1, 28, 28))


def test_torchvision_by_name() -> None:
    model = models.create("torchvision:resnet18", num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.default_taps["penultimate"] == "fc:input"
    assert model.default_taps["stage4"] == "layer4"
    assert model.default_taps["feature_map"] == "layer4"


def test_torchvision_errors() -> None:
    with pytest.raises(KeyError, match="'resnet18'"):
        models.create("torchvision:resnt18")
    with pytest.raises(ValueError, match="no downloads"):
        models.create("torchvision:resnet18", weights="DEFAULT")
    with pytest.raises(KeyError, match="unknown model source 'torchvison'"):
        models.create("torchvison:resnet18")


def test_register_makes_create_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # A private copy of the table, so the test leaves the shared registry as it was.
    monkeypatch.setattr(models.MODELS, "_entries", dict(models.MODELS._entries))

    @models.register("tiny_linear")
    def tiny_linear(num_classes: int = 4) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, num_classes))

    model = models.create("tiny_linear", num_classes=3)
    assert model(torch.randn(2, 12)).shape == (2, 3)
    assert model.default_taps == {"penultimate": "3:input"}


def test_default_taps_are_per_instance() -> None:
    a, b = models.create("resnet8"), models.create("resnet8")
    a.default_taps["penultimate"] = "layer3"
    assert b.default_taps["penultimate"] == "fc:input"
