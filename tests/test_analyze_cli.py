"""``relkd analyze`` on tiny real runs: files, and the numbers recomputed here without relkd.analysis."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from relkd.cli import main
from relkd.config import load_config
from relkd.experiment import run_suite
from relkd.experiment.analyze import analyze_run, initial_networks
from relkd.experiment.probe import VizUsageError
from relkd.experiment.setup import build_model, load_bundle, load_weights
from relkd.train.checkpoint import load_checkpoint

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = [
    "layer_cka", "similarity", "mistakes", "block_shuffle", "interpolation", "interpolation_curves",
    "criticality",
]  # fmt: skip

TINY = {
    "name": "tiny_analyze",
    "data": {"name": "digits", "train_subset": 60, "unlabeled": True, "batch_size": 16,
             "transfer_batch_size": 128},
    "teacher": {"model": "mlp", "args": {"width": 32, "depth": 2},
                "data": {"train_subset": None, "unlabeled": False, "batch_size": 128},
                "train": {"epochs": 3}},
    "student": {"model": "mlp", "args": {"width": 16, "depth": 2}},
    "train": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 0.01}},
    "methods": ["baseline", "kd", "dml"],
    "seeds": [0, 1],
    "probe_size": 32,
    "tensorboard": False,
    "threads": 1,
}  # fmt: skip

# A learning rate of 0: the final weights are the initial ones.
FROZEN = {
    **TINY,
    "name": "tiny_frozen",
    "teacher": None,
    "train": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.0, "weight_decay": 0.0}},
    "methods": ["baseline", "dml"],
    "seeds": [3],
}


def quietly(fn, *args, **kwargs):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = fn(*args, **kwargs)
    return result, out.getvalue(), err.getvalue()


def _run(tmp_path_factory, config: dict, name: str) -> Path:
    out = tmp_path_factory.mktemp(name) / "run"
    loaded, _ = load_config({**config, "out": str(out)})
    run_suite(loaded, quiet=True, echo=lambda _: None)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _run(tmp_path_factory, TINY, "analyze_run")


@pytest.fixture(scope="module")
def analysed(run_dir) -> tuple[int, str, dict]:
    status, printed, _ = quietly(main, ["analyze", str(run_dir), "--export", "--dpi", "40"])
    return status, printed, json.loads((run_dir / "analysis" / "analysis.json").read_text())


# --- references written here ------------------------------------------------------------------------


class Nets:
    """The run's networks and data, loaded with the engine's public loaders and run by hand."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.config, _ = load_config(run_dir / "config.yaml")
        self.bundle = load_bundle(self.config.data, 0)
        test = self.bundle.test
        self.x = torch.stack([test[i]["input"] for i in range(len(test))])
        self.y = torch.stack([test[i]["target"] for i in range(len(test))])

    def student(self, method: str, seed: int = 0, name: str = "student") -> torch.nn.Module:
        spec = self.config.methods[method].students[name]
        model = build_model(spec, self.bundle)
        load_weights(str(self.run_dir / method / f"seed{seed}" / "final.pt"), model, name)
        return model.eval()

    def teacher(self) -> torch.nn.Module:
        spec = self.config.teachers["teacher"]
        model = build_model(spec, load_bundle(spec.data, 0))
        load_weights(str(self.run_dir / "teacher" / "final.pt"), model, "teacher")
        return model.eval()

    def result(self, method: str, seed: int, name: str = "student") -> float:
        record = json.loads((self.run_dir / method / f"seed{seed}" / "result.json").read_text())
        return record["networks"][name]["last_acc1"] if "networks" in record else record["last_acc1"]


