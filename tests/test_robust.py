"""The PGD attack and the robust evaluator: the ball and the box in pixel space under any normalisation,
the attacked network left bit-identical (parameters, gradients, BatchNorm buffers, modes) and attacked in
eval mode, the closed-form worst case of a two-class linear model (the L-inf attack moves along the
sign of the weight difference), a signed step never decreasing a convex objective, and robust accuracy
on a model whose robust accuracy is known by construction."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relkd.evaluation import EVALUATORS, EvalContext, build_evaluator
from relkd.evaluation.robust import (
    PixelSpace,
    RobustAccuracy,
    ce_objective,
    eval_mode,
    kl_objective,
    pgd,
    robust_accuracy,
)

torch.set_num_threads(1)

MEAN, STD = (0.3, 0.6), (0.2, 0.45)


def pixels(b: int = 6, c: int = 2, size: int = 5, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Pixels in [0, 1] with exact 0s and 1s (the box is active there)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(b, c, size, size, generator=g, dtype=dtype)
    p[:, :, 0, 0], p[:, :, 0, 1] = 0.0, 1.0
    return p


class SmallNet(nn.Module):
    """Conv, BatchNorm, dropout and a linear head: every kind of state an attack could disturb."""

    def __init__(self, c: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 25, classes)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


class Linear2(nn.Module):
    """Two-class linear model on the flattened normalised input."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


@pytest.mark.parametrize("start", ["uniform", "normal", "none"])
@pytest.mark.parametrize("space", [PixelSpace(), PixelSpace(MEAN, STD)])
def test_the_attack_stays_in_the_ball_and_the_box_in_pixel_space(start, space):
    torch.manual_seed(0)
    net = SmallNet().double()
    p = pixels()
    eps = 0.1
    x = space.to_inputs(p)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    adv = pgd(net, x, ce_objective(y), epsilon=eps, step_size=0.04, steps=6, random_start=start, pixels=space)
    q = space.to_pixels(adv)
    tol = 1e-12
    assert (q - p).abs().max() <= eps + tol
    assert q.min() >= -tol and q.max() <= 1 + tol
    assert (q - p).abs().max() > eps / 2  # it moved


def test_pixel_space_round_trip_and_data_set_lookup():
    space = PixelSpace(MEAN, STD)
    p = pixels()
    assert torch.allclose(space.to_pixels(space.to_inputs(p)), p, atol=1e-15)
    x = space.to_inputs(p)
    assert torch.allclose(x[:, 1], (p[:, 1] - 0.6) / 0.45)

    class Data:
        mean, std = MEAN, STD

    class Loader:
        dataset = Data()

    assert PixelSpace.of(Loader()) == space and PixelSpace.of(object()) is None
    with pytest.raises(ValueError, match="positive"):
        PixelSpace((0.0,), (0.0,))
    with pytest.raises(ValueError, match="2 channels but the normalisation has 3"):
        PixelSpace((0.0,) * 3, (1.0,) * 3).to_pixels(p)


def test_the_attacked_network_is_bit_identical_after_the_attack_and_ran_in_eval_mode():
    torch.manual_seed(0)
    net = SmallNet().double().train()
    net.fc.eval()  # a part in its own mode must come back in it
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    state = copy.deepcopy(net.state_dict())
    grads = [p.grad.clone() for p in net.parameters()]
    modes = [m.training for m in net.modules()]
    seen = []
    net.register_forward_pre_hook(lambda m, a: seen.append([mod.training for mod in m.modules()]))
    x = PixelSpace(MEAN, STD).to_inputs(pixels())
    pgd(
        net,
        x,
        ce_objective(torch.zeros(6, dtype=torch.long)),
        epsilon=0.1,
        step_size=0.03,
        steps=4,
        pixels=PixelSpace(MEAN, STD),
    )
    assert len(seen) == 4 and not any(any(flags) for flags in seen)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads, strict=True))
    assert [m.training for m in net.modules()] == modes


def test_eval_mode_restores_each_modules_flag_after_an_error():
    net = SmallNet().train()
    net.bn.eval()
    with pytest.raises(RuntimeError), eval_mode(net):
        assert not net.training and not net.conv.training
        raise RuntimeError
    assert net.training and net.conv.training and not net.bn.training


