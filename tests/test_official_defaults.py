"""Every built-in relational method runs the official CIFAR-100 recipe by default.

Each value is pinned against the code that produced the published numbers, named in a comment:
RepDistiller is github.com/HobbitLong/RepDistiller (the CRD benchmark, ``scripts/run_cifar_distill.sh``
and ``train_student.py``; ``-r`` is the cross-entropy weight, ``-a`` the KD weight, ``-b`` the method's);
KD_methods_with_TF is github.com/sseung0703/KD_methods_with_TF (the KD-SVD and MHGD authors' CIFAR-100
code); HKD is github.com/wyc-ruiker/HKD. Methods are loaded as a user gets them (``relkd run
"methods=[NAME]"``), without the default experiment's ``loss_args`` (its per-dataset changes).
"""

from __future__ import annotations

import inspect

import pytest
import torch

import relkd.losses as L
from relkd import models
from relkd.config import load_config
from relkd.memory import NegativeSampler
from relkd.models import FeatureTaps, resolve_taps


def method(name: str):
    config, _ = load_config(None, [f"methods=[{name}]", "loss_args={}"])
    return config.methods[name]


def defaults(cls: type) -> dict[str, object]:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


# ---------------------------------------------------------------------------------------------- KD
def test_kd():
    m = method("kd")
    # RepDistiller: --distill kd -r 0.1 -a 0.9 -b 0, --kd_T 4 (train_student.py default)
    assert m.losses == {"kd": {"weight": 0.9, "T": 4.0}}
    assert m.train.ce_weight == 0.1
    # RepDistiller distiller_zoo/KD.py DistillKL: T^2 KL summed over classes, divided by the batch size
    assert defaults(L.KDLoss)["T"] == 4.0 and defaults(L.KDLoss)["reduction"] == "mean"


