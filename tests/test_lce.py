"""LCE: the old model's class centres and boundaries on hand-made points, the alignment and boundary
terms against written-out formulas, the transforms, the fitting passes as the method's stages run
them, and the pinned defaults."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import yaml

import relkd.losses as L
from relkd import configs
from relkd.losses import functional as F
from relkd.losses.lce import RBTBlock, rbt_transform

A = 1.0 / math.sqrt(2.0)


def two_classes():
    """Class 0: (2, 0), (0, 3); class 1: (-1, 0), (-3, 0), (-1, 1); and the centres and boundaries
    worked out by hand."""
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [-3.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1])
    # class 0: unit points (1, 0), (0, 1): centre (1, 1)/sqrt 2, both at cosine 1/sqrt 2
    # class 1: unit points (-1, 0) twice and (-a, a): sum (-(2 + a), a)
    norm = math.sqrt((2.0 + A) ** 2 + A**2)
    centres = torch.tensor([[A, A], [-(2.0 + A) / norm, A / norm]], dtype=torch.float64)
    # the farthest of class 1 is (-a, a): cosine a (2 + a + a) / norm (the other two: (2 + a) / norm)
    boundaries = torch.tensor([A, A * (2.0 + 2.0 * A) / norm], dtype=torch.float64)
    return x, y, centres, boundaries


def fitted(**kwargs) -> L.LCELoss:
    x, y, _, _ = two_classes()
    torch.manual_seed(0)
    options = {"student_dim": 2, "teacher_dim": 2, "num_classes": 2, **kwargs}
    loss = L.build("lce", **options).double()
    loss.fit(x, y)
    return loss


# --- phase A --------------------------------------------------------------------------------------


def test_centres_and_boundaries_of_hand_made_points():
    x, y, centres, boundaries = two_classes()
    torch.testing.assert_close(F.class_centres(x, y, 2), centres, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.class_boundaries(x, y, centres), boundaries, rtol=1e-12, atol=1e-12)
    loss = fitted()
    torch.testing.assert_close(loss.centres, centres, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.boundaries, boundaries, rtol=1e-12, atol=1e-12)
    assert loss.fitted and loss.present.all()


def test_passes_over_batches_with_transfer_rows_and_repeats():
    x, y, centres, boundaries = two_classes()
    loss = L.build("lce", student_dim=2, teacher_dim=2, num_classes=2, num_data=8).double()
    junk = torch.tensor([[5.0, -7.0]], dtype=torch.float64)  # an unlabelled transfer row
    batches = [
        (
            {"penultimate": torch.cat([x[:3], junk])},
            {"target": torch.tensor([0, 0, 1, -1]), "index": torch.tensor([0, 1, 2, 7])},
        ),
        (
            {"penultimate": torch.cat([x[3:], junk])},
            {"target": torch.tensor([1, 1, -1]), "index": torch.tensor([3, 4, 6])},
        ),
        # the labelled loader cycled: images 0 and 4 again, which must not count twice
        ({"penultimate": x[[0, 4]]}, {"target": torch.tensor([0, 1]), "index": torch.tensor([0, 4])}),
    ]
    for feats, batch in batches:
        value = loss.fit_step(feats, batch)
        assert value.item() == 0.0 and not value.requires_grad
    assert loss.counts.tolist() == [2, 3]
    loss.finalize_centres()
    for feats, batch in batches:
        loss.boundary_step(feats, batch)
    loss.finalize_boundaries()
    torch.testing.assert_close(loss.centres, centres, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.boundaries, boundaries, rtol=1e-12, atol=1e-12)


def test_the_passes_run_in_order():
    x, y, _, _ = two_classes()
    loss = L.build("lce", student_dim=2, teacher_dim=2, num_classes=2).double()
    feats, batch = {"penultimate": x}, {"target": y}
    with pytest.raises(RuntimeError, match="not fitted"):
        loss(x, y)
    with pytest.raises(RuntimeError, match="finalize_centres"):
        loss.boundary_step(feats, batch)
    loss.fit_step(feats, batch)
    loss.finalize_centres()
    with pytest.raises(RuntimeError, match="final"):
        loss.fit_step(feats, batch)


def test_a_class_without_images_is_left_out():
    x, y, centres, _ = two_classes()
    loss = L.build("lce", student_dim=2, teacher_dim=2, num_classes=3).double()
    with pytest.warns(UserWarning, match="1 of 3 classes"):
        loss.fit(x, y)
    assert loss.present.tolist() == [True, True, False] and loss.boundaries[2].item() == -1.0
    with torch.no_grad():
        loss.arcface.weight[:2] = centres
    w = loss.arcface.normalized_weight()
    assert F.lce_align(w, loss.centres, present=loss.present).item() == pytest.approx(0.0, abs=1e-15)
    assert F.lce_align(w, loss.centres).item() == pytest.approx(1.0 / 6.0, rel=1e-12)  # a unit row vs 0


def test_fitting_passes_no_gradient_to_the_teacher():
    x, y, _, _ = two_classes()
    loss = L.build("lce", student_dim=2, teacher_dim=2, num_classes=2).double()
    t = x.clone().requires_grad_()
    assert not loss.fit_step({"penultimate": t}, {"target": y}).requires_grad
    loss.finalize_centres()
    assert not loss.boundary_step({"penultimate": t}, {"target": y}).requires_grad
    assert t.grad is None and not loss.centres.requires_grad


def test_fit_survives_a_checkpoint():
    loss = fitted()
    fresh = L.build("lce", student_dim=2, teacher_dim=2, num_classes=2).double()
    fresh.load_state_dict(loss.state_dict())
    assert fresh.fitted
    torch.testing.assert_close(fresh.centres, loss.centres)
    torch.testing.assert_close(fresh.boundaries, loss.boundaries)


# --- phase B --------------------------------------------------------------------------------------


def at_angle(angles, radius=1.0):
    return torch.tensor([[radius * math.cos(a), radius * math.sin(a)] for a in angles], dtype=torch.float64)


def test_boundary_term_is_zero_on_the_centres_and_linear_below_the_boundary():
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = math.cos(0.2)
    boundaries = torch.tensor([b, 0.5], dtype=torch.float64)
    y = torch.tensor([0, 1])
    assert F.lce_boundary(5.0 * centres, y, centres, boundaries).item() == 0.0
    angles = [0.1, 0.2, 0.5, 1.0, 2.0]
    y0 = torch.zeros(1, dtype=torch.long)
    values = [F.lce_boundary(at_angle([a]), y0, centres, boundaries).item() for a in angles]
    expected = [max(0.0, b - math.cos(a)) for a in angles]
    assert values == pytest.approx(expected, abs=1e-12)
    # linear in the cosine below b: equal steps in cos(theta) give equal steps in the loss
    cosines = [b - 0.1, b - 0.3, b - 0.5]
    steps = [F.lce_boundary(at_angle([math.acos(c)], 3.0), y0, centres, boundaries).item() for c in cosines]
    assert steps == pytest.approx([0.1, 0.3, 0.5], abs=1e-12)
    # the mean over the labelled rows, unlabelled ones left out
    f = at_angle([0.5, 1.0, 2.0])
    value = F.lce_boundary(f, torch.tensor([0, -1, 0]), centres, boundaries).item()
    assert value == pytest.approx((b - math.cos(0.5) + b - math.cos(2.0)) / 2, abs=1e-12)


def test_raw_boundary_is_the_authors_clamped_inner_product():
    centres = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    boundaries = torch.tensor([0.9], dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    f = at_angle([0.3, 1.2, 3.0], radius=3.0)
    raw = F.lce_boundary(f, y, centres, boundaries, on="raw").item()
    expected = sum(max(0.0, 0.9 - max(-1.0, min(1.0, 3.0 * math.cos(a)))) for a in (0.3, 1.2, 3.0)) / 3
    assert raw == pytest.approx(expected, abs=1e-12)
    normalized = F.lce_boundary(f, y, centres, boundaries).item()
    assert normalized == pytest.approx(
        sum(max(0.0, 0.9 - math.cos(a)) for a in (0.3, 1.2, 3.0)) / 3, abs=1e-12
    )
    with pytest.raises(ValueError, match="on must be"):
        F.lce_boundary(f, y, centres, boundaries, on="cosine")


def test_align_term_against_the_written_formula():
    g = torch.Generator().manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    assert F.lce_align(torch.nn.functional.normalize(2.0 * c, dim=1), c).item() == pytest.approx(
        0.0, abs=1e-15
    )
    unit = [
        [w[k, j].item() / math.sqrt(sum(v * v for v in w[k].tolist())) for j in range(4)] for k in range(3)
    ]
    expected = sum((unit[k][j] - c[k, j].item()) ** 2 for k in range(3) for j in range(4)) / 12
    value = F.lce_align(torch.nn.functional.normalize(w, dim=1), c).item()
    assert value == pytest.approx(expected, rel=1e-12)


def test_module_is_arcface_plus_weighted_align_and_boundary():
    x, y, centres, boundaries = two_classes()
    loss = fitted(margin=0.0, align_weight=100.0, boundary_weight=1.0)
    w = loss.arcface.weight.detach()
    g = torch.Generator().manual_seed(3)
    f = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 1, -1, 0, 1])
    unit_w = [w[k] / w[k].norm() for k in range(2)]
    arc, bound, rows = 0.0, 0.0, 0
    for i in range(6):
        if t[i] < 0:
            continue
        cos = [float(f[i] @ unit_w[k] / f[i].norm()) for k in range(2)]
        z = [16.0 * c for c in cos]
        arc += math.log(sum(math.exp(v) for v in z)) - z[int(t[i])]
        bound += max(0.0, boundaries[t[i]].item() - float(f[i] @ centres[t[i]] / f[i].norm()))
        rows += 1
    align = sum(float((unit_w[k] - centres[k]).pow(2).sum()) for k in range(2)) / 4
    expected = arc / rows + 100.0 * align + bound / rows
    assert loss(f, t).item() == pytest.approx(expected, rel=1e-10)
    with torch.no_grad():
        loss.arcface.weight.copy_(3.0 * centres)
    value = loss(f, t) - loss.arcface(f, t)
    assert value.item() == pytest.approx(bound / rows, rel=1e-10)


def test_gradients_reach_the_student_and_the_classifier_not_the_teacher():
    loss = fitted()
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    value = loss.distill({"penultimate": s}, {"penultimate": t}, {"target": torch.tensor([0, 1, 0, 1, -1])})
    value.backward()
    assert t.grad is None and s.grad.abs().sum() > 0 and loss.arcface.weight.grad.abs().sum() > 0
    assert not loss.centres.requires_grad and not loss.boundaries.requires_grad
    with pytest.raises(KeyError, match="target"):
        loss.student_step({"penultimate": s}, {})


def test_gradcheck_of_the_terms():
    x, y, centres, boundaries = two_classes()
    g = torch.Generator().manual_seed(5)
    f = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 1, 0])
    assert torch.autograd.gradcheck(lambda a: F.lce_boundary(a, t, centres, boundaries), (f,))
    assert torch.autograd.gradcheck(
        lambda a: F.lce_align(torch.nn.functional.normalize(a, dim=1), centres), (w,)
    )


# --- transforms -----------------------------------------------------------------------------------


def test_rbt_block_without_paths_is_the_identity():
    x = torch.randn(5, 6, dtype=torch.float64)
    assert torch.equal(RBTBlock(6, 6, num_paths=0).double()(x), x)
    assert torch.equal(rbt_transform(6, 6, blocks=4, paths=0).double()(x), x)


def test_rbt_block_is_residual_with_bottleneck_paths():
    block = RBTBlock(6, 6, num_paths=4).double()
    # Linear in->16, 16->16, 16->out without bias, each followed by batch norm and PReLU.
    per_path = (6 * 16 + 16 * 16 + 16 * 6) + 2 * (16 + 16 + 6) + (16 + 16 + 6)
    assert sum(p.numel() for p in block.parameters()) == 4 * per_path
    bns = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 12 and all(m.eps == 2e-5 and m.momentum == 0.9 for m in bns)
    # A path whose last batch norm outputs zero adds PReLU(0) = 0: the block passes x through.
    for path in block.paths:
        torch.nn.init.zeros_(path[-2].weight)
        torch.nn.init.zeros_(path[-2].bias)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_transforms_map_between_different_widths():
    torch.manual_seed(0)
    loss = L.build("lce", student_dim=3, teacher_dim=2, num_classes=2).double()
    assert len(loss.forward_transform) == 4 and len(loss.backward_transform) == 4
    x, y, _, _ = two_classes()
    loss.fit(x, y)
    w = loss.arcface.normalized_weight()
    c = loss.centres
    expected = 0.5 * (
        (w - loss.forward_transform(c)).pow(2).mean() + (loss.backward_transform(w) - c).pow(2).mean()
    )
    align = F.lce_align(w, c, loss.forward_transform, loss.backward_transform, loss.present)
    assert align.item() == pytest.approx(expected.item(), rel=1e-10)
    f = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss(f, torch.tensor([0, 1, 0, 1])).backward()
    assert f.grad.abs().sum() > 0
    for transform in (loss.forward_transform, loss.backward_transform):
        assert all(p.grad is not None for p in transform.parameters())
    with pytest.raises(ValueError, match="transforms between the two spaces are needed"):
        L.build("lce", student_dim=3, teacher_dim=2, num_classes=2, transform=False)
    # by default they are learned exactly when the widths differ
    assert L.build("lce", student_dim=3, teacher_dim=2, num_classes=2).forward_transform is not None
    assert L.build("lce", student_dim=2, teacher_dim=2, num_classes=2).forward_transform is None


def test_identity_transforms_reduce_to_the_plain_terms():
    plain = fitted()
    with_t = fitted(transform=True, transform_paths=0)
    with torch.no_grad():
        with_t.arcface.weight.copy_(plain.arcface.weight)
    g = torch.Generator().manual_seed(6)
    f = torch.randn(5, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 1, 0, -1])
    torch.testing.assert_close(with_t(f, t), plain(f, t), rtol=1e-12, atol=0)


# --- the method -----------------------------------------------------------------------------------


def test_the_method_config_drives_the_fit_then_the_training():
    method = yaml.safe_load(configs.method_path("lce").read_text())
    assert method["train"]["ce_weight"] == 0.0
    loss = L.build("lce", student_dim=2, teacher_dim=2, num_classes=2, **{
        k: v for k, v in method["losses"]["lce"].items() if k != "weight"
    }).double()  # fmt: skip
    x, y, centres, boundaries = two_classes()
    root = torch.nn.ModuleDict({"loss": torch.nn.ModuleDict({"lce": loss})})
    features = {"old": {"penultimate": x}, "student": {"penultimate": x.clone().requires_grad_()}}
    batch = {"target": y, "index": torch.arange(5)}
    *fitting, last = method["stages"]
    for stage in fitting:
        assert stage["trainable"] == []
        ((term, use),) = stage["terms"].items()
        getattr(root["loss"][term], use["call"])(features[use["network"]], batch)
        for path in stage["after"]:
            module, _, name = path.rpartition(".")
            getattr(root.get_submodule(module), name)()
    torch.testing.assert_close(loss.centres, centres, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.boundaries, boundaries, rtol=1e-12, atol=1e-12)
    ((term, use),) = last["terms"].items()
    value = getattr(root["loss"][term], use["call"])(features[use["network"]], batch)
    assert value.requires_grad and torch.isfinite(value)


def test_pinned_defaults():
    params = inspect.signature(L.LCELoss).parameters
    # main.py --lambda_a 100 --lambda_b 1; configs/res50_arcface.yaml CLA_S 16, CLA_M 0.1;
    # models/trans.py num_paths=4, width 16; models/__init__.py four blocks per transform; transforms
    # only where the widths differ (configs/default.py USE_TRANS False).
    expected = {
        "align_weight": 100.0,
        "boundary_weight": 1.0,
        "scale": 16.0,
        "margin": 0.1,
        "easy_margin": False,
        "boundary_on": "normalized",
        "transform": None,
        "transform_blocks": 4,
        "transform_paths": 4,
        "transform_width": 16,
    }
    assert {k: params[k].default for k in expected} == expected
    assert inspect.signature(F.lce_boundary).parameters["on"].default == "normalized"
