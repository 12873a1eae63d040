"""``relkd analyze``: what the networks of a finished run share, and what each rests on.

``analyze_run(RUN_DIR)`` loads the teacher and every method's networks of one seed and writes into
``RUN_DIR/analysis/`` (numbers from :mod:`relkd.analysis`, figures from :mod:`relkd.viz.analysis`):

==============================  ==================================================================
``layer_cka.png``               teacher x student CKA of every pair of layers (stage taps,
                                penultimate, logits) over the whole test set, one panel per network
                                (Nguyen et al.'s minibatch estimator: unbiased HSIC per test batch)
``similarity.png``              per network: RSA (Reflect's second-order similarity) and CKA of the
                                penultimate embeddings, top-1 / top-5 agreement with the teacher, the
                                KL from the teacher's predictions, test error
``mistakes.png``                the common / uncommon mistakes table of each network and the teacher
``block_shuffle.png``           test accuracy on block-shuffled images, per block size and network
``interpolation.png``           the straight line between two networks of one architecture: each
                                method's network with this seed and with the next seed, and a
                                method's peers (DML, FFSD): the barrier of the test error and loss
                                above the chord, the worst error, the ℓ2 distance; BatchNorm
                                statistics re-estimated at each point on the training images
``interpolation_curves.png``    the error curves of the peers and of the first pair of seeds
``criticality.png``             per network and module, the smallest rewinding toward the network's
                                initial weights that keeps the training error within ``eps`` of its
                                final value (with the papers' noise grid in ``analysis.json``)
``analysis.json``               every number above, the criticality grids, the ℓ2 distance of each
                                module from its initial value and between each interpolated pair
``csv/*.csv``                   with ``export``: the matrices and curves as CSV
==============================  ==================================================================

A network's initial weights are rebuilt as the suite built them (the method's seed set with
:func:`relkd.train.seeding.seed_everything`, then its networks constructed in config order: the
order of :func:`relkd.experiment.suite.run_method`); a run does not store them.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from relkd import analysis as A
from relkd.config import SuiteConfig
from relkd.data import make_loader
from relkd.experiment.networks import deployed_names, load_teacher, network_label, teacher_file
from relkd.experiment.probe import VizUsageError, embed, probe_batch
from relkd.experiment.rundir import RunDir
from relkd.experiment.setup import build_model, load_bundle, load_weights, make_eval_loader, resolve_device
from relkd.train.seeding import rng_state, seed_everything, set_rng_state
from relkd.viz.analysis import (
    criticality_map,
    interpolation_curves,
    layer_cka_heatmaps,
    metric_table,
    mistakes_bars,
)
from relkd.viz.save import FORMATS, save_figure

__all__ = [
    "ANALYSES",
    "AnalyzeOptions",
    "analyze_run",
    "deployed_names",
    "initial_networks",
    "method_networks",
]

ANALYSES = ("cka", "rsa", "predictions", "block_shuffle", "interpolation", "criticality")
# The analyses that compare a network with the teacher.
TEACHER_ANALYSES = ("cka", "rsa", "predictions")


@dataclass(frozen=True)
class AnalyzeOptions:
    """What ``relkd analyze`` runs; the fields are :func:`analyze_run`'s keyword arguments.

    Attributes:
        seed: the networks' seed (interpolation pairs it with the run's next seed); None: the run's
            first seed.
        methods: methods to analyse; None: every method with a finished run for ``seed``.
        analyses: a subset of :data:`ANALYSES`.
        kernel: CKA kernel, ``linear`` or ``rbf``.
        probe_size: test images (class-balanced) the RSA is computed on.
        lambdas: points on each interpolation line, ends included.
        eps: criticality's error margin over each network's final training error (a fraction).
        alphas, sigmas: criticality's rewinding and noise grids.
        formats, dpi: figure files.
        export: also write the matrices and curves as CSV.
        device: where the networks run.
    """

    seed: int | None = None
    methods: Sequence[str] | None = None
    analyses: Sequence[str] = ANALYSES
    kernel: str = "linear"
    probe_size: int = 512
    lambdas: int = 11
    eps: float = 0.05
    alphas: Sequence[float] = A.ALPHAS
    sigmas: Sequence[float] = A.SIGMAS
    formats: Sequence[str] = ("png",)
    dpi: int | None = None
    export: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        bad = [a for a in self.analyses if a not in ANALYSES]
        if bad:
            raise VizUsageError(f"unknown analysis {bad[0]!r}; choose from {list(ANALYSES)}")
        if self.kernel not in ("linear", "rbf"):
            raise VizUsageError(f"--kernel must be linear or rbf, got {self.kernel!r}")
        if self.lambdas < 2:
            raise VizUsageError(f"--lambdas needs at least the two ends, got {self.lambdas}")
        if not 0 <= self.eps <= 1:
            raise VizUsageError(f"--eps is an error margin, a fraction in [0, 1], got {self.eps}")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise VizUsageError(f"unknown figure format {bad[0]!r}; choose from {list(FORMATS)}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def method_networks(
    run: RunDir, config: SuiteConfig, method: str, seed: int, bundle: Any, names: Iterable[str] | None = None
) -> dict[str, nn.Module]:
    """The trained networks of method ``method``'s run with ``seed`` by name (default all of them,
    deployed or not), built and loaded from its ``final.pt``."""
    spec = config.methods[method]
    final = str(run.run(method, seed).final)
    out = {}
    for name in spec.students if names is None else names:
        network = build_model(spec.students[name], bundle)
        load_weights(final, network, name)
        out[name] = network
    return out


def initial_networks(config: SuiteConfig, method: str, seed: int) -> dict[str, nn.Module]:
    """The networks of method ``method``'s run with ``seed`` as initialised before training: the seed
    set, the data loaded and the networks built in config order, as the suite does. The random number
    generators are left as they were."""
    state = rng_state()
    try:
        seed_everything(seed)
        bundle = load_bundle(config.data, seed)
        return {name: build_model(spec, bundle) for name, spec in config.methods[method].students.items()}
    finally:
        set_rng_state(state)


class _Writer:
    """Figures, CSV files and the paths written, printed as they come."""

    def __init__(self, out: Path, opts: AnalyzeOptions) -> None:
        self.out, self.opts, self.paths = out, opts, []

    def figure(self, fig: Any, name: str) -> None:
        self._emit(save_figure(fig, self.out / name, self.opts.formats, self.opts.dpi))

    def csv(self, name: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        if not self.opts.export:
            return
        path = self.out / "csv" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        self._emit([path])

    def json(self, record: Mapping[str, Any]) -> None:
        path = self.out / "analysis.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_plain(record), indent=1) + "\n")
        self._emit([path])

    def _emit(self, paths: Iterable[Path]) -> None:
        for path in paths:
            print(path)
            self.paths.append(path)


def _plain(value: Any) -> Any:
    """JSON-ready: non-finite floats become None, tuples lists, keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _next_seed(run: RunDir, config: SuiteConfig, method: str, seed: int) -> int | None:
    """The run's next seed after ``seed`` (cyclically) with a finished run of ``method``."""
    seeds = list(config.seeds)
    start = seeds.index(seed)
    for other in seeds[start + 1 :] + seeds[:start]:
        if run.run(method, other).final.is_file():
            return other
    return None