@pytest.mark.parametrize("start", ["none", "uniform"])
def test_linear_two_class_worst_case_is_a_move_along_the_sign_of_the_weight_difference(start):
    # The cross-entropy of a 2-class linear model decreases with the margin d . p, d the difference of the
    # two rows' pixel-space weights (the normalised weights divided by each channel's std); its L-inf
    # worst case in the ball and the box moves every pixel by epsilon against sign(d), clipped to [0, 1].
    g = torch.Generator().manual_seed(3)
    space = PixelSpace(MEAN, STD)
    p = pixels(b=5, size=3)
    w = torch.randn(2, 2 * 9, generator=g, dtype=torch.float64)
    net = Linear2(w, torch.randn(2, generator=g, dtype=torch.float64))
    y = torch.tensor([0, 1, 1, 0, 1])
    eps = 0.15
    adv = pgd(
        net,
        space.to_inputs(p),
        ce_objective(y),
        epsilon=eps,
        step_size=eps / 4,
        steps=10,
        random_start=start,
        pixels=space,
    )
    std = torch.tensor(STD, dtype=torch.float64).repeat_interleave(9)
    expected = torch.empty_like(p.flatten(1))
    for b in range(5):
        d = (w[y[b]] - w[1 - y[b]]) / std  # pixel-space margin direction of the true class
        for k in range(18):
            v = float(p.flatten(1)[b, k])
            expected[b, k] = max(v - eps, 0.0) if d[k] > 0 else min(v + eps, 1.0)
    assert torch.allclose(space.to_pixels(adv).flatten(1), expected, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_one_signed_step_never_decreases_a_convex_objective(seed):
    # For a linear model the KL from fixed soft labels and the cross-entropy are convex in the input, so
    # f(x + a s) >= f(x) + a |grad f|_1 for the signed step, also when the box shortens some moves.
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 25, 4)).double()
    with torch.no_grad():
        for prm in net.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=torch.float64))
    space = PixelSpace(MEAN, STD)
    x = space.to_inputs(pixels(seed=seed))
    teacher = F.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), 1)
    for objective in (kl_objective(teacher), ce_objective(torch.arange(6) % 4)):
        adv = pgd(net, x, objective, epsilon=0.05, step_size=0.05, steps=1, random_start="none", pixels=space)
        with torch.no_grad():
            assert float(objective(net(adv))) >= float(objective(net(x)))
            assert float(objective(net(adv))) > float(objective(net(x))) + 1e-6


def test_kl_objective_is_the_summed_kl_from_the_teacher():
    g = torch.Generator().manual_seed(0)
    t = F.softmax(torch.randn(3, 4, generator=g, dtype=torch.float64), 1)
    t[0] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # 0 log 0 = 0
    z = torch.randn(3, 4, generator=g, dtype=torch.float64)
    q = F.softmax(z, 1)
    ref = sum(
        float(t[b, c]) * (torch.log(t[b, c]) - torch.log(q[b, c])).item()
        for b in range(3)
        for c in range(4)
        if t[b, c] > 0
    )
    assert float(kl_objective(t)(z)) == pytest.approx(ref, abs=1e-12)


class Threshold(nn.Module):
    """Class 1 iff the first pixel (in pixel space) exceeds 0.5: logits 10 (0.5 - p) and 10 (p - 0.5)."""

    def __init__(self, space: PixelSpace) -> None:
        super().__init__()
        self.space = space
        self.scale = nn.Parameter(torch.tensor(10.0, dtype=torch.float64))

    def forward(self, x):
        p = self.space.to_pixels(x)[:, 0, 0, 0]
        return torch.stack([self.scale * (0.5 - p), self.scale * (p - 0.5)], 1)


def threshold_batches(space: PixelSpace) -> list[dict[str, torch.Tensor]]:
    first = torch.tensor([0.05, 0.3, 0.45, 0.55, 0.62, 0.9, 0.58, 0.35, 0.2], dtype=torch.float64)
    p = torch.full((9, 2, 2, 2), 0.5, dtype=torch.float64)
    p[:, 0, 0, 0] = first
    target = (first > 0.5).long()
    target[-1] = -1  # unlabelled: not counted
    x = space.to_inputs(p)
    return [{"input": x[:5], "target": target[:5]}, {"input": x[5:], "target": target[5:]}]


