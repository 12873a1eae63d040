"""``relkd viz``: a run's relation graphs, teacher against each deployed network, on one batch.

``viz_run(RUN_DIR)`` loads the teacher and each method's deployed network(s) (seed ``seed``), takes one
class-balanced, seeded batch of test images (the same for every method), reads each network's
``penultimate`` embedding and writes into ``RUN_DIR/viz/``:

=====================================  =========================================================
``relations_<method>_<relation>.png``  teacher | student | difference relation matrices
``knn_<method>.png``                   the two kNN graphs on the teacher's PCA positions
``agreement.png``, ``agreement.json``  kNN overlap, linear CKA and distance rank correlation
                                       per method (:func:`relkd.graphs.agreement.agreement`),
                                       the batch's test indices and each network's top-1 on it
``graphs/<network>.<suffix>``          with ``export``: each network's kNN relation graph
                                       (node labels and test indices, cosine edge values)
=====================================  =========================================================

``viz_checkpoints`` does the same from checkpoint files and a dataset name, without a run directory.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from relkd.config import ConfigError
from relkd.data import build
from relkd.experiment.networks import deployed_networks, load_network_file, load_teacher
from relkd.experiment.probe import VizUsageError, embed, probe_batch
from relkd.experiment.rundir import RunDir
from relkd.experiment.setup import load_bundle, resolve_device
from relkd.graphs import RelationGraph
from relkd.graphs.agreement import agreement
from relkd.graphs.export import EXPORTERS, export_graph
from relkd.viz._common import colour_map
from relkd.viz.agreement import agreement_bars
from relkd.viz.matrices import relation_matrices
from relkd.viz.network import knn_graphs
from relkd.viz.save import FORMATS, save_figure

__all__ = ["KNN_RELATION", "RELATIONS", "VizOptions", "viz_checkpoints", "viz_run"]

RELATIONS = ("cosine", "normalized_distance")
# What the kNN graphs, the agreement numbers and the exported edges rank neighbours by: the
# relation the engine's per-epoch agreement uses, so the numbers compare with the logged ones.
KNN_RELATION = "cosine"


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
    teacher: nn.Module,
    students: Iterable[tuple[str, nn.Module]],
    bundle: Any,
    out: Path,
    opts: VizOptions,
    colours: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Every figure, ``agreement.json`` and the exports of one teacher and its students."""
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

    figure = agreement_bars(metrics, colours=colours)
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


def viz_run(
    run_dir: str | Path | RunDir,
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
    """Draw a finished run's teacher against each method's deployed networks; print and return the paths.

    Args:
        run_dir: a directory written by ``relkd run`` (layout in :class:`relkd.experiment.RunDir`).
        method: one method or several; default every method of the run's config that has a
            finished run for ``seed`` and a teacher (the others are skipped with a note).
        seed: which seed's networks to load; the probe batch's choice is seeded with it too.
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
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    opts = VizOptions(seed, batch_size, formats, export, k, relations, device, dpi)
    config, notes = run.load_config()
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not config.teachers:
        raise ConfigError(f"{run.config}: the run has no teacher (teacher: null): nothing to compare")
    if seed not in config.seeds:
        raise VizUsageError(f"--seed {seed}: the run's seeds are {config.seeds}")
    wanted = list(config.methods) if method is None else [method] if isinstance(method, str) else list(method)
    unknown = [m for m in wanted if m not in config.methods]
    if unknown:
        raise VizUsageError(
            f"--method {unknown[0]!r} is not a method of this run; it has {list(config.methods)}"
        )
    finished = [m for m in wanted if run.run(m, seed).final.is_file()]
    missing = [str(run.run(m, seed).final) for m in wanted if m not in finished]
    if missing and method is not None:
        raise FileNotFoundError(f"{missing[0]} is missing: `{run.hint}` trains it")
    if not finished:
        raise FileNotFoundError(
            f"no finished student: {', '.join(missing)} missing; `{run.hint}` trains them"
        )
    for path in missing:
        print(f"note: skipping {path}: not finished (`{run.hint}` trains it)", file=sys.stderr)
    teacher_name = next(iter(config.teachers))
    spec = config.teachers[teacher_name]
    teacher = load_teacher(run, config, teacher_name, load_bundle(spec.data, spec.seed))
    bundle = load_bundle(config.data, seed)

    def students() -> Iterator[tuple[str, nn.Module]]:
        for name in finished:
            yield from deployed_networks(run, config, name, seed, bundle)

    colours = colour_map(
        [*(n if n == "teacher" else f"teacher-{n}" for n in config.teachers), *config.methods]
    )
    return _visualise(teacher, students(), bundle, Path(out) if out else run.viz, opts, colours)


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
    opts = VizOptions(**options)
    for path in [teacher, *students.values()]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no checkpoint {path}")
    bundle = build(dataset, root=data_root, augment=False)
    t = load_network_file(str(teacher), "teacher", teacher_model, teacher_args or {}, bundle)
    loaded = (
        (name, load_network_file(str(p), "student", student_model, student_args or {}, bundle))
        for name, p in students.items()
    )
    return _visualise(t, loaded, bundle, Path(out), opts)