def _methods(run: RunDir, config: SuiteConfig, opts: AnalyzeOptions) -> list[str]:
    wanted = list(config.methods) if opts.methods is None else list(opts.methods)
    unknown = [m for m in wanted if m not in config.methods]
    if unknown:
        raise VizUsageError(
            f"--method {unknown[0]!r} is not a method of this run; it has {list(config.methods)}"
        )
    finished = [m for m in wanted if run.run(m, opts.seed).final.is_file()]
    missing = [str(run.run(m, opts.seed).final) for m in wanted if m not in finished]
    if missing and opts.methods is not None:
        raise FileNotFoundError(f"{missing[0]} is missing: `{run.hint}` trains it")
    if not finished:
        raise FileNotFoundError(f"no finished run for seed {opts.seed}: `{run.hint}` trains them")
    for path in missing:
        print(f"note: skipping {path}: not finished (`{run.hint}` trains it)", file=sys.stderr)
    return finished


def _teacher(run: RunDir, config: SuiteConfig, device: torch.device) -> tuple[str | None, nn.Module | None]:
    """The suite's first teacher, loaded, or ``(None, None)`` (with a note) when the run has none."""
    if not config.teachers:
        return None, None
    name = next(iter(config.teachers))
    try:
        teacher_file(run, config, name)
    except FileNotFoundError as e:
        print(f"note: {e}", file=sys.stderr)
        return None, None
    spec = config.teachers[name]
    return name, load_teacher(run, config, name, load_bundle(spec.data, spec.seed)).to(device)


