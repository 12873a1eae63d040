"""A run directory belongs to one configuration: nothing in it is lost, nothing from two configs mixed.

Before a suite trains anything, :func:`claim` compares the resolved config with the directory's
``config.yaml``:

* the same config, or one that only adds methods or seeds: the runs already there are reused (each
  verified first) and the directory's config becomes the union, so ``config.yaml`` and ``results.md``
  always name every run the directory holds;
* a config that changes anything a finished run depends on (the data, a network, the recipe, a
  method's options ...): an error that lists the differences and offers a new ``out=`` or
  ``--overwrite`` (which removes the old directory first);
* a run that was interrupted (``checkpoint.pt`` without ``final.pt``) while ``--resume`` is not given:
  an error that says so, instead of starting it over and throwing its epochs away.

Keys that do not change any result (``threads``, ``tensorboard``, ``device``, ``imports``, ``out``,
``name``) may differ.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from typing import Any

from relkd.config import ConfigError, SuiteConfig, to_data
from relkd.config.validate import from_data
from relkd.experiment.rundir import RunDir
from relkd.experiment.setup import used_teachers
from relkd.train.checkpoint import CheckpointError, load_checkpoint

__all__ = ["RunDirConflict", "claim", "verify_final"]

# Keys that change how a suite runs, not what it computes.
NEUTRAL = ("threads", "tensorboard", "device", "imports", "out", "name")
SHOWN = 8


class RunDirConflict(ConfigError):
    """The run directory holds runs of another configuration, or an interrupted run."""


def claim(
    run: RunDir, config: SuiteConfig, resume: bool, overwrite: bool, write: bool = True
) -> dict[str, Any]:
    """Check that ``config`` may run in ``run`` (see the module docstring) and return the config data
    to write to its ``config.yaml``. Only with ``write`` (the first process of a multi-process run) is
    anything removed or written.

    Raises:
        RunDirConflict: another configuration's runs are there, or an interrupted run without ``resume``.
        OSError: the directory cannot be written (the message names it).
    """
    new = to_data(config)
    if overwrite:
        if write and run.exists():
            shutil.rmtree(run.path)
        return new
    if write:
        _writable(run)
    if not run.config.is_file():
        merged = new
    else:
        old = _normalised(run.read_config_data())
        differences = list(_differences(old, new))
        if differences:
            shown = "\n".join(
                f"  {key}: {a!r} in {run.config}, {b!r} now" for key, a, b in differences[:SHOWN]
            )
            more = f"\n  ... and {len(differences) - SHOWN} more" if len(differences) > SHOWN else ""
            raise RunDirConflict(
                f"{run.path} holds runs of another configuration:\n{shown}{more}\n"
                f"Run into a new directory (out=...), or add --overwrite to delete {run.path} and start over"
            )
        merged = _union(old, new)
    interrupted = [
        f"{label} (epoch {_epoch(files)})" for label, files in _runs(run, config) if files.interrupted()
    ]
    if interrupted and not resume:
        raise RunDirConflict(
            f"{run.path} holds interrupted runs: {', '.join(interrupted)}. Add --resume to continue them "
            "from their checkpoints, or --overwrite to start the whole directory over"
        )
    return merged


def verify_final(files: Any, digest: str) -> None:
    """Check that a finished run's ``final.pt`` loads and was written by this configuration.

    Raises:
        CheckpointError: unreadable or foreign; the message says how to redo that run.
    """
    fix = f"delete {files.path} (or rerun with --overwrite) to train it again"
    try:
        state = load_checkpoint(files.final, ["students", "config_hash"])
    except CheckpointError as e:
        raise CheckpointError(f"{str(e).split('. Delete')[0]}; {fix}") from None
    if state["config_hash"] != digest:
        raise CheckpointError(
            f"{files.final} was written by another configuration than its result.json says; {fix}"
        )


def _normalised(old: Mapping[str, Any]) -> Mapping[str, Any]:
    """A directory's config read through today's schema, so that a key added to relkd since it was
    written compares as its default instead of as a difference; as written if it no longer parses."""
    try:
        return to_data(from_data(SuiteConfig, old))
    except ConfigError:
        return old


def _writable(run: RunDir) -> None:
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        probe = run.path / ".relkd-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(
            f"cannot write to the run directory {run.path} ({e.strerror}); choose another out="
        ) from None


def _runs(run: RunDir, config: SuiteConfig) -> Iterator[tuple[str, Any]]:
    for name in used_teachers(config):
        yield (f"teacher {name}" if name != "teacher" else "teacher"), run.teacher(name)
    for method in config.methods:
        for seed in config.seeds:
            yield f"{method} seed {seed}", run.run(method, seed)


def _epoch(files: Any) -> str:
    try:
        return str(load_checkpoint(files.checkpoint).get("epoch", "?"))
    except CheckpointError:
        return "? (unreadable checkpoint)"


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` of every result-relevant difference; methods and teachers are
    compared where both configs have them (new ones are additions), seeds not at all."""
    skip = {*NEUTRAL, "methods", "seeds", "teachers"}
    for section in ("methods", "teachers"):
        for name in set(old.get(section) or {}) & set(new.get(section) or {}):
            yield from _compare(old[section][name], new[section][name], f"{section}.{name}")
    yield from _compare(
        {k: v for k, v in old.items() if k not in skip}, {k: v for k, v in new.items() if k not in skip}, ""
    )


def _compare(old: Any, new: Any, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    a, b = _flat(old, prefix), _flat(new, prefix)
    missing = object()
    for key in sorted(set(a) | set(b)):
        if a.get(key, missing) != b.get(key, missing):
            yield key, a.get(key, "(absent)"), b.get(key, "(absent)")


def _union(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(new)
    merged["methods"] = {**(old.get("methods") or {}), **(new.get("methods") or {})}
    merged["teachers"] = {**(old.get("teachers") or {}), **(new.get("teachers") or {})}
    merged["seeds"] = sorted(set(old.get("seeds") or []) | set(new.get("seeds") or []))
    return merged
