"""DeiT: the ViT's token layout (position embedding rows, parameter count by hand), its two heads read
off the class and distillation tokens, the eval output as their mean, the hard and soft losses against
written-out float64 formulas, the distillation gradient reaching the distillation head and never the
class head, no gradient into the teacher, the pinned defaults, and a digits run."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
import yaml
from torch import nn

from relkd import configs, models
from relkd.config import load_config
from relkd.experiment import RunDir, run_method, run_teacher
from relkd.methods import STEPS, StageInfo, StepContext
from relkd.methods.deit import DeiT, deit_hard, deit_soft, student_heads
from relkd.models.vit import VisionTransformer

torch.set_num_threads(1)


# --- the model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_shape, patch, tokens",
    [
        ((1, 8, 8), None, 16),
        ((1, 28, 28), None, 16),
        ((1, 28, 28), 4, 49),
        ((3, 32, 32), 8, 16),
        ((1, 8, 12), 2, 24),
    ],
)
def test_position_embedding_has_a_row_per_patch_plus_the_two_tokens(in_shape, patch, tokens):
    deit = models.create("deit_tiny", in_shape=in_shape, patch_size=patch)
    vit = models.create("vit_tiny", in_shape=in_shape, patch_size=patch)
    assert deit.num_patches == tokens and deit.pos_embed.shape == (1, tokens + 2, 64)
    assert vit.pos_embed.shape == (1, tokens + 1, 64) and vit.dist_token is None and vit.head_dist is None
    assert deit.dist_token.shape == (1, 1, 64)


def test_parameter_count_by_hand():
    # Patch embedding 1*2*2*64 + 64; class and distillation tokens 64 each; position embedding 18 * 64;
    # a block: two LayerNorms 2 * 128, qkv 64 * 192 + 192, proj 64 * 64 + 64, MLP 64 * 256 + 256 and
    # 256 * 64 + 64; final LayerNorm 128; two heads 64 * 10 + 10.
    block = 2 * 128 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)
    expected = (4 * 64 + 64) + 64 + 64 + 18 * 64 + 4 * block + 128 + 2 * (64 * 10 + 10)
    deit = models.create("deit_tiny", num_classes=10)
    assert sum(p.numel() for p in deit.parameters()) == expected == 202964
    vit = models.create("vit_tiny", num_classes=10)
    assert sum(p.numel() for p in vit.parameters()) == expected - 64 - 64 - 650


def test_heads_read_the_class_and_distillation_tokens_and_eval_returns_their_mean():
    torch.manual_seed(0)
    model = models.create("deit_tiny", num_classes=5).eval()
    x = torch.randn(3, 1, 8, 8)
    tokens = {}
    model.norm.register_forward_hook(lambda m, i, o: tokens.__setitem__("out", o.detach().double()))
    z_cls, z_dist = model.forward_heads(x)
    t = tokens["out"]
    assert t.shape == (3, 18, 64)
    w, b = model.head.weight.double(), model.head.bias.double()
    wd, bd = model.head_dist.weight.double(), model.head_dist.bias.double()
    torch.testing.assert_close(z_cls.double(), t[:, 0] @ w.T + b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_dist.double(), t[:, 1] @ wd.T + bd, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(z_cls, z_dist)
    torch.testing.assert_close(model(x), (z_cls + z_dist) / 2)  # eval: the mean of the two heads
    model.train()  # training: forward_heads gives both heads, forward still the mean (no drop path here)
    model.blocks.apply(lambda m: setattr(m, "p", 0.0) if hasattr(m, "p") else None)
    z_cls_t, z_dist_t = model.forward_heads(x)
    torch.testing.assert_close(z_cls_t, z_cls)
    torch.testing.assert_close(z_dist_t, z_dist)
    torch.testing.assert_close(model(x), (z_cls + z_dist) / 2)
    plain = models.create("vit_tiny", num_classes=5).eval()
    a, b2 = plain.forward_heads(x)
    assert a is b2 and torch.equal(plain(x), a)


def test_official_initialisation_and_sizes():
    torch.manual_seed(0)
    model = models.create("deit_tiny")
    defaults = {k: p.default for k, p in inspect.signature(models.MODELS.get("deit_tiny")).parameters.items()}
    assert defaults == {
        "num_classes": 10, "in_shape": (1, 8, 8), "patch_size": None, "dim": 64, "depth": 4, "heads": 4,
        "mlp_ratio": 4.0, "drop_path": 0.1,
    }  # fmt: skip
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, nn.LayerNorm))
    for p in (model.cls_token, model.dist_token, model.pos_embed, model.head.weight):
        assert p.abs().max() <= 2.0 and 0.01 < p.std().item() < 0.03  # truncated normal, std 0.02
    assert model.head.bias.eq(0).all() and model.blocks[0].attn.qkv.bias is not None
    rates = [b.drop_path.p for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])  # linear up to drop_path
    assert model.default_taps["penultimate"] == "head:input" and model.default_taps["stage4"] == "blocks.3"
    with pytest.raises(ValueError, match="patch_size 3 must divide the image's height and width, got 8 x 8"):
        models.create("deit_tiny", patch_size=3)
    with pytest.raises(ValueError, match="heads dividing dim"):
        models.create("deit_tiny", heads=5)


# --- the losses ---------------------------------------------------------------------------------------


def softmax(row: list[float], T: float = 1.0) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    return [v / sum(e) for v in e]


def reference_hard(student: torch.Tensor, teacher: torch.Tensor, eps: float = 0.0) -> float:
    """1/B sum_b -sum_c y_bc log softmax(z_dist)_bc, y the one-hot of the teacher's argmax, smoothed."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        label = max(range(len(t_row)), key=lambda c: t_row[c])
        c = len(s_row)
        y = [1 - eps if k == label else eps / (c - 1) for k in range(c)]
        total -= sum(yk * math.log(q) for yk, q in zip(y, softmax(s_row), strict=True))
    return total / len(student)