def test_robust_accuracy_of_a_threshold_model_is_the_share_farther_than_epsilon_from_it():
    # Labelled first pixels 0.05 0.3 0.45 0.55 0.62 0.9 0.58 0.35: with epsilon 0.1, the five farther than
    # 0.1 from the threshold 0.5 stay correct, the three within it are flipped: 5 / 8.
    space = PixelSpace(MEAN, STD)
    net = Threshold(space)
    result = robust_accuracy(
        net, threshold_batches(space), epsilon=0.1, step_size=0.0125, steps=20, pixels=space
    )
    assert result == {"acc1": pytest.approx(62.5), "clean_acc1": pytest.approx(100.0)}
    small = robust_accuracy(
        net, threshold_batches(space), epsilon=0.03, step_size=0.01, steps=10, pixels=space
    )
    assert small["acc1"] == pytest.approx(100.0)


def test_the_evaluator_reads_the_normalisation_and_reports_the_column():
    space = PixelSpace(MEAN, STD)
    net = Threshold(space)
    evaluator = build_evaluator(
        "robust", {"epsilon": 0.1, "step_size": 0.0125, "steps": 20, "mean": MEAN, "std": STD}
    )
    assert isinstance(evaluator, RobustAccuracy) and "robust" in EVALUATORS
    ctx = EvalContext("student", {"student": net}, {"test": threshold_batches(space)}, torch.device("cpu"))
    assert evaluator(ctx) == {"acc1": pytest.approx(62.5), "clean_acc1": pytest.approx(100.0)}
    with pytest.raises(ValueError, match="give the evaluator mean and std"):
        RobustAccuracy(epsilon=0.1)(ctx)


def test_more_restarts_never_raise_robust_accuracy():
    # Without steps, an attack is its random start: an image within epsilon of the threshold falls
    # when one of its starts crosses it, so five restarts flip more of them than one.
    space = PixelSpace(MEAN, STD)
    net = Threshold(space)
    first = torch.linspace(0.42, 0.58, 40, dtype=torch.float64)
    first = first[(first - 0.5).abs() > 1e-3]
    p = torch.full((first.numel(), 2, 2, 2), 0.5, dtype=torch.float64)
    p[:, 0, 0, 0] = first
    batches = [{"input": space.to_inputs(p), "target": (first > 0.5).long()}]
    one = robust_accuracy(net, batches, epsilon=0.1, step_size=0.0, steps=0, restarts=1, pixels=space)["acc1"]
    five = robust_accuracy(net, batches, epsilon=0.1, step_size=0.0, steps=0, restarts=5, pixels=space)[
        "acc1"
    ]
    assert five < one < 100.0


def test_bad_options_raise_clearly():
    net = Threshold(PixelSpace())
    x = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="random_start must be one of"):
        pgd(
            net,
            x,
            ce_objective(torch.zeros(2, dtype=torch.long)),
            epsilon=0.1,
            step_size=0.1,
            steps=1,
            random_start="gauss",
        )
    with pytest.raises(ValueError, match="epsilon and step_size must be >= 0"):
        pgd(net, x, ce_objective(torch.zeros(2, dtype=torch.long)), epsilon=-0.1, step_size=0.1, steps=1)
    with pytest.raises(ValueError, match="restarts must be >= 1"):
        RobustAccuracy(restarts=0)
    with pytest.raises(ValueError, match="give both mean and std"):
        RobustAccuracy(mean=(0.5,))
    with pytest.raises(ValueError, match="needs labelled images"):
        robust_accuracy(net, [{"input": x, "target": torch.full((2,), -1)}], pixels=PixelSpace())


def test_pinned_defaults_are_the_rslad_authors_evaluation():
    # resnet18_rslad_cifar10.py: attack_pgd(attack_iters=20, step_size=0.003, epsilon=8/255), uniform start
    evaluator = RobustAccuracy()
    assert evaluator.options == {
        "epsilon": 8 / 255,
        "step_size": 0.003,
        "steps": 20,
        "restarts": 1,
        "random_start": "uniform",
        "seed": 0,
    }
    assert evaluator.split == "test" and evaluator.pixels is None
