"""The ``relkd viz`` and ``relkd plot`` commands: the figures of a finished run, written next to it.

::

    relkd viz RUN_DIR [--method M ...] [--seed 0] [--batch-size 128] [-k 5]
                      [--relation cosine normalized_distance] [--format png svg pdf]
                      [--export graphml gexf pyg npz] [--device cpu] [--out DIR]
    relkd viz --teacher T.pt --student [NAME=]S.pt [--student ...] --dataset NAME
              [--teacher-model M --teacher-args YAML --student-model M --student-args YAML] ...
    relkd plot RUN_DIR [--format png svg pdf] [--band minmax|std]

``viz`` loads the teacher and each method's student (seed ``--seed``), takes one class-balanced,
seeded batch of test images (the same for every method), reads each network's ``penultimate``
embedding and writes into ``RUN_DIR/viz/``:

=====================================  =========================================================
``relations_<method>_<relation>.png``  teacher | student | difference relation matrices
``knn_<method>.png``                   the two kNN graphs on the teacher's PCA positions
``agreement.png``, ``agreement.json``  kNN overlap, linear CKA and distance rank correlation
                                       per method (:func:`relkd.graphs.agreement.agreement`),
                                       the batch's test indices and each network's top-1 on it
``graphs/<network>.<suffix>``          with ``--export``: each network's kNN relation graph
                                       (node labels and test indices, cosine edge values)
=====================================  =========================================================

``plot`` reads every ``metrics.jsonl`` of the run (teacher and ``<method>/seed<k>``) and writes
``RUN_DIR/plots/training_curves.png`` (accuracy, total loss and each loss term per epoch, mean over
seeds with a band) and, when the run logged them, ``RUN_DIR/plots/agreement_curves.png`` (the
agreement metrics per epoch, one line per method).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn

from relkd.graphs import RelationGraph
from relkd.graphs.agreement import AGREEMENT_KEYS, agreement
from relkd.graphs.export import EXPORTERS, export_graph
from relkd.viz._common import METRIC_NAMES
from relkd.viz.agreement import agreement_bars
from relkd.viz.curves import BANDS, numeric_keys, training_curves
from relkd.viz.matrices import relation_matrices
from relkd.viz.network import knn_graphs
from relkd.viz.save import FORMATS, save_figure

# The engine (relkd.config, relkd.train, relkd.models) is imported inside the functions: the CLI
# imports this module to build its parser, before it silences torch-geometric's import warning, and
# `relkd --help` should not wait seconds for the engine.

__all__ = [
    "CLI_COMMANDS",
    "ProbeBatch",
    "VizOptions",
    "VizUsageError",
    "add_plot_parser",
    "add_viz_parser",
    "embed",
    "plot_run",
    "probe_batch",
    "read_histories",
    "viz_checkpoints",
    "viz_run",
]

RELATIONS = ("cosine", "normalized_distance")
# What the kNN graphs, the agreement numbers and the exported edges rank neighbours by: the
# relation the engine's per-epoch agreement uses, so the numbers compare with the logged ones.
KNN_RELATION = "cosine"
# Training-curve panels: these keys (also as a network's prefixed key, "peer1/test_acc1"), then
# every loss term; learning rate, timings and best-so-far are left out.
CURVE_KEYS = ("test_acc1", "train_acc1", "train_loss")
CURVE_TITLES = {
    "test_acc1": "test top-1 (%)",
    "train_acc1": "train top-1, labelled images (%)",
    "train_loss": "training loss (weighted total)",
    **METRIC_NAMES,
}
RUN_HINT = "relkd run CONFIG out={run_dir}"


class VizUsageError(ValueError):
    """Options that do not fit together or do not fit the run (the CLI prints them as usage errors)."""


# --- the probe batch and the embeddings ------------------------------------------------------------


@dataclass
class ProbeBatch:
    """A fixed batch of test images.

    Attributes:
        inputs: ``[B, C, H, W]`` normalised images, on the networks' device.
        labels: ``[B]`` int64 classes, on the same device.
        index: ``[B]`` int64 positions in the test set.
        class_names: ``class_names[y]`` names class ``y``; None when the dataset has no names.
    """

    inputs: Tensor
    labels: Tensor
    index: Tensor
    class_names: tuple[str, ...] | None


def probe_batch(bundle: Any, size: int, seed: int, device: torch.device | str = "cpu") -> ProbeBatch:
    """``size`` test images of ``bundle`` (a :class:`relkd.data.DataBundle`), class-balanced: as
    many per class as ``size`` allows (:func:`relkd.data.class_balanced_indices`), which ones of a
    class chosen with ``seed``, in test-set order. The same arguments give the same batch."""
    from relkd.data import class_balanced_indices

    test = bundle.test
    if not bundle.num_classes <= size <= len(test):
        raise VizUsageError(
            f"--batch-size must be between the number of classes ({bundle.num_classes}, one image "
            f"each) and the test set's size ({len(test)}), got {size}"
        )
    positions, _ = class_balanced_indices(test.targets, size, bundle.num_classes, seed)
    items = [test[int(i)] for i in positions]
    return ProbeBatch(
        inputs=torch.stack([item["input"] for item in items]).to(device),
        labels=torch.stack([item["target"] for item in items]).to(device),
        index=torch.stack([item["index"] for item in items]),
        class_names=tuple(bundle.classes) or None,
    )


@torch.no_grad()
def embed(model: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """The ``penultimate`` embedding ``[B, D]`` (float32, flattened) and logits ``[B, K]`` of
    ``model`` in eval mode, the tap resolved as the engine does (:func:`relkd.models.resolve_taps`)."""
    from relkd.models import FeatureTaps, resolve_taps

    model.eval()
    with FeatureTaps(model, resolve_taps(model, ["penultimate"])) as taps:
        logits = model(inputs)
        embedding = taps["penultimate"].float().flatten(1)
    return embedding, logits.float()


# --- options and figures --------------------------------------------------------------------------


@dataclass(frozen=True)
class VizOptions:
    """What ``relkd viz`` draws; the fields are :func:`viz_run`'s keyword arguments."""

    seed: int = 0
    batch_size: int = 128
    formats: Sequence[str] = ("png",)
    export: Sequence[str] = ()
    k: int = 5
    relations: Sequence[str] = RELATIONS
    device: str = "cpu"
    dpi: int | None = None

    def __post_init__(self) -> None:
        # Refuse bad options before any network is loaded.
        if not 1 <= self.k < self.batch_size:
            raise VizUsageError(
                f"-k must be between 1 and the batch size - 1 ({self.batch_size - 1}), got {self.k}"
            )
        bad = [f for f in self.formats if f not in FORMATS] + [e for e in self.export if e not in EXPORTERS]
        if bad:
            raise VizUsageError(
                f"unknown format {bad[0]!r}: figures are {list(FORMATS)}, exports {EXPORTERS.available()}"
            )
        tiny = RelationGraph(torch.eye(3))
        for relation in self.relations:
            try:
                tiny.relation(relation)
            except (KeyError, ValueError) as e:
                raise VizUsageError(f"--relation: {e.args[0]}") from None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _top1(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean() * 100)


