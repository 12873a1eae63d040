"""Run a whole suite: the teachers its methods use, then every method for every seed, then the table.

Finished runs are reused: a teacher when its ``final.pt`` and ``result.json`` exist with the same
config hash, a method run likewise. ``resume=True`` continues interrupted runs from their
``checkpoint.pt``; without it they start over. The run directory's layout is
:class:`relkd.experiment.RunDir`'s.

Launched by ``torchrun``, :func:`run_suite` joins the process group for the whole suite: every rank
trains each network on its shard of every batch (see :mod:`relkd.train.engine`), and rank 0 alone
prints and writes the files; every rank then reads the same teacher weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from relkd import distributed as D
from relkd.config import MethodConfig, SuiteConfig
from relkd.evaluation import build_evaluator
from relkd.experiment.ownership import claim, verify_final
from relkd.experiment.preflight import preflight
from relkd.experiment.rundir import RunDir
from relkd.experiment.setup import (
    build_model,
    config_hash,
    load_bundle,
    load_weights,
    make_batches,
    make_eval_loader,
    resolve_device,
    used_teachers,
)
from relkd.methods import parse_terms
from relkd.train import Engine, build_stages
from relkd.train.evaluate import evaluate, probe_inputs
from relkd.train.parallel import distributed_session
from relkd.train.seeding import seed_everything

__all__ = ["run_dir_of", "run_method", "run_suite", "run_teacher", "teacher_hash", "used_teachers"]

log = logging.getLogger("relkd")
Echo = Callable[[str], None]


def run_dir_of(config: SuiteConfig) -> RunDir:
    """The suite's run directory: ``out``, else ``runs/<name>``."""
    return RunDir(Path(config.out) if config.out else Path("runs") / config.name)


def teacher_hash(config: SuiteConfig, name: str = "teacher") -> str:
    """What the teacher ``name``'s weights depend on: its own config and the precision it trains in."""
    return config_hash("teacher", config.teachers[name], config.amp)


def _reusable(files: Any, digest: str) -> dict[str, Any] | None:
    """The result of a finished run of this configuration, its ``final.pt`` verified; None otherwise."""
    if not files.finished():
        return None
    result = files.read_result()
    if result.get("config_hash") != digest:
        return None
    verify_final(files, digest)
    return result


def run_teacher(
    config: SuiteConfig,
    run_dir: RunDir,
    name: str = "teacher",
    resume: bool = False,
    quiet: bool = False,
    echo: Echo = print,
) -> nn.Module:
    """The trained teacher ``name``: loaded from its ``checkpoint``, reused from the run directory, or
    trained there now (by its ``method``, cross-entropy alone by default)."""
    spec = config.teachers[name]
    device = resolve_device(config.device)
    files = run_dir.teacher(name)
    digest = teacher_hash(config, name)
    label = name if name == "teacher" else f"teacher {name}"
    seed_everything(spec.seed)
    bundle = load_bundle(spec.data, spec.seed)
    teacher = build_model(spec, bundle)
    if spec.checkpoint is not None:
        load_weights(spec.checkpoint, teacher, "teacher")
        teacher.to(device)
        _, test = make_batches(bundle, spec.data, spec.seed, device)
        acc1, acc5 = evaluate(teacher, test)
        result = {"method": "teacher", "seed": spec.seed, "last_acc1": acc1, "last_acc5": acc5,
                  "best_acc1": acc1, "best_acc5": acc5, "checkpoint": spec.checkpoint}  # fmt: skip
        if D.is_main_process():
            files.write_result(result)
        echo(f"{label} {spec.model}: loaded {spec.checkpoint} (test top-1 {acc1:.2f}%)")
        _above_chance(config, label, acc1, bundle, f"its checkpoint {spec.checkpoint}")
        return teacher.eval()
    previous = _reusable(files, digest)
    if previous is not None:
        load_weights(str(files.final), teacher, "teacher")
        echo(f"{label} {spec.model}: reusing {files.final}")
        _above_chance(config, label, previous["last_acc1"], bundle, f"the run in {files.path}")
        return teacher.to(device).eval()
    batches, test = make_batches(bundle, spec.data, spec.seed, device)
    method = spec.method
    specs = parse_terms(method.losses, ["teacher"], []) if method is not None else {}
    stages = (
        build_stages(None, spec.train, {})
        if method is None
        else build_stages(method.stages, method.train, {t: s.weight for t, s in specs.items()}, method.step)
    )
    engine = Engine(
        {"teacher": teacher},
        stages,
        batches,
        test,
        files,
        terms=specs,
        eval_loaders={"train": make_eval_loader(bundle, spec.data, device)},
        num_data=bundle.num_train,
        targets=known_targets(bundle),
        num_classes=bundle.num_classes,
        probe=probe_inputs(bundle.test, 4, device),
        device=device,
        amp=config.amp,
        log_agreement=False,
        quiet=quiet,
        tensorboard=config.tensorboard,
        config_hash=digest,
        info={"method": "teacher", "seed": spec.seed, "model": spec.model},
        label=label,
        sync_bn=spec.train.sync_bn,
        compile=spec.train.compile,
    )
    result = engine.fit(resume=resume)
    echo(f"{label} {spec.model}: top-1 {result['last_acc1']:.2f}% (best {result['best_acc1']:.2f}%)")
    _above_chance(config, label, result["last_acc1"], bundle, f"its training (logs in {files.path})")
    return teacher.eval()


class TeacherError(RuntimeError):
    """A teacher no better than chance: every student would distil noise."""


