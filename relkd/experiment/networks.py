"""The trained networks of a run, or of checkpoint files: built from their config and loaded.

``relkd viz`` and ``relkd analyze`` read networks through here: a run's teacher(s) and each method's
deployed networks for one seed, or a teacher and students given as files with their model names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from relkd.config import ModelConfig, SuiteConfig
from relkd.experiment.probe import VizUsageError
from relkd.experiment.rundir import RunDir
from relkd.experiment.setup import build_model, load_weights
from relkd.train.checkpoint import CheckpointError, load_checkpoint

__all__ = [
    "deployed_names",
    "deployed_networks",
    "load_network_file",
    "load_teacher",
    "network_label",
    "recorded",
    "teacher_file",
]


def teacher_file(run: RunDir, config: SuiteConfig, name: str) -> Path:
    """Where the weights of the suite's teacher ``name`` are: its ``checkpoint``, else the run's.

    Raises:
        FileNotFoundError: the file is missing; the message says how to make it.
    """
    spec = config.teachers[name]
    path = Path(spec.checkpoint) if spec.checkpoint else run.teacher(name).final
    if not path.is_file():
        fix = (
            f"fix teachers.{name}.checkpoint in config.yaml" if spec.checkpoint else f"`{run.hint}` trains it"
        )
        raise FileNotFoundError(f"the teacher checkpoint {path} is missing: {fix}")
    return path


def load_teacher(run: RunDir, config: SuiteConfig, name: str, bundle: Any) -> nn.Module:
    """The suite's teacher ``name``, built and loaded."""
    network = build_model(config.teachers[name], bundle)
    load_weights(str(teacher_file(run, config, name)), network, "teacher")
    return network


def network_label(method: str, name: str) -> str:
    """A deployed network's label, as in the results table: the method's name, or ``method (network)``
    when it deploys another network than ``student``."""
    return method if name == "student" else f"{method} ({name})"


def deployed_names(run: RunDir, config: SuiteConfig, method: str, seed: int) -> list[str]:
    """The networks method ``method`` deployed with ``seed``, by name (its result says; else its config)."""
    result = run.run(method, seed).read_result() or {}
    spec = config.methods[method]
    return list(result.get("deployed") or spec.deploy or spec.students or {"student": None})


def deployed_networks(
    run: RunDir, config: SuiteConfig, method: str, seed: int, bundle: Any
) -> Iterator[tuple[str, nn.Module]]:
    """``(label, network)`` of each network method ``method`` deployed with ``seed``
    (:func:`network_label`)."""
    files = run.run(method, seed)
    spec = config.methods[method]
    for name in deployed_names(run, config, method, seed):
        network = build_model(spec.students[name], bundle)
        load_weights(str(files.final), network, name)
        yield network_label(method, name), network


def recorded(path: str | Path, key: str) -> Any:
    """``result[key]`` of a relkd ``final.pt`` (``model``, ``method``), None for other files."""
    result = load_checkpoint(path).get("result")
    return result.get(key) if isinstance(result, dict) else None


def load_network_file(
    path: str | Path, role: str, model: str | None, args: Mapping[str, Any], bundle: Any
) -> nn.Module:
    """A network from a checkpoint file: its model recorded in a relkd ``final.pt`` or given."""
    model = model or recorded(path, "model")
    if model is None:
        raise VizUsageError(f"{path} does not record its model: pass --{role}-model NAME (and --{role}-args)")
    network = build_model(ModelConfig(model, dict(args)), bundle)
    try:
        load_weights(str(path), network, "teacher" if role == "teacher" else "student")
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}. Pass --{role}-args with the constructor arguments it was trained with "
            f"(got {dict(args)}; a relkd run records them in RUN_DIR/config.yaml)"
        ) from None
    return network