def _emit(paths: list[Path], new: Iterable[Path]) -> None:
    for path in new:
        print(path)
        paths.append(path)


def _visualise(
    teacher: nn.Module, students: Iterable[tuple[str, nn.Module]], bundle: Any, out: Path, opts: VizOptions
) -> list[Path]:
    """Every figure, ``agreement.json`` and the exports of one teacher and its students."""
    from relkd.train.setup import resolve_device

    device = resolve_device(opts.device)
    k, formats = opts.k, opts.formats
    probe = probe_batch(bundle, opts.batch_size, opts.seed, device)
    t_emb, t_logits = embed(teacher.to(device), probe.inputs)
    graph_of = {"teacher": t_emb}
    metrics, accuracy = {}, {"teacher": _top1(t_logits, probe.labels)}
    written: list[Path] = []
    labels, names = probe.labels, probe.class_names
    for method, student in students:
        s_emb, s_logits = embed(student.to(device), probe.inputs)
        for relation in opts.relations:
            figure = relation_matrices(s_emb, t_emb, labels, relation, class_names=names)
            figure.suptitle(f"{method} vs teacher: {figure.get_suptitle()}")
            slug = relation.replace(":", "-")
            _emit(written, save_figure(figure, out / f"relations_{method}_{slug}", formats, opts.dpi))
        figure = knn_graphs(s_emb, t_emb, labels, k, KNN_RELATION, class_names=names, seed=opts.seed)
        figure.suptitle(f"{method} vs teacher: {figure.get_suptitle()}")
        _emit(written, save_figure(figure, out / f"knn_{method}", formats, opts.dpi))
        metrics[method] = agreement(s_emb, t_emb, k, relation=KNN_RELATION)
        accuracy[method] = _top1(s_logits, probe.labels)
        graph_of[method] = s_emb
    if not metrics:
        raise ValueError("no student to draw: give at least one")

    figure = agreement_bars(metrics)
    figure.suptitle(f"agreement with the teacher on {opts.batch_size} test images ({k}-NN, {KNN_RELATION})")
    _emit(written, save_figure(figure, out / "agreement", formats, opts.dpi))
    record = {
        "k": k,
        "relation": KNN_RELATION,
        "seed": opts.seed,
        "metrics": {m: {key: _finite(v) for key, v in row.items()} for m, row in metrics.items()},
        "probe_acc1": accuracy,
        "test_index": probe.index.tolist(),
    }
    path = out / "agreement.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    _emit(written, [path])
    for name, emb in graph_of.items() if opts.export else ():
        graph = RelationGraph(emb, y=labels, index=probe.index.to(emb.device))
        _emit(written, export_graph(graph, out / "graphs" / name, opts.export, k=k, relation=KNN_RELATION))
    return written