def analyze_run(run_dir: str | Path | RunDir, *, out: str | Path | None = None, **options: Any) -> list[Path]:
    """Analyse a finished run (see the module doc); print and return the paths written.

    Args:
        run_dir: a directory written by ``relkd run``.
        out: output folder; default ``RUN_DIR/analysis``.
        options: the fields of :class:`AnalyzeOptions`.

    Raises:
        FileNotFoundError: no run directory, config or finished run; the message says what writes it.
        VizUsageError: options that do not fit the run (unknown method, seed, analysis ...).
    """
    opts = AnalyzeOptions(**options)
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    config, notes = run.load_config()
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if opts.seed is None:
        opts = replace(opts, seed=config.seeds[0])
    if opts.seed not in config.seeds:
        raise VizUsageError(f"--seed {opts.seed}: the run's seeds are {config.seeds}")
    methods = _methods(run, config, opts)
    device = resolve_device(opts.device)
    writer = _Writer(Path(out) if out else run.analysis, opts)
    wanted = set(opts.analyses)
    teacher_name, teacher = (
        _teacher(run, config, device) if wanted & {*TEACHER_ANALYSES, "block_shuffle"} else (None, None)
    )
    if teacher is None and wanted & set(TEACHER_ANALYSES):
        print("note: no teacher to compare with: skipping cka, rsa and predictions", file=sys.stderr)
    bundle = load_bundle(config.data, opts.seed)
    test = make_loader(
        bundle.test, config.data.test_batch_size, False, 0, augment=False, device=device, even=False
    )
    train = make_eval_loader(bundle, config.data, device)
    test_batches, train_batches = list(test), list(train)

    record: dict[str, Any] = {
        "run": str(run.path),
        "seed": opts.seed,
        "teacher": teacher_name,
        "test_images": len(bundle.test),
        "train_images": len(bundle.train),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("formats", "dpi")},
        "networks": {},
        "interpolation": {},
    }
    networks: dict[str, nn.Module] = {}
    for method in methods:
        names = deployed_names(run, config, method, opts.seed)
        for name, network in method_networks(run, config, method, opts.seed, bundle, names).items():
            networks[network_label(method, name)] = network.to(device)
            record["networks"][network_label(method, name)] = {"method": method, "network": name}

    if teacher is not None and wanted & set(TEACHER_ANALYSES):
        _compare_with_teacher(teacher, networks, bundle, test_batches, record, writer, opts, device)
    if "block_shuffle" in wanted:
        _block_shuffle(teacher_name, teacher, networks, test_batches, record, writer)
    if "interpolation" in wanted:
        _interpolation(
            run, config, methods, bundle, test_batches, train_batches, record, writer, opts, device
        )
    if "criticality" in wanted:
        _criticality(config, methods, networks, record, train_batches, writer, opts, device)
    writer.json(record)
    return writer.paths


