"""Feature taps: hook placement, shapes, gradients, clearing, removal, errors, default taps."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relkd import models
from relkd.models import FeatureTaps, resolve_taps

ZOO = [
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "resnet50",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "mobilenetv2",
    "shufflenetv1",
    "shufflenetv2",
]


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class Branchy(nn.Module):
    """A model whose ``b`` branch runs only when asked, to see stale features."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, use_b: bool = False) -> torch.Tensor:
        h = self.a(x)
        if use_b:
            h = self.b(h)
        return self.fc(h)


def test_penultimate_is_the_pooled_feature() -> None:
    model = models.create("resnet8", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with FeatureTaps(model, resolve_taps(model, ["penultimate"])) as taps:
        logits = model(x)
        emb = taps["penultimate"]
    with torch.no_grad():
        h = F.relu(model.bn1(model.conv1(x)))
        h = model.layer3(model.layer2(model.layer1(h)))
        pooled = h.mean(dim=(2, 3))
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb, pooled)
    torch.testing.assert_close(logits, pooled @ model.fc.weight.T + model.fc.bias)


def test_stage_shapes_and_gradients_flow_to_earlier_layers_only() -> None:
    model = models.create("resnet8")
    taps = FeatureTaps(model, resolve_taps(model, ["stage1", "stage2", "stage3", "penultimate"]))
    model(torch.randn(2, 3, 32, 32))
    shapes = {k: tuple(v.shape) for k, v in taps.features.items()}
    assert shapes == {
        "stage1": (2, 16, 32, 32),
        "stage2": (2, 32, 16, 16),
        "stage3": (2, 64, 8, 8),
        "penultimate": (2, 64),
    }
    taps["stage2"].square().mean().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.layer2[0].conv1.weight.grad is not None
    # stage2 does not depend on layer3 or fc, so they receive no gradient.
    assert model.layer3[0].conv1.weight.grad is None and model.fc.weight.grad is None
    taps.remove()


def test_no_grad_teacher_gives_features_without_graph() -> None:
    model = models.create("wrn_16_1").eval()
    with FeatureTaps(model, {"emb": "fc:input", "s3": "block3"}) as taps, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        assert taps["emb"].shape == (2, 64) and not taps["emb"].requires_grad
        assert taps["s3"].shape == (2, 64, 8, 8)


def test_input_and_output_specs() -> None:
    model = Branchy()
    x = torch.randn(3, 4)
    with FeatureTaps(model, {"in": "fc:input", "out": "a:output", "logits": ""}) as taps:
        logits = model(x)
        expected = x @ model.a.weight.T + model.a.bias
        torch.testing.assert_close(taps["in"], expected)
        torch.testing.assert_close(taps["out"], expected)
        assert taps["logits"] is logits


def test_features_are_cleared_at_each_forward() -> None:
    model = Branchy()
    taps = FeatureTaps(model, {"b": "b", "in": "fc:input"})
    model(torch.randn(3, 4), use_b=True)
    first = weakref.ref(taps["in"])
    assert set(taps.features) == {"b", "in"}
    model(torch.randn(3, 4), use_b=False)
    assert set(taps.features) == {"in"}
    with pytest.raises(KeyError, match="has no value"):
        taps["b"]
    gc.collect()
    assert first() is None, "a tensor of the previous forward is still referenced"
    taps.remove()


def test_remove_leaves_no_hooks_and_stops_recording() -> None:
    model = models.create("resnet8")
    assert no_hooks(model)
    taps = FeatureTaps(model, resolve_taps(model, ["stage1", "stage3", "penultimate"]))
    assert not no_hooks(model)
    taps.remove()
    taps.remove()
    assert no_hooks(model)
    model(torch.randn(1, 3, 32, 32))
    assert taps.features == {}
    with FeatureTaps(model, {"x": "layer2"}):
        assert not no_hooks(model)
    assert no_hooks(model)