def penultimate(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """The input of ``fc`` (a hook written here) and the logits."""
    seen = []
    hook = model.fc.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    return seen[0].double().numpy(), logits


def unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), Eq. 5."""
    n = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    t = (
        np.trace(k @ l)
        + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ k @ l @ one)
    )
    return float(t) / (n * (n - 3))


# --- tests ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_analyze_writes_the_json_every_figure_and_the_csv_files(run_dir, analysed):
    status, printed, record = analysed
    assert status == 0
    out = run_dir / "analysis"
    paths = [Path(p) for p in printed.split()]
    for name in FIGURES:
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == PNG_MAGIC
    assert out / "analysis.json" == paths[-1]
    assert {p.name for p in paths if p.parent.name == "csv"} >= {
        "layer_cka_kd.csv", "similarity.csv", "mistakes.csv", "block_shuffle.csv", "interpolation.csv",
        "criticality.csv",
    }  # fmt: skip
    assert list(record["networks"]) == ["baseline", "kd", "dml (peer1)", "dml (peer2)"]
    rows = (out / "csv" / "layer_cka_kd.csv").read_text().splitlines()
    assert rows[0] == "teacher \\ network,stage1,stage2,penultimate,logits"
    assert len(rows) == 5


@pytest.mark.slow
def test_predictions_agreement_and_mistakes_recomputed(run_dir, analysed):
    _, _, record = analysed
    nets = Nets(run_dir)
    with torch.no_grad():
        t = nets.teacher()(nets.x)
        for method in ("baseline", "kd"):
            s = nets.student(method)(nets.x)
            row = record["networks"][method]
            pt, ps = t.argmax(1), s.argmax(1)
            assert row["top1_agreement"] == pytest.approx(float((pt == ps).double().mean()))
            top5 = s.topk(5, 1).indices
            assert row["top5_agreement"] == pytest.approx(float((top5 == pt[:, None]).any(1).double().mean()))
            assert row["test_error"] == pytest.approx(1 - nets.result(method, 0) / 100, abs=1e-9)
            p, q = torch.softmax(t.double(), 1).numpy(), torch.softmax(s.double(), 1).numpy()
            assert row["kl_from_teacher"] == pytest.approx(
                float(np.mean((p * np.log(p / q)).sum(1))), rel=1e-6
            )
            right_s, right_t = ps == nets.y, pt == nets.y
            wrong = ~right_s & ~right_t
            assert row["mistakes"] == {
                "both_correct": int((right_s & right_t).sum()),
                "only_a_correct": int((right_s & ~right_t).sum()),
                "only_b_correct": int((~right_s & right_t).sum()),
                "same_mistake": int((wrong & (ps == pt)).sum()),
                "different_mistake": int((wrong & (ps != pt)).sum()),
                "common_mistakes": int(wrong.sum()),
                "total": len(nets.y),
            }
    teacher_acc1 = json.loads((run_dir / "teacher" / "result.json").read_text())["last_acc1"]
    assert record["teacher_test_error"] == pytest.approx(1 - teacher_acc1 / 100, abs=1e-9)


@pytest.mark.slow
def test_layer_cka_and_rsa_recomputed(run_dir, analysed):
    _, _, record = analysed
    nets = Nets(run_dir)
    teacher, student = nets.teacher(), nets.student("kd")
    et, _ = penultimate(teacher, nets.x)
    es, _ = penultimate(student, nets.x)
    cka = record["networks"]["kd"]["layer_cka"]
    assert cka["taps_a"] == cka["taps_b"] == ["stage1", "stage2", "penultimate", "logits"]
    # Minibatch CKA over the test loader's batches (test_batch_size 256): mean unbiased HSICs.
    size = nets.config.data.test_batch_size
    sums = np.zeros(3)
    for lo in range(0, len(et), size):
        k, l = et[lo : lo + size] @ et[lo : lo + size].T, es[lo : lo + size] @ es[lo : lo + size].T
        sums += [unbiased_hsic(k, l), unbiased_hsic(k, k), unbiased_hsic(l, l)]
    assert cka["batches"] == math.ceil(len(et) / size) and cka["instances"] == len(et)
    assert cka["matrix"][2][2] == pytest.approx(sums[0] / math.sqrt(sums[1] * sums[2]), rel=1e-4)
    # RSA on every test image (the probe holds them all): row cosines of the two cosine matrices.
    ut, us = et / np.linalg.norm(et, axis=1, keepdims=True), es / np.linalg.norm(es, axis=1, keepdims=True)
    st, ss = ut @ ut.T, us @ us.T
    rows = (st * ss).sum(1) / (np.linalg.norm(st, axis=1) * np.linalg.norm(ss, axis=1))
    assert record["networks"]["kd"]["rsa"] == pytest.approx(float(rows.mean()), rel=1e-5)


@pytest.mark.slow
def test_block_shuffle_recomputed(run_dir, analysed):
    _, _, record = analysed
    nets = Nets(run_dir)
    curve = record["networks"]["baseline"]["block_shuffle"]
    assert list(curve) == ["1", "2", "4", "8"]
    assert curve["8"] == pytest.approx(nets.result("baseline", 0) / 100, abs=1e-9)
    # k = 4: four blocks; output block j is input block perm[j], blocks numbered row by row.
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    corners = [(0, 0), (0, 4), (4, 0), (4, 4)]
    shuffled = torch.empty_like(nets.x)
    for j, src in enumerate(perm):
        (r, c), (sr, sc) = corners[j], corners[src]
        shuffled[..., r : r + 4, c : c + 4] = nets.x[..., sr : sr + 4, sc : sc + 4]
    with torch.no_grad():
        acc = float((nets.student("baseline")(shuffled).argmax(1) == nets.y).double().mean())
    assert curve["4"] == pytest.approx(acc)


@pytest.mark.slow
def test_interpolation_ends_are_the_networks_the_run_reported(run_dir, analysed):
    _, _, record = analysed
    nets = Nets(run_dir)
    pairs = record["interpolation"]
    assert set(pairs) == {
        "baseline: seed 0 → 1", "kd: seed 0 → 1", "dml (peer1): seed 0 → 1", "dml (peer2): seed 0 → 1",
        "dml: peer1 → peer2",
    }  # fmt: skip
    kd = pairs["kd: seed 0 → 1"]
    assert kd["lambdas"] == pytest.approx([i / 10 for i in range(11)])
    assert kd["error"][0] == pytest.approx(1 - nets.result("kd", 0) / 100, abs=1e-9)
    assert kd["error"][-1] == pytest.approx(1 - nets.result("kd", 1) / 100, abs=1e-9)
    assert kd["bn"] == "none"
    peers = pairs["dml: peer1 → peer2"]
    assert peers["error"][0] == pytest.approx(1 - nets.result("dml", 0, "peer1") / 100, abs=1e-9)
    assert peers["error"][-1] == pytest.approx(1 - nets.result("dml", 0, "peer2") / 100, abs=1e-9)
    a, b = nets.student("dml", 0, "peer1"), nets.student("dml", 0, "peer2")
    sq = sum(
        float((pa - pb).detach().double().pow(2).sum())
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
    )
    assert peers["distance"]["total"] == pytest.approx(math.sqrt(sq), rel=1e-9)


@pytest.mark.slow
def test_criticality_at_alpha_one_is_the_training_error(run_dir, analysed):
    _, _, record = analysed
    nets = Nets(run_dir)
    train = nets.bundle.train
    x = torch.stack([train[i]["input"] for i in range(len(train))])
    y = torch.stack([train[i]["target"] for i in range(len(train))])
    with torch.no_grad():
        error = float((nets.student("kd")(x).argmax(1) != y).double().mean())
    row = record["networks"]["kd"]
    assert row["train_error"] == pytest.approx(error)
    assert list(row["criticality"]) == ["layers", "fc"]
    for c in row["criticality"].values():
        assert c["alphas"][-1] == 1.0 and c["sigmas"][0] == 0.0
        assert c["error"][-1][0] == pytest.approx(error)
        assert c["eps"] == pytest.approx(min(1.0, error + 0.05))


@pytest.fixture(scope="module")
def frozen_dir(tmp_path_factory) -> Path:
    return _run(tmp_path_factory, FROZEN, "frozen_run")


@pytest.mark.slow
def test_initial_networks_are_the_weights_a_run_starts_from(frozen_dir):
    config, _ = load_config(frozen_dir / "config.yaml")
    for method, names in (("baseline", ["student"]), ("dml", ["peer1", "peer2"])):
        init = initial_networks(config, method, 3)
        assert list(init) == names
        saved = load_checkpoint(frozen_dir / method / "seed3" / "final.pt")["students"]
        for name in names:
            for key, value in init[name].state_dict().items():
                assert torch.equal(value, saved[name][key]), (method, name, key)
    rng = torch.get_rng_state()
    initial_networks(config, "baseline", 3)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.slow
def test_a_run_without_teacher_gets_the_weight_analyses(frozen_dir, tmp_path):
    paths, _, notes = quietly(analyze_run, frozen_dir, out=tmp_path / "a", lambdas=3)
    assert [p.name for p in paths] == [
        "block_shuffle.png", "interpolation.png", "interpolation_curves.png", "criticality.png",
        "analysis.json",
    ]  # fmt: skip
    assert "no teacher" in notes
    record = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert list(record["interpolation"]) == ["dml: peer1 → peer2"]  # one seed: peers only
    for row in record["networks"].values():
        # the networks never left their initial weights
        assert row["distance_from_init"]["total"] == 0.0


@pytest.mark.slow
def test_only_and_errors(run_dir, tmp_path):
    status, printed, _ = quietly(
        main, ["analyze", str(run_dir), "--only", "rsa", "--out", str(tmp_path / "o")]
    )
    assert status == 0
    assert [Path(p).name for p in printed.split()] == ["similarity.png", "analysis.json"]
    status, _, err = quietly(main, ["analyze", str(run_dir), "--only", "cka", "barrier"])
    assert status == 2 and "unknown analysis 'barrier'" in err
    status, _, err = quietly(main, ["analyze", str(run_dir), "--method", "rdk"])
    assert status == 2 and "'rdk' is not a method of this run" in err
    status, _, err = quietly(main, ["analyze", str(run_dir), "--seed", "7"])
    assert status == 2 and "seeds are [0, 1]" in err
    status, _, err = quietly(main, ["analyze", str(tmp_path / "absent")])
    assert status == 1 and "no run directory" in err
    with pytest.raises(VizUsageError, match="--eps is an error margin"):
        analyze_run(run_dir, eps=2.0)
