"""``relkd viz`` and ``relkd plot`` on a tiny real run: files, numbers, exports, options, errors."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path

import networkx as nx
import pytest
import torch

from relkd.cli import COMMANDS, main
from relkd.cli import _parser as relkd_parser
from relkd.config import load_config
from relkd.experiment import run_suite
from relkd.experiment.plot import plot_run, read_histories
from relkd.experiment.probe import VizUsageError, probe_batch
from relkd.experiment.setup import build_model, load_bundle, load_weights
from relkd.experiment.viz import viz_run
from relkd.graphs.agreement import agreement

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BATCH, K = 40, 4

TINY = {
    "name": "tiny_viz",
    "data": {"name": "digits", "train_subset": 30, "unlabeled": True, "batch_size": 16,
             "transfer_batch_size": 128},
    "teacher": {"model": "mlp", "args": {"width": 32, "depth": 1},
                "data": {"train_subset": None, "unlabeled": False, "batch_size": 128}},
    "student": {"model": "mlp", "args": {"width": 16, "depth": 1}},
    "train": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 0.003}},
    "methods": ["baseline", "kd"],
    "seeds": [0, 1],
    "probe_size": 32,
    "tensorboard": False,
    "threads": 1,
}  # fmt: skip


def quietly(fn, *args, **kwargs):
    """``fn``'s result and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fn(*args, **kwargs)
    return result, out.getvalue()


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, f"{path}: {len(data)} bytes"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("viz_run") / "run"
    config, _ = load_config({**TINY, "out": str(out)})
    run_suite(config, quiet=True, echo=lambda _: None)
    return out


@pytest.fixture(scope="module")
def drawn(run_dir) -> tuple[list[Path], str]:
    return quietly(
        viz_run, run_dir, batch_size=BATCH, k=K, relations=("normalized_distance",),
        export=("graphml", "gexf", "pyg", "npz"),
    )  # fmt: skip


def reference_embeddings(run_dir: Path, network: str, test_index: list[int]):
    """Penultimate embedding (input of ``fc``, taken with a hook written here), logits and labels."""
    config, _ = load_config(run_dir / "config.yaml")
    bundle = load_bundle(config.data, 0)
    if network == "teacher":
        model = build_model(config.teacher, load_bundle(config.teacher.data, 0))
        load_weights(str(run_dir / "teacher" / "final.pt"), model, "teacher")
    else:
        model = build_model(config.student, bundle)
        load_weights(str(run_dir / network / "seed0" / "final.pt"), model, "student")
    items = [bundle.test[i] for i in test_index]
    x = torch.stack([item["input"] for item in items])
    seen = []
    hook = model.fc.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        logits = model.eval()(x)
    hook.remove()
    return seen[0], logits, torch.stack([item["target"] for item in items])


# --- relkd viz RUN_DIR -----------------------------------------------------------------------------


@pytest.mark.slow
def test_viz_writes_every_figure_and_prints_the_paths(run_dir, drawn):
    paths, printed = drawn
    assert printed.split() == [str(p) for p in paths]
    viz = run_dir / "viz"
    figures = ["relations_baseline_normalized_distance", "knn_baseline", "relations_kd_normalized_distance",
               "knn_kd", "agreement"]  # fmt: skip
    graphs = [
        f"graphs/{n}.{s}" for n in ("teacher", "baseline", "kd") for s in ("graphml", "gexf", "pt", "npz")
    ]
    assert paths == [viz / f"{f}.png" for f in figures] + [viz / "agreement.json"] + [viz / g for g in graphs]
    for path in paths[:5]:
        assert_png(path)


@pytest.mark.slow
def test_agreement_json_equals_the_metrics_recomputed_on_the_same_batch(run_dir, drawn):
    record = json.loads((run_dir / "viz" / "agreement.json").read_text())
    assert (record["k"], record["seed"], record["relation"]) == (K, 0, "cosine")
    index = record["test_index"]
    assert len(index) == BATCH == len(set(index))
    t_emb, t_logits, labels = reference_embeddings(run_dir, "teacher", index)
    # class-balanced: 40 images of 10 classes are 4 of each
    assert torch.bincount(labels, minlength=10).tolist() == [4] * 10
    top1 = (t_logits.argmax(1) == labels).double().mean().item() * 100
    assert record["probe_acc1"]["teacher"] == pytest.approx(top1)
    assert list(record["metrics"]) == ["baseline", "kd"]
    for method in ("baseline", "kd"):
        s_emb, _, _ = reference_embeddings(run_dir, method, index)
        expected = agreement(s_emb, t_emb, K)
        assert record["metrics"][method] == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_the_batch_is_fixed_by_the_seed(run_dir):
    config, _ = load_config(run_dir / "config.yaml")
    bundle = load_bundle(config.data, 0)
    a, b, c = (probe_batch(bundle, BATCH, seed) for seed in (0, 0, 1))
    assert torch.equal(a.index, b.index) and torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.index, c.index)
    assert torch.equal(a.labels, bundle.test.targets[a.index])