# --- relkd viz RUN_DIR ---------------------------------------------------------------------------


def _load_run_config(run_dir: Path) -> Any:
    from relkd.config import load_config

    hint = RUN_HINT.format(run_dir=run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}: `{hint}` writes one")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {run_dir} was not written by `relkd run` (`{hint}` writes the "
            "resolved config there)"
        )
    config, notes = load_config(path)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return config


def viz_run(
    run_dir: str | Path,
    *,
    method: str | Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 128,
    formats: Sequence[str] = ("png",),
    export: Sequence[str] = (),
    k: int = 5,
    relations: Sequence[str] = RELATIONS,
    device: str = "cpu",
    out: str | Path | None = None,
    dpi: int | None = None,
) -> list[Path]:
    """Draw a finished run's teacher against each method's student; print and return the paths.

    Args:
        run_dir: a directory written by ``relkd run`` (layout in :mod:`relkd.train`).
        method: one method or several; default every method of the run's config that has a
            finished student for ``seed`` (the others are skipped with a note).
        seed: which seed's student to load; the probe batch's choice is seeded with it too.
        batch_size: test images in the probe batch (class-balanced).
        formats: figure formats (``png``, ``svg``, ``pdf``).
        export: graph formats written to ``graphs/`` (``graphml``, ``gexf``, ``pyg``, ``npz``).
        k: neighbours per instance of the kNN graphs and of the overlap.
        relations: one ``relations_<method>_<relation>`` figure per relation
            (any :meth:`RelationGraph.relation` name, ``:`` written as ``-`` in the file name).
        device: where the networks run (``cpu``, ``cuda``, ``auto``).
        out: output folder; default ``run_dir/viz``.
        dpi: PNG resolution (default 300; 100 gives small files for a README).

    Returns:
        The files written (figures, ``agreement.json``, exports), in the order they were written.

    Raises:
        FileNotFoundError: no run directory, no ``config.yaml``, no teacher or student checkpoint;
            the message names the file and the command that writes it.
        VizUsageError: options that do not fit the run (unknown method, seed, relation ...).
    """
    from relkd.config import ConfigError
    from relkd.train.setup import build_model, load_bundle, load_weights

    run_dir = Path(run_dir)
    opts = VizOptions(seed, batch_size, formats, export, k, relations, device, dpi)
    config = _load_run_config(run_dir)
    if config.teacher is None:
        raise ConfigError(
            f"{run_dir / 'config.yaml'}: the run has no teacher (teacher: null): nothing to compare"
        )
    if seed not in config.seeds:
        raise VizUsageError(f"--seed {seed}: the run's seeds are {config.seeds}")
    wanted = list(config.methods) if method is None else [method] if isinstance(method, str) else list(method)
    unknown = [m for m in wanted if m not in config.methods]
    if unknown:
        raise VizUsageError(
            f"--method {unknown[0]!r} is not a method of this run; it has {list(config.methods)}"
        )
    hint = RUN_HINT.format(run_dir=run_dir)
    finished = [m for m in wanted if (run_dir / m / f"seed{seed}" / "final.pt").is_file()]
    missing = [str(run_dir / m / f"seed{seed}" / "final.pt") for m in wanted if m not in finished]
    if missing and method is not None:
        raise FileNotFoundError(f"{missing[0]} is missing: `{hint}` trains it")
    if not finished:
        raise FileNotFoundError(f"no finished student: {', '.join(missing)} missing; `{hint}` trains them")
    for path in missing:
        print(f"note: skipping {path}: not finished (`{hint}` trains it)", file=sys.stderr)

    spec = config.teacher
    teacher_file = spec.checkpoint or str(run_dir / "teacher" / "final.pt")
    if not Path(teacher_file).is_file():
        fix = "fix teacher.checkpoint in config.yaml" if spec.checkpoint else f"`{hint}` trains it"
        raise FileNotFoundError(f"the teacher checkpoint {teacher_file} is missing: {fix}")
    teacher = build_model(spec, load_bundle(spec.data, spec.seed))
    load_weights(teacher_file, teacher, "teacher")
    bundle = load_bundle(config.data, seed)

    def students() -> Iterator[tuple[str, nn.Module]]:
        for name in finished:
            student = build_model(config.student, bundle)
            load_weights(str(run_dir / name / f"seed{seed}" / "final.pt"), student, "student")
            yield name, student

    return _visualise(teacher, students(), bundle, Path(out) if out else run_dir / "viz", opts)