def _above_chance(config: SuiteConfig, label: str, acc1: float | None, bundle: Any, source: str) -> None:
    """Stop the suite when a teacher's test top-1 is within 1.5 times chance (``check_teachers``)."""
    if not config.check_teachers or acc1 is None:
        return
    classes = int(torch.unique(torch.as_tensor(bundle.test.targets)).numel())
    chance = 100.0 / max(classes, 1)
    if acc1 <= 1.5 * chance:
        raise TeacherError(
            f"the {label} reaches {acc1:.2f}% test top-1, no better than chance ({chance:.2f}% for {classes} "
            f"classes), so every student would distil noise. The cause is in {source}: check its recipe "
            "(data.batch_size, the learning rate, epochs) or its checkpoint; set check_teachers: false to "
            "distil from it anyway"
        )


def known_targets(bundle: Any) -> torch.Tensor:
    """The labels of the full training set as a run may know them: those of its labelled images, ``-1``
    for every other image (the unlabelled transfer set and images left out), so that losses sampling
    negatives by class never read a label the run is not given."""
    targets = torch.full_like(bundle.train_targets, -1)
    targets[bundle.train.indices] = bundle.train_targets[bundle.train.indices]
    return targets


def method_hash(config: SuiteConfig, name: str, seed: int) -> str:
    """What a method run's result depends on: its networks, data, method, seed, teachers, precision."""
    method = config.methods[name]
    teachers = {net: teacher_hash(config, suite) for net, suite in (method.teachers or {}).items()}
    evaluate = {**config.evaluate, **method.evaluate}
    return config_hash("student", method.students, config.data, method, seed, teachers, config.amp, evaluate)


def _evaluators(config: SuiteConfig, method: MethodConfig) -> dict[str, Any]:
    return {n: build_evaluator(n, options) for n, options in {**config.evaluate, **method.evaluate}.items()}


def run_method(
    config: SuiteConfig,
    name: str,
    seed: int,
    teachers: Mapping[str, nn.Module],
    run_dir: RunDir,
    resume: bool = False,
    quiet: bool = False,
    echo: Echo = print,
) -> dict[str, Any]:
    """Train the networks of method ``name`` with seed ``seed`` in ``run_dir.run(name, seed)``.

    ``teachers`` maps the suite's teacher names to the trained networks.
    """
    method = config.methods[name]
    files = run_dir.run(name, seed)
    digest = method_hash(config, name, seed)
    previous = _reusable(files, digest)
    if previous is not None:
        echo(f"{name} seed {seed}: reusing {files.path} (top-1 {previous['last_acc1']:.2f}%)")
        return previous
    device = resolve_device(config.device)
    seed_everything(seed)
    bundle = load_bundle(config.data, seed)
    students = {net: build_model(spec, bundle) for net, spec in method.students.items()}
    nets = {net: copy.deepcopy(teachers[suite]) for net, suite in (method.teachers or {}).items()}
    specs = parse_terms(method.losses, list(students), list(nets))
    batches, test = make_batches(bundle, config.data, seed, device)
    evaluators = _evaluators(config, method)
    first = next(iter(method.students.values()))
    engine = Engine(
        students,
        build_stages(method.stages, method.train, {t: s.weight for t, s in specs.items()}, method.step),
        batches,
        test,
        files,
        teachers=nets,
        terms=specs,
        deploy=method.deploy,
        evaluators=evaluators,
        eval_loaders={"train": make_eval_loader(bundle, config.data, device)},
        num_data=bundle.num_train,
        targets=known_targets(bundle),
        num_classes=bundle.num_classes,
        probe=probe_inputs(bundle.test, config.probe_size, device),
        device=device,
        amp=config.amp,
        log_agreement=config.log_agreement,
        quiet=quiet,
        tensorboard=config.tensorboard,
        config_hash=digest,
        info={"method": name, "seed": seed, "model": first.model},
        label=f"{name} s{seed}",
        sync_bn=method.train.sync_bn,
        compile=method.train.compile,
    )
    result = engine.fit(resume=resume)
    accuracies = ", ".join(
        f"{net} {r['last_acc1']:.2f}%" if len(result["networks"]) > 1 else f"{r['last_acc1']:.2f}%"
        for net, r in result["networks"].items()
    )
    echo(f"{name} seed {seed}: top-1 {accuracies} (best {result['best_acc1']:.2f}%)")
    return result


def run_suite(
    config: SuiteConfig,
    resume: bool = False,
    quiet: bool = False,
    echo: Echo = print,
    overwrite: bool = False,
) -> Path:
    """Train (or reuse) the teachers the methods use, every method for every seed, and write the table.

    The run directory must hold this configuration's runs only (:func:`relkd.experiment.ownership.claim`):
    ``resume`` continues interrupted runs, ``overwrite`` deletes the directory first. Under ``torchrun``
    it joins (and leaves) the process group; ``echo`` is called on rank 0 only.

    Returns:
        The run directory's path (layout in :class:`relkd.experiment.RunDir`).
    """
    from relkd.experiment.results import write_table

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    preflight(config)
    run_dir = run_dir_of(config)
    with distributed_session(resolve_device(config.device)):
        data = claim(run_dir, config, resume, overwrite, write=D.is_main_process())
        if not D.is_main_process():
            echo = _silent
        else:
            run_dir.write_config(data)
        D.barrier()
        trained = {
            name: run_teacher(config, run_dir, name, resume, quiet, echo) for name in used_teachers(config)
        }
        for name in config.methods:
            for seed in config.seeds:
                run_method(config, name, seed, trained, run_dir, resume, quiet, echo)
        if D.is_main_process():
            echo(write_table(run_dir))
        D.barrier()
    return run_dir.path


def _silent(message: str) -> None:
    """The ``echo`` of every rank but the first."""
