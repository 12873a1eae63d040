"""Run a whole suite: the teacher, then every method for every seed, then the results table.

Finished runs are reused: the teacher when ``teacher/final.pt`` exists with the same config hash, a
student run when its ``result.json`` and ``final.pt`` exist with the same hash. ``resume=True``
continues interrupted runs from their ``checkpoint.pt``; without it they start over.

Launched by ``torchrun``, :func:`run_suite` joins the process group for the whole suite: every rank
trains the teacher and each student on its shard of every batch (see :mod:`relkd.train.engine`), and
rank 0 alone prints and writes the files; every rank then reads the same teacher weights.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from relkd import distributed as D
from relkd.config import SuiteConfig, to_data
from relkd.train.engine import Engine
from relkd.train.evaluate import evaluate, probe_inputs
from relkd.train.parallel import distributed_session
from relkd.train.seeding import seed_everything
from relkd.train.setup import (
    build_model,
    config_hash,
    load_bundle,
    load_weights,
    make_batches,
    resolve_device,
)
from relkd.train.stages import build_stages
from relkd.train.terms import parse_terms

__all__ = ["run_dir_of", "run_suite", "run_teacher", "run_method"]

Echo = Callable[[str], None]


def run_dir_of(config: SuiteConfig) -> Path:
    """The suite's run directory: ``out``, else ``runs/<name>``."""
    return Path(config.out) if config.out else Path("runs") / config.name


def _reusable(run_dir: Path, digest: str) -> dict[str, Any] | None:
    result_file = run_dir / "result.json"
    if not (result_file.is_file() and (run_dir / "final.pt").is_file()):
        return None
    result = json.loads(result_file.read_text())
    return result if result.get("config_hash") == digest else None


def teacher_hash(config: SuiteConfig) -> str:
    """What the teacher's weights depend on: its own config and the precision it trains in."""
    return config_hash("teacher", config.teacher, config.amp)


def run_teacher(
    config: SuiteConfig, run_dir: Path, resume: bool = False, quiet: bool = False, echo: Echo = print
) -> nn.Module:
    """The trained teacher: loaded from ``teacher.checkpoint``, reused from ``run_dir/teacher``, or
    trained there now. Its accuracy is in ``run_dir/teacher/result.json``."""
    spec = config.teacher
    device = resolve_device(config.device)
    out = run_dir / "teacher"
    digest = teacher_hash(config)
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
            out.mkdir(parents=True, exist_ok=True)
            (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        echo(f"teacher {spec.model}: loaded {spec.checkpoint} (test top-1 {acc1:.2f}%)")
        return teacher.eval()
    if _reusable(out, digest) is not None:
        load_weights(str(out / "final.pt"), teacher, "teacher")
        echo(f"teacher {spec.model}: reusing {out / 'final.pt'}")
        return teacher.to(device).eval()
    batches, test = make_batches(bundle, spec.data, spec.seed, device)
    engine = Engine(
        {"teacher": teacher},
        build_stages(None, spec.train, {}),
        batches,
        test,
        out,
        probe=probe_inputs(bundle.test, 4, device),
        device=device,
        amp=config.amp,
        log_agreement=False,
        quiet=quiet,
        tensorboard=config.tensorboard,
        config_hash=digest,
        info={"method": "teacher", "seed": spec.seed, "model": spec.model},
        label="teacher",
    )
    result = engine.fit(resume=resume)
    echo(f"teacher {spec.model}: top-1 {result['last_acc1']:.2f}% (best {result['best_acc1']:.2f}%)")
    return teacher.eval()


def run_method(
    config: SuiteConfig,
    name: str,
    seed: int,
    teacher: nn.Module | None,
    run_dir: Path,
    resume: bool = False,
    quiet: bool = False,
    echo: Echo = print,
) -> dict[str, Any]:
    """Train the student of method ``name`` with seed ``seed`` in ``run_dir/<name>/seed<seed>``."""
    method = config.methods[name]
    out = run_dir / name / f"seed{seed}"
    t_hash = teacher_hash(config) if config.teacher is not None else None
    digest = config_hash("student", config.student, config.data, method, seed, t_hash, config.amp)
    previous = _reusable(out, digest)
    if previous is not None:
        echo(f"{name} seed {seed}: reusing {out} (top-1 {previous['last_acc1']:.2f}%)")
        return previous
    device = resolve_device(config.device)
    seed_everything(seed)
    bundle = load_bundle(config.data, seed)
    student = build_model(config.student, bundle)
    teachers = {} if teacher is None else {"teacher": copy.deepcopy(teacher)}
    specs = parse_terms(method.losses, ["student"], list(teachers))
    batches, test = make_batches(bundle, config.data, seed, device)
    engine = Engine(
        {"student": student},
        build_stages(method.stages, method.train, {t: s.weight for t, s in specs.items()}),
        batches,
        test,
        out,
        teachers=teachers,
        terms=specs,
        num_data=bundle.num_train,
        targets=bundle.train_targets,
        probe=probe_inputs(bundle.test, config.probe_size, device),
        device=device,
        amp=config.amp,
        log_agreement=config.log_agreement,
        quiet=quiet,
        tensorboard=config.tensorboard,
        config_hash=digest,
        info={"method": name, "seed": seed, "model": config.student.model},
        label=f"{name} s{seed}",
    )
    result = engine.fit(resume=resume)
    echo(f"{name} seed {seed}: top-1 {result['last_acc1']:.2f}% (best {result['best_acc1']:.2f}%)")
    return result


def run_suite(config: SuiteConfig, resume: bool = False, quiet: bool = False, echo: Echo = print) -> Path:
    """Train (or reuse) the teacher, every method for every seed, and write the results table.

    Under ``torchrun`` it joins (and leaves) the process group; ``echo`` is called on rank 0 only.

    Returns:
        The run directory (layout in :mod:`relkd.train`).
    """
    from relkd.results import write_table

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    run_dir = run_dir_of(config)
    with distributed_session(resolve_device(config.device)):
        if not D.is_main_process():
            echo = _silent
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_data(config), sort_keys=False))
        teacher = None
        if config.teacher is not None:
            teacher = run_teacher(config, run_dir, resume, quiet, echo)
        for name in config.methods:
            for seed in config.seeds:
                run_method(config, name, seed, teacher, run_dir, resume, quiet, echo)
        if D.is_main_process():
            echo(write_table(run_dir))
        D.barrier()
    return run_dir


def _silent(message: str) -> None:
    """The ``echo`` of every rank but the first."""