# --------------------------------------------------------------------------------------------- RKD
def test_rkd_is_the_benchmark_setting():
    m = method("rkd")
    # RepDistiller: --distill rkd -a 0 -b 1 with distiller_zoo/RKD.py RKDLoss(w_d=25, w_a=50) on feat[-1]
    assert m.losses == {"rkd": {"weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0}}
    assert m.train.ce_weight == 1.0
    assert defaults(L.RKDLoss)["distance_weight"] == 25.0 and defaults(L.RKDLoss)["angle_weight"] == 50.0
    assert L.RKDLoss.taps == ("penultimate",)


def test_rkd_metric_is_the_papers_metric_learning_setting():
    # lenscloth/RKD examples/*.sh: --dist_ratio 1 --angle_ratio 2 (the paper's Sec. 4.1)
    assert method("rkd_metric").losses == {
        "rkd": {"weight": 1.0, "distance_weight": 1.0, "angle_weight": 2.0}
    }


# --------------------------------------------------------------------------------------------- HKD
def test_hkd_is_hkd_plus_kd():
    m = method("hkd")
    # HKD README / run.sh: --distill hkd -a 1 -b 3 --mode hkd, with --kd_T 4 and -r 1 (defaults)
    assert m.losses == {"hkd": {"weight": 3.0}, "kd": {"weight": 1.0, "T": 4.0}}
    assert m.train.ce_weight == 1.0


def test_hkd_loss_defaults():
    d = defaults(L.HKDLoss)
    # HKD distiller_zoo/GNN.py: 128-d (--feat_dim), knn = 8, --nce_k 16384, tau 0.07 and momentum 0.9
    # hard-coded, positives smoothed 0.75 / 0.25, negatives scored against the anchor's own bank
    assert d["feat_dim"] == 128 and d["k"] == 8 and d["num_negatives"] == 16384
    assert d["temperature"] == 0.07 and d["momentum"] == 0.9 and d["smooth"] == 0.75
    assert d["negatives_from"] == "own"
    # HKD dataset/cifar100.py (mode 'hkd'): K negatives of other classes, replace=False
    loss = L.HKDLoss(4, 4, torch.arange(40) % 4, num_negatives=7)
    assert loss.sampler.by_class and not loss.sampler.replacement


# ---------------------------------------------------------------------------------------------- SP
def test_sp_reads_the_last_map_before_pooling():
    m = method("sp")
    # RepDistiller: --distill similarity -a 0 -b 3000, helper/loops.py feeds [feat_s[-2]], [feat_t[-2]]
    assert m.losses == {"sp": {"weight": 3000.0, "taps": ["feature_map"]}}
    assert L.SPLoss.taps == ("feature_map",)
    # feat[-2] of RepDistiller's resnet32x4 / resnet8x4 on 32x32 inputs: [B, 256, 8, 8]
    for name in ("resnet32x4", "resnet8x4"):
        net = models.create(name).eval()
        with FeatureTaps(net, resolve_taps(net, ["feature_map"])) as taps, torch.no_grad():
            net(torch.randn(2, 3, 32, 32))
            assert taps["feature_map"].shape == (2, 256, 8, 8)


# ---------------------------------------------------------------------------------------------- CC
def test_cc_kernel_keeps_the_papers_kernel_at_the_benchmarks_gradient_scale():
    m = method("cc")
    # Peng et al. (ICCV 2019): Gaussian RBF, Taylor order 2, gamma 0.4. The weight is the one
    # benchmarks/cc_calibration.py measures: the kernel's gradient at the chain's scale (0.02 below).
    assert m.losses == {"cc": {"weight": 24.0, "gamma": 0.4, "order": 2}}
    assert defaults(L.CCLoss)["gamma"] == 0.4 and defaults(L.CCLoss)["order"] == 2


def test_cc_chain_is_repdistillers_cc():
    m = method("cc_chain")
    # RepDistiller: --distill correlation -a 0 -b 0.02, LinearEmbed(feat[-1] width, --feat_dim 128)
    assert m.losses == {"cc_chain": {"weight": 0.02, "feat_dim": 128}}
    assert defaults(L.CCChainLoss)["feat_dim"] == 128 and defaults(L.CCChainLoss)["reduction"] == "mean"
    loss = L.CCChainLoss(6, 9)
    # models/util.py LinearEmbed: a linear layer and no normalisation; both embeddings are trained
    assert type(loss.embed_s) is torch.nn.Linear and type(loss.embed_t) is torch.nn.Linear
    assert all(p.requires_grad for p in loss.parameters()) and len(list(loss.parameters())) == 4


# --------------------------------------------------------------------------------------------- CRD
def test_crd():
    m = method("crd")
    # RepDistiller: --distill crd -a 0 -b 0.8 (CRD+KD would be -a 1)
    assert m.losses == {"crd": {"weight": 0.8, "negatives": "other_classes"}}
    assert m.train.ce_weight == 1.0
    d = defaults(L.CRDLoss)
    # RepDistiller train_student.py: --feat_dim 128, --nce_k 16384, --nce_t 0.07, --nce_m 0.5, --mode exact;
    # dataset/cifar100.py CIFAR100InstanceSample: negatives of other classes, replace=False
    assert d["feat_dim"] == 128 and d["num_negatives"] == 16384
    assert d["temperature"] == 0.07 and d["momentum"] == 0.5 and d["bank"] == "full"
    # with the labels, as the engine builds it: other classes, without replacement
    loss = L.CRDLoss(4, 4, 30, targets=torch.arange(30) % 3)
    assert loss.negatives == "other_classes" and isinstance(loss.sampler, NegativeSampler)
    assert loss.sampler.by_class and not loss.sampler.replacement


# -------------------------------------------------------------------------------------------- MHGD
def test_mhgd_recipe():
    m = method("mhgd")
    # KD_methods_with_TF nets/Relation.py: num_head = 8; op_util.py: mha_loss += 5e-4 * sum(v^2)
    assert m.losses == {"mhgd": {"weight": 1.0, "num_heads": 8, "head_decay": 5.0e-4}}
    heads, distill = m.stages
    # train_w_distill.py: init_epoch = 40 for MHGD; Learning_rate 1e-1, MomentumOptimizer(LR, 0.9,
    # use_nesterov=True), constant before the first decay at init_epoch + 30; only the MHA variables
    assert heads.epochs == 40
    assert heads.optimizer == {
        "name": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 0.0,
    }
    assert heads.schedule == {"name": "constant"} and heads.ce_weight == 0.0
    assert heads.trainable == ["loss.mhgd.heads"] and heads.after == ["loss.mhgd.freeze_heads"]
    assert heads.terms == {"mhgd": {"call": "pretrain_step", "network": "teacher"}}
    assert distill.terms is None
    # op_util.py Optimizer_w_MHGD: clip_by_norm(g_dist, |g_ce| * sigmoid(epoch - init_epoch))
    assert m.train.clip_to_ce is True and m.train.clip_to_ce_ramp == "sigmoid"
    d = defaults(L.MHGDLoss)
    # nets/Relation.py: SVD_eid(tfm, 1) for the teacher, SVD_eid(sfm, 4) for the student, summed KL
    assert d["num_heads"] == 8 and d["candidates"] == 4 and d["reduction"] == "sum"
    assert d["head_decay"] == 5e-4


# ------------------------------------------------------------------------------------------ KD-SVD
def test_kd_svd_recipe():
    m = method("kd_svd")
    # KD_methods_with_TF nets/Shared.py KD_SVD: K = 1, SVD(sfm, K + 3), RBF /8, plain sum; total loss
    # class + reg + distillation (weight 1)
    assert m.losses == {"kd_svd": {"weight": 1.0, "k": 1, "sigma": 8.0, "extra_candidates": 3}}
    # op_util.py Optimizer_w_Distillation ('KD-' methods): clip_by_norm(g_dist, |g_ce| * sigmoid(epoch))
    assert m.train.clip_to_ce is True and m.train.clip_to_ce_ramp == "sigmoid"
    d = defaults(L.KDSVDLoss)
    assert d["k"] == 1 and d["sigma"] == 8.0 and d["extra_candidates"] == 3 and d["reduction"] == "sum"
    # nets/ResNet.py: the 'feat' collection, the last block of each of the three stages
    assert L.KDSVDLoss.taps == ("stage1", "stage2", "stage3")


# --------------------------------------------------------------------------------------------- PKT
def test_pkt():
    m = method("pkt")
    # RepDistiller: --distill pkt -a 0 -b 30000 on feat[-1]; distiller_zoo/PKT.py eps = 1e-7
    assert m.losses == {"pkt": {"weight": 30000.0}}
    assert m.train.ce_weight == 1.0
    assert defaults(L.PKTLoss)["eps"] == 1e-7


@pytest.mark.parametrize("name", ["rkd", "rkd_metric", "sp", "cc", "cc_chain", "crd", "pkt"])
def test_single_term_methods_add_no_kd_and_keep_the_cross_entropy(name):
    # RepDistiller: every method but KD runs with -r 1 -a 0 (no KD term)
    m = method(name)
    assert "kd" not in m.losses and m.train.ce_weight == 1.0 and not m.train.clip_to_ce