def reference_soft(student: torch.Tensor, teacher: torch.Tensor, T: float) -> float:
    """T^2 / (B C) * sum_{b,c} p_t (log p_t - log p_s) at temperature T."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p, q = softmax(t_row, T), softmax(s_row, T)
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    return T * T * total / student.numel()


def logits(seed: int, b: int = 6, c: int = 7) -> torch.Tensor:
    return 3 * torch.randn(b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_hard_distillation_is_the_cross_entropy_against_the_teachers_argmax():
    s, t = logits(0), logits(1)
    assert deit_hard(s, t).item() == pytest.approx(reference_hard(s, t), rel=1e-12)
    assert deit_hard(s, t, smoothing=0.1).item() == pytest.approx(reference_hard(s, t, 0.1), rel=1e-12)
    # Only the teacher's argmax matters.
    assert deit_hard(s, 5 * t + 2).item() == pytest.approx(deit_hard(s, t).item(), rel=1e-12)
    leaf = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: deit_hard(z, t, 0.1), (leaf,))


def test_soft_distillation_divides_by_batch_and_classes():
    s, t = logits(2), logits(3)
    for T in (1.0, 3.0):
        assert deit_soft(s, t, T).item() == pytest.approx(reference_soft(s, t, T), rel=1e-12)
    assert deit_soft(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-12)
    leaf = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: deit_soft(z, t, 3.0), (leaf,))


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"same shape \[B, C\], got \[6, 7\] and \[5, 7\]"):
        deit_hard(logits(0), logits(1, b=5))
    with pytest.raises(ValueError, match="temperature T must be positive"):
        deit_soft(logits(0), logits(1), 0.0)
    with pytest.raises(ValueError, match="smoothing must be in"):
        deit_hard(logits(0), logits(1), 1.0)
    with pytest.raises(ValueError, match="distillation must be one of hard, soft, got 'none'"):
        DeiT("none", students=["s"], teachers=["t"])
    with pytest.raises(ValueError, match="one teacher into one student, got 1 student.*and 2 teacher"):
        DeiT(students=["s"], teachers=["t1", "t2"])


# --- the step -----------------------------------------------------------------------------------------


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def step_context(student: nn.Module, ce_weight: float, target: torch.Tensor | None = None) -> StepContext:
    torch.manual_seed(1)
    x = torch.randn(8, 1, 8, 8)
    target = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1]) if target is None else target
    nets = {"student": student, "teacher": Teacher().eval().requires_grad_(False)}
    return StepContext(
        batch={"input": x, "target": target, "index": torch.arange(8)}, epoch=0, step=0, steps_per_epoch=1,
        stage=StageInfo("train", 0, 1, 0, (), ce_weight), networks=nets, students=["student"],
        teachers=["teacher"], terms={}, taps={},
    )  # fmt: skip


def test_distillation_trains_the_distillation_head_and_labels_the_class_head():
    torch.manual_seed(0)
    model = models.create("deit_tiny", drop_path=0.0)
    ctx = step_context(model, ce_weight=0.0)
    out = DeiT(students=["student"], teachers=["teacher"])(ctx)
    assert set(out.losses) == {"distill"}
    out.losses["distill"].backward()
    assert model.head.weight.grad is None or model.head.weight.grad.abs().max() == 0
    assert model.head_dist.weight.grad.abs().max() > 0 and model.cls_token.grad is not None
    assert ctx.networks["teacher"].fc.weight.grad is None
    # The loss is alpha times the hard loss of the distillation head against the teacher's argmax.
    z_cls, z_dist = model.forward_heads(ctx.batch["input"])
    teacher = ctx.networks["teacher"](ctx.batch["input"])
    assert out.losses["distill"].item() == pytest.approx(
        0.5 * reference_hard(z_dist.double(), teacher.double()), rel=1e-5
    )
    torch.testing.assert_close(out.logits, ((z_cls + z_dist) / 2).detach())
    # The labels go to the class head alone.
    model.zero_grad(set_to_none=True)
    out = DeiT(alpha=0.0, students=["student"], teachers=["teacher"])(step_context(model, ce_weight=0.5))
    out.losses["ce"].backward()
    assert model.head_dist.weight.grad is None or model.head_dist.weight.grad.abs().max() == 0
    assert model.head.weight.grad.abs().max() > 0
    labelled = -torch.log_softmax(z_cls.double()[:4], 1)[torch.arange(4), torch.arange(4)].mean().item()
    assert out.losses["ce"].item() == pytest.approx(0.5 * labelled, rel=1e-5)


def test_soft_step_and_a_student_without_distillation_token():
    torch.manual_seed(0)
    plain = models.create("vit_tiny", drop_path=0.0)
    ctx = step_context(plain, ce_weight=0.5)
    out = DeiT("soft", alpha=0.5, T=3.0, students=["student"], teachers=["teacher"])(ctx)
    z, same = student_heads(plain, ctx.batch["input"])
    assert z is same
    teacher = ctx.networks["teacher"](ctx.batch["input"])
    assert out.metrics["distill"].item() == pytest.approx(
        reference_soft(z.double(), teacher.double(), 3.0), rel=1e-5
    )
    assert out.losses["distill"].item() == pytest.approx(0.5 * out.metrics["distill"].item(), rel=1e-6)


def test_pinned_defaults():
    assert STEPS.get("deit") is DeiT
    defaults = {k: p.default for k, p in inspect.signature(DeiT).parameters.items()}
    # main.py: --distillation-alpha 0.5, --distillation-tau 1.0; hard produced the published models
    assert (defaults["distillation"], defaults["alpha"], defaults["T"], defaults["smoothing"]) == (
        "hard",
        0.5,
        1.0,
        0.0,
    )
    method = yaml.safe_load(configs.method_path("deit").read_text())
    assert method["step"] == {"name": "deit", "distillation": "hard", "alpha": 0.5, "T": 1.0}
    assert method["train"]["ce_weight"] == 0.5  # 1 - alpha
    assert method["students"] == {"student": {"model": "deit_tiny"}}
    assert isinstance(models.create("deit_tiny"), VisionTransformer)


@pytest.mark.slow
def test_digits_run_finishes_with_finite_losses(tmp_path):
    cfg = load_config(None, ["methods=[deit]", "train.epochs=2", "teacher.train.epochs=2", "seeds=[0]",
                             f"out={tmp_path}", "tensorboard=false"])[0]  # fmt: skip
    assert cfg.methods["deit"].students["student"].model == "deit_tiny"
    run_dir = RunDir(tmp_path)
    teacher = run_teacher(cfg, run_dir, quiet=True, echo=lambda s: None)
    result = run_method(cfg, "deit", 0, {"teacher": teacher}, run_dir, quiet=True, echo=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "deit/seed0/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(math.isfinite(r["loss/ce"]) and math.isfinite(r["loss/distill"]) for r in rows)
    assert math.isfinite(result["last_acc1"])