# --- relkd viz --teacher T.pt --student S.pt --dataset NAME --------------------------------------


def _recorded(path: str, key: str) -> Any:
    """``result[key]`` of a relkd ``final.pt`` (``model``, ``method``), None for other files."""
    from relkd.train.checkpoint import load_checkpoint

    result = load_checkpoint(path).get("result")
    return result.get(key) if isinstance(result, dict) else None


def _load_network(path: str, role: str, model: str | None, args: Mapping[str, Any], bundle: Any) -> nn.Module:
    from relkd.config import ModelConfig
    from relkd.train.checkpoint import CheckpointError
    from relkd.train.setup import build_model, load_weights

    model = model or _recorded(path, "model")
    if model is None:
        raise VizUsageError(f"{path} does not record its model: pass --{role}-model NAME (and --{role}-args)")
    network = build_model(ModelConfig(model, dict(args)), bundle)
    try:
        load_weights(path, network, "teacher" if role == "teacher" else "student")
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}. Pass --{role}-args with the constructor arguments it was trained with "
            f"(got {dict(args)}; a relkd run records them in RUN_DIR/config.yaml)"
        ) from None
    return network


def viz_checkpoints(
    teacher: str | Path,
    students: Mapping[str, str | Path],
    dataset: str,
    *,
    data_root: str | None = None,
    teacher_model: str | None = None,
    teacher_args: Mapping[str, Any] | None = None,
    student_model: str | None = None,
    student_args: Mapping[str, Any] | None = None,
    out: str | Path = "viz",
    **options: Any,
) -> list[Path]:
    """:func:`viz_run` without a run directory: checkpoints, model names and a dataset.

    Args:
        teacher: a relkd ``final.pt`` or a file holding a state dict (plain, or under ``model`` /
            ``state_dict``).
        students: ``{name: checkpoint}``; the names label the figures and files.
        dataset: registered dataset name (``relkd list datasets``); its test set gives the batch.
        data_root: the dataset's folder (default: its usual places).
        teacher_model, student_model: registered model names; default the one a relkd ``final.pt``
            records. Their constructor arguments (``width`` ...) are not recorded: give them in
            ``teacher_args`` / ``student_args`` (``num_classes`` and the input shape come from the
            dataset).
        out: output folder.
        options: ``seed``, ``batch_size``, ``formats``, ``export``, ``k``, ``relations``,
            ``device``, as in :func:`viz_run`.
    """
    from relkd.data import build

    opts = VizOptions(**options)
    for path in [teacher, *students.values()]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no checkpoint {path}")
    bundle = build(dataset, root=data_root, augment=False)
    t = _load_network(str(teacher), "teacher", teacher_model, teacher_args or {}, bundle)
    loaded = (
        (name, _load_network(str(p), "student", student_model, student_args or {}, bundle))
        for name, p in students.items()
    )
    return _visualise(t, loaded, bundle, Path(out), opts)