def test_wrong_path_names_close_modules() -> None:
    model = models.create("resnet8")
    with pytest.raises(KeyError, match="'layer3'"):
        FeatureTaps(model, {"f": "layer_3"})
    with pytest.raises(KeyError, match="'layer1.0.conv1'"):
        FeatureTaps(model, {"f": "layer1.0.conv_1"})
    with pytest.raises(KeyError, match="top-level modules: conv1, bn1"):
        FeatureTaps(model, {"f": "zzzzzz"})
    with pytest.raises(ValueError, match="'path:input'"):
        FeatureTaps(model, {"f": "fc:inputs"})


def test_bad_spec_leaves_the_model_unhooked() -> None:
    model = models.create("resnet8")
    with pytest.raises(KeyError):
        FeatureTaps(model, {"good": "layer1", "bad": "layer9"})
    assert no_hooks(model)


def test_resolve_maps_names_and_passes_specs_through() -> None:
    model = models.create("resnet8")
    assert resolve_taps(model, ["penultimate", "stage2", "layer2.0", "layer3:input"]) == {
        "penultimate": "fc:input",
        "stage2": "layer2",
        "layer2.0": "layer2.0",
        "layer3:input": "layer3:input",
    }


def test_resolve_errors() -> None:
    model = models.create("resnet8")
    with pytest.raises(KeyError, match="'stage1'.*Default taps: stage1"):
        resolve_taps(model, ["stage4"])
    with pytest.raises(ValueError, match="return value"):
        resolve_taps(model, ["logits"])


def test_user_model_penultimate_is_the_last_linear_input() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    assert resolve_taps(model, ["penultimate"]) == {"penultimate": "3:input"}
    x = torch.randn(2, 3, 4)
    with FeatureTaps(model, resolve_taps(model, ["penultimate"])) as taps:
        model(x)
        torch.testing.assert_close(taps["penultimate"], model[2](model[1](x.flatten(1))))
    with pytest.raises(KeyError, match="Default taps: none"):
        resolve_taps(nn.Sequential(nn.Conv2d(1, 1, 1)), ["penultimate"])


def test_torchvision_default_taps() -> None:
    model = models.create("torchvision:resnet18", num_classes=10).eval()
    names = ["stage1", "stage2", "stage3", "stage4", "penultimate"]
    with FeatureTaps(model, resolve_taps(model, names)) as taps, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        shapes = {k: tuple(v.shape) for k, v in taps.features.items()}
    assert shapes == {
        "stage1": (2, 64, 8, 8),
        "stage2": (2, 128, 4, 4),
        "stage3": (2, 256, 2, 2),
        "stage4": (2, 512, 1, 1),
        "penultimate": (2, 512),
    }


def expected_stage_sizes(name: str) -> list[int]:
    """Side of each stage's map for 32x32 inputs, from the strides in the architectures' papers."""
    if name == "resnet50":
        return [32, 16, 8, 4]  # stride-1 stem, then stages at strides 1, 2, 2, 2
    if name.startswith(("resnet", "wrn")):
        return [32, 16, 8]  # stride-1 stem, then stages at strides 1, 2, 2
    if name.startswith("vgg"):
        return [16, 8, 4, 4]  # max pools after blocks 0, 1, 2; blocks 3 and 4 share a resolution
    if name == "mobilenetv2":
        return [16, 8, 4, 2]  # stride-2 stem; taps after the groups at 1/2, 1/4, 1/8, 1/16
    return [16, 8, 4]  # ShuffleNets: stride-1 stem, each stage opens with a stride-2 unit