def _compare_with_teacher(
    teacher: nn.Module,
    networks: Mapping[str, nn.Module],
    bundle: Any,
    test: list[Any],
    record: dict[str, Any],
    writer: _Writer,
    opts: AnalyzeOptions,
    device: torch.device,
) -> None:
    wanted = set(opts.analyses)
    t_logits, targets = A.predict(teacher, test)
    record["teacher_test_error"] = A.error_rate(t_logits, targets)
    probe = probe_batch(bundle, min(opts.probe_size, len(bundle.test)), opts.seed, device)
    t_emb, _ = embed(teacher, probe.inputs)
    layers, table, tables = {}, {}, {}
    k5 = min(5, t_logits.shape[1])
    for label, network in networks.items():
        row = record["networks"][label]
        if "cka" in wanted:
            layers[label] = A.layer_cka(teacher, network, test, kernel=opts.kernel)
            row["layer_cka"] = layers[label].as_dict()
        summary = {}
        if "rsa" in wanted:
            s_emb, _ = embed(network, probe.inputs)
            row["rsa"] = A.rsa(s_emb, t_emb)
            summary["RSA (penultimate)"] = row["rsa"]
        if (
            "cka" in wanted
            and "penultimate" in layers[label].taps_a
            and "penultimate" in layers[label].taps_b
        ):
            i, j = layers[label].taps_a.index("penultimate"), layers[label].taps_b.index("penultimate")
            summary["CKA (penultimate)"] = float(layers[label].matrix[i, j])
        if "predictions" in wanted:
            logits, _ = A.predict(network, test)
            row["test_error"] = A.error_rate(logits, targets)
            row["top1_agreement"] = A.topk_agreement(logits, t_logits, 1)
            row[f"top{k5}_agreement"] = A.topk_agreement(logits, t_logits, k5)
            row["kl_from_teacher"] = A.prediction_kl(logits, t_logits)
            tables[label] = A.mistakes(logits, t_logits, targets)
            row["mistakes"] = tables[label].as_dict()
            summary["top-1 agreement"] = row["top1_agreement"]
            summary[f"top-{k5} agreement"] = row[f"top{k5}_agreement"]
            summary["KL(teacher ‖ net), nats"] = row["kl_from_teacher"]
            summary["test error (%)"] = 100 * row["test_error"]
        table[label] = summary
    if layers:
        fig = layer_cka_heatmaps(layers, rows="teacher", columns="network")
        estimator = f"{opts.kernel} CKA, minibatch (unbiased HSIC), {len(bundle.test)} test images"
        fig.suptitle(f"teacher x network, every pair of layers ({estimator})")
        writer.figure(fig, "layer_cka")
        for label, result in layers.items():
            rows = [[tap, *result.matrix[i].tolist()] for i, tap in enumerate(result.taps_a)]
            writer.csv(f"layer_cka_{_slug(label)}", ["teacher \\ network", *result.taps_b], rows)
    if any(table.values()):
        better = {"KL(teacher ‖ net), nats": False, "test error (%)": False}
        fig = metric_table(table, fmt=".3g", higher_is_better=better)
        fig.suptitle(
            "similarity to the teacher (bright = more similar / better; colours per column)", fontsize=9
        )
        writer.figure(fig, "similarity")
        columns = list(dict.fromkeys(c for r in table.values() for c in r))
        writer.csv(
            "similarity", ["network", *columns], [[n, *(r.get(c) for c in columns)] for n, r in table.items()]
        )
    if tables:
        fig = mistakes_bars(tables, a="network", b="teacher")
        writer.figure(fig, "mistakes")
        kinds = list(next(iter(tables.values())).as_dict())
        writer.csv("mistakes", ["network", *kinds], [[n, *t.as_dict().values()] for n, t in tables.items()])


def _block_shuffle(
    teacher_name: str | None,
    teacher: nn.Module | None,
    networks: Mapping[str, nn.Module],
    test: list[Any],
    record: dict[str, Any],
    writer: _Writer,
) -> None:
    curves = {}
    if teacher is not None:
        label = "teacher" if teacher_name == "teacher" else f"teacher ({teacher_name})"
        curves[label] = record["teacher_block_shuffle"] = A.shuffle_robustness(teacher, test)
    for label, network in networks.items():
        curves[label] = A.shuffle_robustness(network, test)
        record["networks"][label]["block_shuffle"] = curves[label]
    sizes = sorted({k for c in curves.values() for k in c})
    table = {label: {f"k = {k}": 100 * c[k] for k in sizes} for label, c in curves.items()}
    fig = metric_table(table, fmt=".1f", per_column=False, vmin=0, vmax=100, colorbar="test top-1 (%)")
    fig.suptitle(
        f"block-shuffled test images: k x k blocks permuted (k = {sizes[-1]}: unshuffled)", fontsize=9
    )
    writer.figure(fig, "block_shuffle")
    writer.csv(
        "block_shuffle", ["network", *(f"k={k}" for k in sizes)], [[n, *r.values()] for n, r in table.items()]
    )


def _pairs(
    run: RunDir, config: SuiteConfig, method: str, seed: int
) -> list[tuple[str, str, tuple[str, int], tuple[str, int]]]:
    """``(kind, label, (network, seed), (network, seed))`` of each interpolated pair of a method:
    each deployed network with the next seed's, and every two peers of one architecture."""
    pairs = []
    other = _next_seed(run, config, method, seed)
    for name in deployed_names(run, config, method, seed) if other is not None else ():
        pairs.append(
            ("seeds", f"{network_label(method, name)}: seed {seed} → {other}", (name, seed), (name, other))
        )
    students = config.methods[method].students
    for a, b in itertools.combinations(students, 2):
        if students[a] == students[b]:
            pairs.append(("peers", f"{method}: {a} → {b}", (a, seed), (b, seed)))
    return pairs