# --- relkd plot RUN_DIR --------------------------------------------------------------------------


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_histories(run_dir: str | Path) -> dict[str, list[list[dict[str, Any]]]]:
    """``{network: [rows of each seed]}`` from ``teacher/metrics.jsonl`` and
    ``<method>/seed<k>/metrics.jsonl``: the teacher first, then the methods in the order of the
    run's ``config.yaml`` (others alphabetically), seeds in numeric order."""
    run_dir = Path(run_dir)
    found: dict[str, list[tuple[int, list[dict[str, Any]]]]] = {}
    teacher = run_dir / "teacher" / "metrics.jsonl"
    if teacher.is_file():
        found["teacher"] = [(0, _read_rows(teacher))]
    for path in run_dir.glob("*/seed*/metrics.jsonl"):
        seed = path.parent.name.removeprefix("seed")
        if seed.isdigit():
            found.setdefault(path.parent.parent.name, []).append((int(seed), _read_rows(path)))
    config = run_dir / "config.yaml"
    order = ["teacher"]
    if config.is_file():
        order += list((yaml.safe_load(config.read_text()) or {}).get("methods") or {})
    rank = {m: i for i, m in enumerate(order)}
    return {
        name: [rows for _, rows in sorted(seeds, key=lambda s: s[0])]
        for name, seeds in sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
    }