def repdistiller_feature_map(name: str) -> tuple[int, int, int]:
    """``feat[-2]`` of RepDistiller's model of that name on 32x32 inputs (github.com/HobbitLong/RepDistiller
    ``models/*.py``, ``forward(is_feat=True)``), ``(C, H, W)``, from its channel and stride settings."""
    if name in ("resnet8x4", "resnet32x4"):
        return (256, 8, 8)  # resnet.py: widths [32, 64, 128, 256], f3 = layer3 (8x8)
    if name == "resnet50":
        return (2048, 4, 4)  # resnetv2.py: f4 = layer4, 512 x 4 (Bottleneck) at stride 8
    if name.startswith("resnet"):
        return (64, 8, 8)  # resnet.py: widths [16, 16, 32, 64]
    if name.startswith("wrn"):
        return (64 * int(name.split("_")[2]), 8, 8)  # wrn.py: f3 = block3 output, 64k channels
    if name.startswith("vgg"):
        return (512, 4, 4)  # vgg.py: f4 = relu(block4), 1/8 of the input
    if name == "mobilenetv2":
        return (160, 2, 2)  # mobilenetv2.py (mobile_half): f4 = blocks[6], int(320 * 0.5) channels
    if name == "shufflenetv1":
        return (960, 4, 4)  # ShuffleNetv1.py: out_planes [240, 480, 960], f3 = layer3
    return (464, 4, 4)  # ShuffleNetv2.py net_size 1: out_channels (116, 232, 464, 1024), f3 = layer3


@pytest.mark.parametrize("name", ZOO)
def test_zoo_feature_map_is_repdistillers_last_map_before_pooling(name: str) -> None:
    model = models.create(name).eval()
    with FeatureTaps(model, resolve_taps(model, ["feature_map"])) as taps, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        assert tuple(taps["feature_map"].shape) == (2, *repdistiller_feature_map(name))


def test_small_models_feature_map() -> None:
    x = torch.randn(3, 1, 8, 8)
    lenet = models.create("lenet").eval()
    with FeatureTaps(lenet, resolve_taps(lenet, ["feature_map", "stage3"])) as taps, torch.no_grad():
        lenet(x)
        assert taps["feature_map"].shape == (3, 64, 2, 2)  # stage3, before the 2x2 pool
        assert torch.equal(taps["feature_map"], taps["stage3"])
    # An MLP has no spatial map: its feature map is the last hidden layer, the penultimate vector.
    mlp = models.create("mlp", depth=2).eval()
    with FeatureTaps(mlp, resolve_taps(mlp, ["feature_map", "penultimate"])) as taps, torch.no_grad():
        mlp(x)
        assert taps["feature_map"].shape == (3, 128)
        assert torch.equal(taps["feature_map"], taps["penultimate"])
    small = models.create("small_resnet").eval()
    with FeatureTaps(small, resolve_taps(small, ["feature_map"])) as taps, torch.no_grad():
        small(x)
        assert taps["feature_map"].shape == (3, 64, 2, 2)  # layer3, before the global pool


def test_torchvision_feature_map_is_the_last_stage_or_the_features() -> None:
    assert resolve_taps(models.create("torchvision:resnet18"), ["feature_map"]) == {"feature_map": "layer4"}
    net = models.create("torchvision:mobilenet_v2", num_classes=10).eval()
    assert resolve_taps(net, ["feature_map"]) == {"feature_map": "features"}
    with FeatureTaps(net, resolve_taps(net, ["feature_map"])) as taps, torch.no_grad():
        net(torch.randn(1, 3, 32, 32))
        assert taps["feature_map"].shape == (1, 1280, 1, 1)  # the last 1x1 conv, before the pool


@pytest.mark.parametrize("name", ZOO)
def test_zoo_default_taps(name: str) -> None:
    model = models.create(name).eval()
    assert {"penultimate", "feature_map", "stage1", "stage2", "stage3"} <= set(model.default_taps)
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with FeatureTaps(model, model.default_taps) as taps, torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
        feats = dict(taps.features)
    assert set(feats) == set(model.default_taps)
    assert feats["penultimate"].shape == (2, last_linear.in_features)
    torch.testing.assert_close(logits, last_linear(feats["penultimate"]))
    stages = [feats[k] for k in sorted(feats) if k.startswith("stage")]
    assert [s.dim() for s in stages] == [4] * len(stages)
    assert [s.shape[-1] for s in stages] == expected_stage_sizes(name)