def _interpolation(
    run: RunDir,
    config: SuiteConfig,
    methods: Sequence[str],
    bundle: Any,
    test: list[Any],
    train: list[Any],
    record: dict[str, Any],
    writer: _Writer,
    opts: AnalyzeOptions,
    device: torch.device,
) -> None:
    lambdas = [i / (opts.lambdas - 1) for i in range(opts.lambdas)]
    curves: dict[str, tuple[str, A.InterpolationCurve]] = {}
    table, rows = {}, []
    for method in methods:
        for kind, label, (na, sa), (nb, sb) in _pairs(run, config, method, opts.seed):
            (a,) = method_networks(run, config, method, sa, bundle, [na]).values()
            (b,) = method_networks(run, config, method, sb, bundle, [nb]).values()
            curve = A.interpolate(a.to(device), b.to(device), lambdas, test, bn_loader=train)
            distance = A.parameter_distance(a, b)
            curves[label] = (kind, curve)
            record["interpolation"][label] = {
                "method": method,
                "kind": kind,
                "a": {"network": na, "seed": sa},
                "b": {"network": nb, "seed": sb},
                **curve.as_dict(),
                "distance": distance,
            }
            table[label] = {
                "barrier (error pts)": 100 * curve.barrier,
                "barrier (nats)": curve.loss_barrier,
                "worst error (%)": 100 * max(curve.error),
                "ℓ2 distance": distance["total"],
            }
            rows += [
                [label, kind, *point] for point in zip(curve.lambdas, curve.error, curve.loss, strict=True)
            ]
    if not curves:
        print("note: nothing to interpolate: one seed and no peers", file=sys.stderr)
        return
    bn = {c.bn for _, c in curves.values()} - {"none"}
    how = "BatchNorm statistics recomputed on the training images" if bn else "no BatchNorm"
    fig = metric_table(table, fmt=".3g", higher_is_better=dict.fromkeys(next(iter(table.values())), False))
    fig.suptitle(f"the straight line between two networks ({how}; bright = lower)", fontsize=9)
    writer.figure(fig, "interpolation")
    # The curves of the peers, with the first pair of seeds for reference.
    first_seeds = next((label for label, (kind, _) in curves.items() if kind == "seeds"), None)
    shown = {label: c for label, (kind, c) in curves.items() if kind == "peers" or label == first_seeds}
    fig = interpolation_curves(shown)
    fig.suptitle(f"test error along the line ({how})", fontsize=9)
    writer.figure(fig, "interpolation_curves")
    writer.csv("interpolation", ["pair", "kind", "lambda", "error", "loss"], rows)


def _criticality(
    config: SuiteConfig,
    methods: Sequence[str],
    networks: Mapping[str, nn.Module],
    record: dict[str, Any],
    train: list[Any],
    writer: _Writer,
    opts: AnalyzeOptions,
    device: torch.device,
) -> None:
    results = {}
    rows = []
    for method in methods:
        init = initial_networks(config, method, opts.seed)
        for name, start in init.items():
            label = network_label(method, name)
            if label not in networks:
                continue
            network = networks[label]
            final_error, _ = A.evaluate_error(network, train)
            bound = min(1.0, final_error + opts.eps)
            found = A.module_criticality(
                network,
                start.to(device),
                train,
                bound,
                alphas=opts.alphas,
                sigmas=opts.sigmas,
                seed=opts.seed,
            )
            results[label] = found
            record["networks"][label]["train_error"] = final_error
            record["networks"][label]["criticality"] = {m: c.as_dict() for m, c in found.items()}
            record["networks"][label]["distance_from_init"] = A.parameter_distance(network, start.to(device))
            for module, c in found.items():
                for (i, alpha), (j, sigma) in itertools.product(enumerate(c.alphas), enumerate(c.sigmas)):
                    rows.append([label, module, alpha, sigma, float(c.error[i, j])])
    if not results:
        return
    fig = criticality_map(results)
    fig.suptitle(
        f"module criticality on {record['train_images']} training images: rewinding toward the initial "
        f"weights, ε = the network's final error + {opts.eps:g}",
        fontsize=9,
    )
    writer.figure(fig, "criticality")
    writer.csv("criticality", ["network", "module", "alpha", "sigma", "error"], rows)