def _rows(histories: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> Iterator[Mapping[str, Any]]:
    return (row for seeds in histories.values() for rows in seeds for row in rows)


def _curve_keys(histories: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> list[str]:
    """Accuracies, the total loss and every loss term logged, in that order."""
    found = numeric_keys(_rows(histories))

    def rank(key: str) -> int:
        base = key.rsplit("/", 1)[-1]
        return CURVE_KEYS.index(base) if base in CURVE_KEYS else len(CURVE_KEYS)

    keys = [k for k in found if k.startswith("loss/") or k.rsplit("/", 1)[-1] in CURVE_KEYS]
    return sorted(keys, key=lambda k: (rank(k), found.index(k)))


def _title(key: str) -> str:
    """``"loss/kd"`` -> ``"loss term: kd"``, ``"peer1/test_acc1"`` -> ``"peer1: test top-1 (%)"``."""
    if key.startswith("loss/"):
        return f"loss term: {key.removeprefix('loss/')}"
    network, _, base = key.rpartition("/")
    title = CURVE_TITLES.get(base, base)
    return f"{network}: {title}" if network else title


def _label_panels(figure: Figure, keys: Sequence[str]) -> None:
    """Readable panel titles, and whole epochs on the x axes."""
    for ax, key in zip(figure.axes, keys, strict=False):
        ax.set_title(_title(key))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_run(
    run_dir: str | Path,
    *,
    formats: Sequence[str] = ("png",),
    band: str = "minmax",
    dpi: int | None = None,
) -> list[Path]:
    """Training curves of every method of a run (and agreement curves, when logged); print and
    return the paths written to ``run_dir/plots/``.

    Args:
        run_dir: a directory written by ``relkd run``.
        formats: figure formats (``png``, ``svg``, ``pdf``).
        band: spread over seeds drawn around the mean: ``minmax`` or ``std`` (see
            :func:`relkd.viz.training_curves`).

    Raises:
        FileNotFoundError: no run directory, or no ``metrics.jsonl`` in it.
    """
    run_dir = Path(run_dir)
    hint = RUN_HINT.format(run_dir=run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}: `{hint}` writes one")
    histories = read_histories(run_dir)
    if not histories:
        raise FileNotFoundError(
            f"{run_dir} holds no metrics.jsonl (teacher/ or <method>/seed<k>/): `{hint}` trains and logs them"
        )
    out = run_dir / "plots"
    written: list[Path] = []
    keys = _curve_keys(histories)
    figure = training_curves(histories, keys, band=band, max_panels=max(len(keys), 1))
    _label_panels(figure, keys)
    _emit(written, save_figure(figure, out / "training_curves", formats, dpi))

    students = {name: seeds for name, seeds in histories.items() if name != "teacher"}
    logged = numeric_keys(_rows(students))
    agreement_keys = [key for key in AGREEMENT_KEYS if key in logged]
    if agreement_keys:
        figure = training_curves(students, agreement_keys, band=band)
        _label_panels(figure, agreement_keys)
        figure.suptitle(f"student–teacher agreement on the probe batch; {figure.get_suptitle()}")
        _emit(written, save_figure(figure, out / "agreement_curves", formats, dpi))
    return written


# --- argparse ------------------------------------------------------------------------------------

VIZ_SUMMARY = "draw a run's relation graphs: teacher vs each student on a fixed batch of test images"
PLOT_SUMMARY = "plot a run's training curves (and agreement curves): every method, mean over seeds"


def _mapping(text: str) -> dict[str, Any]:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{width: 8}}', got {text!r}")
    return value


def _shared_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        nargs="+",
        default=["png"],
        choices=list(FORMATS),
        dest="formats",
        help="figure formats (default: png)",
    )
    p.add_argument("--dpi", type=int, default=None, help="PNG resolution (default 300)")


