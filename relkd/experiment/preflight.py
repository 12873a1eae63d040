"""Check a suite before anything trains: every network built, every tap, term, step and path resolved.

The config checks (:mod:`relkd.config.checks`) see names and types; what only the networks can tell
(a tap path that is not in the model, model arguments the constructor rejects, a stage path into a loss
that has no such part, a step option the step does not take) is found here by building every network
and every loss on PyTorch's ``meta`` device (shapes without memory or arithmetic) and running one
forward pass on a batch of the dataset's shape. It takes seconds, so a misspelled tap fails before a
teacher trains for an hour.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from relkd.config import ConfigError, MethodConfig, SuiteConfig
from relkd.data import DataBundle
from relkd.experiment.setup import build_model, load_bundle, used_teachers
from relkd.methods import STEPS, build_step, build_term, parse_terms, tap_names
from relkd.models import FeatureTaps, resolve_taps
from relkd.optim import build_optimizer, build_schedule
from relkd.train.stages import build_stages, find_method, resolve_paths

__all__ = ["preflight"]

META = torch.device("meta")


def preflight(config: SuiteConfig) -> None:
    """Raise :class:`ConfigError` naming the key of the first problem found (see the module docstring).

    The datasets are loaded (they are needed anyway, and a missing one fails here with its own message).
    """
    bundle = load_bundle(config.data, config.seeds[0])
    teachers: dict[str, nn.Module] = {}
    for name in used_teachers(config):
        spec = config.teachers[name]
        path = f"teachers.{name}"
        t_bundle = load_bundle(spec.data, spec.seed)
        teachers[name] = _network(lambda s=spec, b=t_bundle: build_model(s, b), path, t_bundle)
        if spec.method is not None:
            net = {"teacher": copy.deepcopy(teachers[name]).train()}
            _method(f"{path}.method", spec.method, net, {}, t_bundle)
    for name, method in config.methods.items():
        path = f"methods.{name}"
        students = {
            net: _network(lambda s=spec: build_model(s, bundle), f"{path}.students.{net}", bundle)
            for net, spec in (method.students or {}).items()
        }
        nets = {net: copy.deepcopy(teachers[suite]) for net, suite in (method.teachers or {}).items()}
        _method(path, method, students, nets, bundle)


def _example(bundle: DataBundle) -> torch.Tensor:
    """Two inputs of the data set's shape and type (images, token ids ...), on the meta device."""
    first = bundle.test[0]["input"]
    return torch.zeros(2, *first.shape, dtype=first.dtype, device=META)


def _network(build: Callable[[], nn.Module], path: str, bundle: DataBundle) -> nn.Module:
    try:
        with META:
            network = build()
        network(_example(bundle))
    except Exception as e:  # any constructor or forward error is a problem of the config's model
        raise ConfigError(
            f"{path}: the network cannot be built or run on this data set's inputs: {_why(e)}"
        ) from e
    return network


def _method(
    path: str,
    method: MethodConfig,
    students: Mapping[str, nn.Module],
    teachers: Mapping[str, nn.Module],
    bundle: DataBundle,
) -> None:
    try:
        specs = parse_terms(method.losses, list(students), list(teachers))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{path}.losses: {_why(e)}") from None
    stages = build_stages(method.stages, method.train, {t: s.weight for t, s in specs.items()}, method.step)
    networks = {**students, **teachers}
    taps = tap_names(specs, stages, list(students), list(teachers))
    for stage in stages:
        for name in taps:
            taps[name] += [
                t for t in STEPS.get(stage.step["name"]).taps if t != "logits" and t not in taps[name]
            ]
    features: dict[str, dict[str, Any]] = {}
    for name, network in networks.items():
        try:
            resolved = resolve_taps(network, taps[name])
        except KeyError as e:
            raise ConfigError(f"{path}: the taps of network {name!r}: {_why(e)}") from None
        with FeatureTaps(network, resolved) as hooked:
            logits = network(_example(bundle))
            features[name] = {**hooked.features, "logits": logits}
    for term, spec in specs.items():
        given = spec.options.get("num_data")
        if given is not None and given < bundle.num_train:
            raise ConfigError(
                f"{path}.losses.{term}.num_data: {given} is smaller than the training set "
                f"({bundle.num_train} images), whose indices address its memory bank; leave num_data out "
                "(it is filled in)"
            )
    root = nn.ModuleDict({**networks, "loss": nn.ModuleDict(), "steps": nn.ModuleList()})
    targets = torch.zeros(bundle.num_train, dtype=torch.long, device=META)
    for term, spec in specs.items():
        where = f"{path}.losses.{term}"
        t_features = None if spec.teacher is None else features[spec.teacher]
        try:
            with META:
                root["loss"][term] = build_term(
                    spec, features[spec.student], t_features, bundle.num_train, targets, bundle.num_classes
                ).module
        except (NotImplementedError, RuntimeError):
            # a constructor that computes on data (not only shapes): its parts are checked when it runs
            root["loss"][term] = nn.Module()
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{where}: the loss cannot be built on these features: {_why(e)}") from None
    start = 0
    for index, stage in enumerate(stages):
        where = f"{path}.stages.{index}" if method.stages else path
        _optimizers(where if method.stages else f"{path}.train", stage)
        try:
            with META:
                root["steps"].append(
                    build_step(
                        stage.step,
                        students=list(students),
                        teachers=list(teachers),
                        features=features,
                        num_classes=bundle.num_classes,
                        terms=specs,
                        stage=stage.info(index, start),
                    )  # fmt: skip
                )
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{where}.step: {_why(e)}") from None
        start += stage.epochs

        def spec_of(network: str, tap: str) -> str:
            return resolve_taps(networks[network], [tap])[tap]

        try:
            resolve_paths(root, stage.frozen, f"{where}.frozen", _example(bundle), spec_of)
            if stage.trainable:
                resolve_paths(root, stage.trainable, f"{where}.trainable", _example(bundle), spec_of)
            for key in ("after", "after_epoch"):
                for call in getattr(stage, key):
                    if not _inside_placeholder(root, call):
                        find_method(root, call, f"{where}.{key}")
        except (KeyError, ValueError) as e:
            raise ConfigError(_why(e)) from None


def _optimizers(path: str, stage: Any) -> None:
    """Build the stage's optimisers and schedule on a stand-in parameter: bad values (a negative learning
    rate, betas out of range ...) fail now, with the key, rather than after a teacher has trained."""
    probe = [nn.Parameter(torch.zeros(1))]
    for key, spec in [("optimizer", stage.optimizer), *((f"optimizers.{k}", {**stage.optimizer, **v})
                      for k, v in stage.optimizers.items())]:  # fmt: skip
        try:
            optimizer = build_optimizer(probe, spec)
            build_schedule(optimizer, stage.schedule, max(stage.epochs, 1), stage.warmup_epochs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path}.{key}: {_why(e)}") from None


def _inside_placeholder(root: nn.Module, call: str) -> bool:
    """Whether ``call`` reaches into a loss that could not be built on the meta device."""
    parts = call.split("(")[0].split(".")
    if len(parts) < 2 or parts[0] != "loss" or parts[1] not in root["loss"]:
        return False
    return type(root["loss"][parts[1]]) is nn.Module


def _why(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return str(text).splitlines()[0] if text else type(e).__name__