@pytest.mark.slow
def test_exported_graphs_carry_labels_and_test_indices(run_dir, drawn):
    record = json.loads((run_dir / "viz" / "agreement.json").read_text())
    _, _, labels = reference_embeddings(run_dir, "teacher", record["test_index"])
    g = nx.read_graphml(run_dir / "viz" / "graphs" / "kd.graphml", node_type=int)
    assert g.is_directed() and sorted(g.nodes) == list(range(BATCH))
    assert g.number_of_edges() == BATCH * K
    assert [g.nodes[i]["label"] for i in range(BATCH)] == labels.tolist()
    assert [g.nodes[i]["index"] for i in range(BATCH)] == record["test_index"]
    assert all(-1.0 - 1e-6 <= w <= 1.0 + 1e-6 for _, _, w in g.edges(data="cosine"))
    gexf = nx.read_gexf(run_dir / "viz" / "graphs" / "teacher.gexf", node_type=int)
    assert gexf.number_of_nodes() == BATCH and gexf.number_of_edges() == BATCH * K


@pytest.mark.slow
def test_viz_errors_name_what_is_missing_and_the_command(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directory .*relkd run"):
        viz_run(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.yaml is missing.*relkd run"):
        viz_run(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run_dir / "config.yaml", partial / "config.yaml")
    with pytest.raises(FileNotFoundError, match=r"no finished student: .*baseline/seed0/final.pt.*relkd run"):
        viz_run(partial)
    shutil.copytree(run_dir / "kd", partial / "kd")
    with pytest.raises(FileNotFoundError, match=r"teacher checkpoint .*teacher/final.pt is missing"):
        viz_run(partial)
    with pytest.raises(FileNotFoundError, match=r"baseline/seed0/final.pt is missing"):
        viz_run(partial, method="baseline")
    with pytest.raises(
        VizUsageError, match=r"'rdk' is not a method of this run; it has \['baseline', 'kd'\]"
    ):
        viz_run(run_dir, method="rdk")
    with pytest.raises(VizUsageError, match=r"seeds are \[0, 1\]"):
        viz_run(run_dir, seed=5)
    with pytest.raises(VizUsageError, match="Did you mean 'cosine'"):
        viz_run(run_dir, relations=("cosin",))
    with pytest.raises(VizUsageError, match="--batch-size must be between the number of classes"):
        quietly(viz_run, run_dir, batch_size=5, k=2)


@pytest.mark.slow
def test_viz_from_checkpoints_alone_matches_the_run_directory(run_dir, drawn, tmp_path, capsys):
    args = relkd_parser().parse_args([
        "viz", "--teacher", str(run_dir / "teacher" / "final.pt"),
        "--student", str(run_dir / "kd" / "seed0" / "final.pt"), "--dataset", "digits",
        "--teacher-args", "{width: 32, depth: 1}", "--student-args", "{width: 16, depth: 1}",
        "--batch-size", str(BATCH), "-k", str(K), "--relation", "cosine", "--out", str(tmp_path / "v"),
    ])  # fmt: skip
    assert COMMANDS[args.command][2](args) == 0
    written = capsys.readouterr().out.split()
    assert written[0] == str(tmp_path / "v" / "relations_kd_cosine.png")
    alone = json.loads((tmp_path / "v" / "agreement.json").read_text())
    record = json.loads((run_dir / "viz" / "agreement.json").read_text())
    assert alone["test_index"] == record["test_index"]
    assert alone["metrics"]["kd"] == pytest.approx(record["metrics"]["kd"], abs=1e-12)

    # the widths are not in final.pt: without them the weights do not fit, and the error says so
    teacher, student = str(run_dir / "teacher" / "final.pt"), str(run_dir / "kd" / "seed0" / "final.pt")
    capsys.readouterr()
    assert main(["viz", "--teacher", teacher, "--student", student, "--dataset", "digits"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("relkd: error: ") and "--teacher-args" in err
    # a plain state dict records no model name
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(run_dir / "teacher" / "final.pt", weights_only=True)["students"]["teacher"], plain)
    assert main(["viz", "--teacher", str(plain), "--student", f"kd={plain}", "--dataset", "digits"]) == 2
    assert "does not record its model: pass --teacher-model" in capsys.readouterr().err


# --- relkd plot RUN_DIR ----------------------------------------------------------------------------


@pytest.mark.slow
def test_plot_reads_every_seed_and_writes_both_figures(run_dir):
    histories = read_histories(run_dir)
    assert list(histories) == ["teacher", "baseline", "kd"]
    assert [len(seeds) for seeds in histories.values()] == [1, 2, 2]
    assert [row["epoch"] for row in histories["kd"][1]] == [1, 2]
    paths, printed = quietly(plot_run, run_dir)
    assert paths == [run_dir / "plots" / "training_curves.png", run_dir / "plots" / "agreement_curves.png"]
    assert printed.split() == [str(p) for p in paths]
    for path in paths:
        assert_png(path)


def write_metrics(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_plot_without_agreement_keys_writes_only_the_training_curves(tmp_path):
    for seed in (1, 0, 10):
        rows = [{"epoch": e, "test_acc1": 10.0 * e + seed, "loss/ce": 1.0 / e, "lr": 0.1} for e in (1, 2, 3)]
        write_metrics(tmp_path / "kd" / f"seed{seed}" / "metrics.jsonl", rows)
    write_metrics(tmp_path / "teacher" / "metrics.jsonl", [{"epoch": 1, "test_acc1": 90.0}])
    histories = read_histories(tmp_path)
    assert list(histories) == ["teacher", "kd"]
    # seeds in numeric order: 0, 1, 10
    assert [rows[0]["test_acc1"] for rows in histories["kd"]] == [10.0, 11.0, 20.0]
    paths, _ = quietly(plot_run, tmp_path, formats=("png", "svg"), band="std")
    assert paths == [tmp_path / "plots" / "training_curves.png", tmp_path / "plots" / "training_curves.svg"]
    assert_png(paths[0])
    assert paths[1].read_text().lstrip().startswith("<?xml")


def test_plot_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directory .*relkd run"):
        plot_run(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="holds no metrics.jsonl.*relkd run"):
        plot_run(tmp_path)


# --- argument handling -----------------------------------------------------------------------------


@pytest.fixture
def parser() -> argparse.ArgumentParser:
    return relkd_parser()


def test_viz_options_parse_with_defaults(parser):
    args = parser.parse_args(["viz", "runs/x"])
    assert (args.run_dir, args.method, args.seed, args.batch_size, args.k) == ("runs/x", None, 0, 128, 5)
    assert (args.formats, args.export, args.relations, args.device) == (
        ["png"], [], ["cosine", "normalized_distance"], "cpu")  # fmt: skip
    args = parser.parse_args([
        "viz", "r", "--method", "kd", "rkd", "--format", "png", "pdf", "--export", "graphml", "npz",
        "-k", "3", "--relation", "kernel:rbf", "--seed", "2",
    ])  # fmt: skip
    assert (args.method, args.formats, args.export, args.k, args.relations, args.seed) == (
        ["kd", "rkd"], ["png", "pdf"], ["graphml", "npz"], 3, ["kernel:rbf"], 2)  # fmt: skip
    args = parser.parse_args(["viz", "--teacher", "t.pt", "--student", "a=s.pt", "--student", "b.pt",
                              "--dataset", "digits", "--student-args", "{width: 8}"])  # fmt: skip
    assert (args.run_dir, args.student, args.student_args) == (None, ["a=s.pt", "b.pt"], {"width": 8})


@pytest.mark.parametrize(
    "argv",
    [["viz", "r", "--format", "jpg"], ["viz", "r", "--export", "csv"], ["viz", "--student-args", "[1, 2]"],
     ["plot", "r", "--band", "iqr"], ["plot"]],
)  # fmt: skip
def test_bad_options_are_usage_errors(parser, argv):
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(argv)
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["viz"], "give a RUN_DIR, or --teacher, --student, --dataset (missing --teacher, --student"),
     (["viz", "r", "--teacher", "t.pt"], "not both (got RUN_DIR and --teacher)"),
     (["viz", "--teacher", "t.pt", "--dataset", "digits"], "(missing --student)"),
     (["viz", "r", "-k", "0"], "-k must be between 1 and the batch size - 1 (127), got 0")],
)  # fmt: skip
def test_options_that_do_not_fit_print_one_line_and_return_2(argv, message, capsys):
    from relkd.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("relkd viz: error: ") and message in err and err.count("\n") == 1


def test_plot_command_runs_through_func(parser, tmp_path, capsys):
    rows = [{"epoch": 1, "test_acc1": 50.0, "knn_overlap": 0.2}, {"epoch": 2, "test_acc1": 60.0}]
    write_metrics(tmp_path / "baseline" / "seed0" / "metrics.jsonl", rows)
    args = parser.parse_args(["plot", str(tmp_path), "--format", "svg"])
    assert COMMANDS[args.command][2](args) == 0
    plots = tmp_path / "plots"
    expected = [plots / "training_curves.svg", plots / "agreement_curves.svg"]
    assert capsys.readouterr().out.split() == [str(p) for p in expected]
    assert all(p.stat().st_size > 1000 for p in (tmp_path / "plots").iterdir())