def viz_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``relkd viz``."""
    p.add_argument("run_dir", nargs="?", help="a directory written by relkd run")
    p.add_argument("--method", nargs="+", help="methods to draw (default: every finished one)")
    p.add_argument("--seed", type=int, default=0, help="the students' seed, and the batch's (default 0)")
    p.add_argument("--batch-size", type=int, default=128, help="test images, class-balanced (default 128)")
    p.add_argument("-k", type=int, default=5, help="neighbours per image in the kNN graphs (default 5)")
    p.add_argument(
        "--relation",
        nargs="+",
        default=list(RELATIONS),
        dest="relations",
        help="relation matrices to draw (default: cosine normalized_distance)",
    )
    _shared_options(p)
    p.add_argument(
        "--export",
        nargs="+",
        default=[],
        choices=EXPORTERS.available(),
        help="also write each network's kNN graph to viz/graphs/ in these formats",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto ... (default cpu)")
    p.add_argument("--out", help="output folder (default RUN_DIR/viz, or ./viz with --teacher)")
    alone = p.add_argument_group("without a run directory")
    alone.add_argument("--teacher", help="teacher checkpoint (relkd final.pt or a state dict)")
    alone.add_argument(
        "--student",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="student checkpoint; repeat for several",
    )
    alone.add_argument("--dataset", help="registered dataset whose test set gives the batch")
    alone.add_argument("--data-root", help="the dataset's folder")
    for role in ("teacher", "student"):
        alone.add_argument(f"--{role}-model", help=f"{role} model name (default: recorded in its final.pt)")
        alone.add_argument(
            f"--{role}-args",
            type=_mapping,
            default={},
            metavar="YAML",
            help=f"{role} constructor arguments, e.g. '{{width: 8}}'",
        )


def _student_paths(values: Sequence[str]) -> dict[str, str]:
    students: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or Path(value).exists():
            path = value
            name = (_recorded(path, "method") if Path(path).is_file() else None) or Path(path).stem
        if name in students:
            raise VizUsageError(f"two students named {name!r}: name them with --student NAME=PATH")
        students[name] = path
    return students


def _viz(args: argparse.Namespace) -> list[Path]:
    options = {
        "seed": args.seed,
        "batch_size": args.batch_size,
        "formats": args.formats,
        "export": args.export,
        "k": args.k,
        "relations": args.relations,
        "device": args.device,
        "dpi": args.dpi,
    }
    alone = {"--teacher": args.teacher, "--student": args.student, "--dataset": args.dataset}
    if args.run_dir is not None:
        given = [flag for flag, value in alone.items() if value]
        if given:
            raise VizUsageError(
                f"give a RUN_DIR or {', '.join(alone)}, not both (got RUN_DIR and {given[0]})"
            )
        return viz_run(args.run_dir, method=args.method, out=args.out, **options)
    missing = [flag for flag, value in alone.items() if not value]
    if missing:
        raise VizUsageError(f"give a RUN_DIR, or {', '.join(alone)} (missing {', '.join(missing)})")
    return viz_checkpoints(
        args.teacher,
        _student_paths(args.student),
        args.dataset,
        data_root=args.data_root,
        teacher_model=args.teacher_model,
        teacher_args=args.teacher_args,
        student_model=args.student_model,
        student_args=args.student_args,
        out=args.out or "viz",
        **options,
    )


def viz_command(args: argparse.Namespace) -> int:
    """Run ``relkd viz``; options that do not fit print one ``relkd viz: error`` line, status 2."""
    try:
        _viz(args)
    except VizUsageError as e:
        print(f"relkd viz: error: {e}", file=sys.stderr)
        return 2
    return 0


def plot_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``relkd plot``."""
    p.add_argument("run_dir", help="a directory written by relkd run")
    _shared_options(p)
    p.add_argument(
        "--band",
        default="minmax",
        choices=[b for b in BANDS if b != "none"],
        help="spread over seeds around the mean (default minmax)",
    )


def plot_command(args: argparse.Namespace) -> int:
    """Run ``relkd plot``."""
    plot_run(args.run_dir, formats=args.formats, band=args.band, dpi=args.dpi)
    return 0


# name -> (summary, add the arguments, run): the shape of relkd.cli.COMMANDS.
CLI_COMMANDS = {
    "viz": (VIZ_SUMMARY, viz_arguments, viz_command),
    "plot": (PLOT_SUMMARY, plot_arguments, plot_command),
}


def _add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    summary, arguments, run = CLI_COMMANDS[name]
    p = subparsers.add_parser(name, help=summary, description=summary)
    arguments(p)
    p.set_defaults(func=run)
    return p


def add_viz_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``viz`` to ``parser.add_subparsers()``; the parsed namespace's ``func(args)`` runs it."""
    return _add_parser(subparsers, "viz")


def add_plot_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``plot`` to ``parser.add_subparsers()``; the parsed namespace's ``func(args)`` runs it."""
    return _add_parser(subparsers, "plot")
