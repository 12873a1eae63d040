"""Checks that need the registries: names exist, options fit the constructors, stages fit the losses.

Everything a run would trip over later is found here, before a teacher trains for an hour: every
registered name (dataset, model, loss, optimiser, schedule, batch transform), every option against its
constructor's signature, every stage term against the method's losses and the loss's methods.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch

from relkd import data as datasets
from relkd import models
from relkd.config.schema import (
    DataConfig,
    MethodConfig,
    StageConfig,
    SuiteConfig,
    TeacherConfig,
    TrainConfig,
)
from relkd.config.validate import ConfigError, check_kwargs, check_value, join, unknown_key
from relkd.data.loaders import LOADERS
from relkd.losses import LOSSES
from relkd.methods import BATCH_TRANSFORMS, INJECTED, STEPS, TERM_KEYS
from relkd.optim import OPTIMIZERS, SCHEDULES
from relkd.registry import Registry, suggest

__all__ = ["check_suite"]

AMP = (None, "bf16", "fp16")
CLIP_RAMPS = (None, "sigmoid")
STAGE_BATCHES = ("train", "labelled_once")
MODALITIES = ("image", "text")
MODEL_ARGS_FROM_DATA = ("num_classes", "in_channels", "in_shape")
STAGE_TERM_KEYS = {"weight": float, "call": str, "network": str}
# component -> (its registry, the arguments the engine passes itself)
COMPONENTS = {
    "optimizer": (OPTIMIZERS, ("params",)),
    "schedule": (SCHEDULES, ("optimizer", "epochs")),
    "batch_transform": (BATCH_TRANSFORMS, ()),
}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_suite(config: SuiteConfig) -> None:
    """Raise :class:`ConfigError` naming the first problem found in ``config``."""
    if not config.seeds:
        raise ConfigError("seeds: give at least one seed, e.g. seeds: [0, 1, 2]")
    if any(s < 0 for s in config.seeds) or len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"seeds: expected distinct non-negative integers, got {config.seeds}")
    if config.amp not in AMP:
        raise ConfigError(f"amp: expected one of bf16, fp16 or null, got {config.amp!r}")
    if config.device != "auto":
        try:
            torch.device(config.device)
        except RuntimeError:
            raise ConfigError(
                f"device: {config.device!r} is not a device; use auto, cpu, cuda or cuda:N"
            ) from None
    if config.threads is not None and config.threads < 1:
        raise ConfigError(f"threads: expected a positive number of CPU threads or null, got {config.threads}")
    if config.probe_size < 3:
        raise ConfigError(
            f"probe_size: the agreement metrics need at least 3 images, got {config.probe_size}"
        )
    _check_data("data", config.data)
    if not config.students:
        raise ConfigError("student: missing; give the network to train, e.g. student: {model: lenet}")
    for name, student in config.students.items():
        _check_network_name(f"students.{name}", name)
        _check_model(f"students.{name}", student.model, student.args)
    _check_train("train", config.train)
    for name, teacher in config.teachers.items():
        _check_network_name(f"teachers.{name}", name)
        _check_teacher(f"teachers.{name}", teacher, config)
    if not config.methods:
        raise ConfigError("methods: no method to run; name at least one, e.g. methods: [baseline]")
    for name, method in config.methods.items():
        _check_method(f"methods.{name}", method, config)
    _check_evaluators("evaluate", config.evaluate)
    for loss in config.loss_args:
        if loss not in LOSSES:
            raise ConfigError(f"loss_args.{loss}: no such loss.{suggest(loss, LOSSES.available())}")


def _check_name(path: str, name: str, registry: Registry) -> Any:
    if name not in registry:
        raise ConfigError(
            f"{path}: unknown {registry.kind} {name!r}.{suggest(name.lower(), registry.available())} "
            f"Available: {', '.join(registry.available())}"
        )
    return registry.get(name)


def _check_component(path: str, spec: Mapping[str, Any], registry: Registry, skip: tuple[str, ...]) -> None:
    if "name" not in spec:
        raise ConfigError(
            f"{join(path, 'name')}: missing; name a {registry.kind} ({', '.join(registry.available())})"
        )
    fn = _check_name(join(path, "name"), check_value(join(path, "name"), spec["name"], str), registry)
    options = {k: v for k, v in spec.items() if k != "name"}
    for key in skip:
        if key in options:
            raise ConfigError(f"{join(path, key)}: set by the engine, not in the config")
    check_kwargs(path, options, fn)


def _check_optimizers(path: str, optimizers: Mapping[str, Any], main: Mapping[str, Any] | None) -> None:
    for module, options in optimizers.items():
        spec = dict(options or {})
        if "name" not in spec:
            spec["name"] = (main or {}).get("name", "sgd")
        _check_component(join(path, module), spec, *COMPONENTS["optimizer"])


def _check_data(path: str, data: DataConfig) -> None:
    constructor = _check_name(join(path, "name"), data.name, datasets.DATASETS)
    check_kwargs(join(path, "options"), data.options, constructor, skip=("root", "augment"))
    for key in ("root", "augment"):
        if key in data.options:
            raise ConfigError(f"{join(path, 'options')}.{key}: set it as {join(path, key)} instead")
    if data.unlabeled and data.train_subset is None:
        raise ConfigError(
            f"{join(path, 'unlabeled')}: the transfer set is the training images outside train_subset, "
            f"but {join(path, 'train_subset')} is null; set it to the number of labelled images"
        )
    if data.transfer_size is not None and data.transfer_size < 1:
        raise ConfigError(
            f"{join(path, 'transfer_size')}: expected a positive number of images, got {data.transfer_size}"
        )
    if data.loader not in LOADERS:
        raise ConfigError(
            f"{join(path, 'loader')}: unknown loader {data.loader!r}.{suggest(data.loader, LOADERS)} "
            f"Available: {', '.join(LOADERS)}"
        )
    if data.loader == "tensor" and data.name == "imagefolder":
        raise ConfigError(
            f"{join(path, 'loader')}: imagefolder is read from files, not held in memory; "
            "use auto or dataloader"
        )
    if data.num_workers < 0:
        raise ConfigError(f"{join(path, 'num_workers')}: expected >= 0 processes, got {data.num_workers}")
    for key in ("batch_size", "test_batch_size"):
        if getattr(data, key) < 1:
            raise ConfigError(
                f"{join(path, key)}: expected a positive number of images, got {getattr(data, key)}"
            )


def _check_model(path: str, name: str, args: Mapping[str, Any] | None = None) -> None:
    if not name:
        raise ConfigError(f"{path}.model: missing; name a model (`relkd list models`)")
    if name.startswith("torchvision:"):
        available = models.available("torchvision:*")
        if name not in available:
            raise ConfigError(
                f"{path}.model: unknown torchvision model {name!r}.{suggest(name, available)} "
                "`relkd list models` shows every model"
            )
        return
    if name not in models.MODELS:
        raise ConfigError(
            f"{path}.model: unknown model {name!r}.{suggest(name.lower(), models.MODELS.available())} "
            "`relkd list models` shows every model; torchvision models are named torchvision:<name>"
        )
    if args:
        check_kwargs(f"{path}.args", args, models.MODELS.get(name), skip=MODEL_ARGS_FROM_DATA)


def _check_network_name(path: str, name: str) -> None:
    if not _IDENTIFIER.match(name) or name in ("loss", "steps"):
        raise ConfigError(
            f"{path}: a network name is a Python identifier (letters, digits, _) other than 'loss' and "
            f"'steps', got {name!r}"
        )


def _check_teacher(path: str, teacher: TeacherConfig, config: SuiteConfig) -> None:
    _check_model(path, teacher.model, teacher.args)
    _check_data(f"{path}.data", teacher.data)
    _check_train(f"{path}.train", teacher.train)
    if teacher.method is not None:
        _check_method(f"{path}.method", teacher.method, config, trains_teacher=True)


def _check_evaluators(path: str, evaluators: Mapping[str, Any]) -> None:
    from relkd.evaluation import EVALUATORS

    for name, options in evaluators.items():
        fn = _check_name(join(path, name), name, EVALUATORS)
        check_kwargs(join(path, name), options or {}, fn)


def _check_train(path: str, train: TrainConfig) -> None:
    if train.epochs < 0 or train.warmup_epochs < 0:
        raise ConfigError(
            f"{path}: epochs and warmup_epochs must be >= 0, got {train.epochs}, {train.warmup_epochs}"
        )
    for key, (registry, filled_in) in COMPONENTS.items():
        _check_component(join(path, key), getattr(train, key), registry, filled_in)
    _check_optimizers(join(path, "optimizers"), train.optimizers, train.optimizer)
    if train.clip_to_ce_ramp not in CLIP_RAMPS:
        raise ConfigError(
            f"{path}.clip_to_ce_ramp: expected one of {', '.join(map(str, CLIP_RAMPS))}, "
            f"got {train.clip_to_ce_ramp!r}"
        )
    if train.compile:
        _check_compile(join(path, "compile"))


def _check_compile(path: str) -> None:
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            f"{path}: torch.compile is not supported with this Python and torch ({torch.__version__}); "
            "set it to false"
        )


def _check_method(path: str, method: MethodConfig, config: SuiteConfig, trains_teacher: bool = False) -> None:
    _check_train(join(path, "train"), method.train)
    if method.modality not in MODALITIES:
        raise ConfigError(
            f"{path}.modality: expected one of {', '.join(MODALITIES)}, got {method.modality!r}"
        )
    _check_component(join(path, "step"), method.step, STEPS, ())
    students = ["teacher"] if trains_teacher else list(method.students or {})
    teachers = [] if trains_teacher else list(method.teachers or {})
    for name, student in ({} if trains_teacher else method.students or {}).items():
        _check_network_name(f"{path}.students.{name}", name)
        _check_model(f"{path}.students.{name}", student.model, student.args)
    for name in teachers:
        _check_network_name(f"{path}.teachers.{name}", name)
    clash = set(students) & set(teachers)
    if clash:
        raise ConfigError(f"{path}: {sorted(clash)[0]!r} names a student and a teacher; rename one")
    for name in method.deploy or []:
        if name not in students:
            raise ConfigError(
                f"{path}.deploy: {name!r} is not a student of the method.{suggest(name, students)} "
                f"Its students: {', '.join(students)}"
            )
    _check_evaluators(join(path, "evaluate"), method.evaluate)
    classes = {}
    for term, options in method.losses.items():
        tpath = f"{path}.losses.{term}"
        if not _IDENTIFIER.match(term) or term == "ce":
            raise ConfigError(
                f"{tpath}: a term name is a Python identifier (letters, digits, _) other than 'ce', "
                f"got {term!r}"
            )
        loss_name = check_value(join(tpath, "loss"), options.get("loss", term), str)
        if loss_name not in LOSSES:
            hint = suggest(loss_name, LOSSES.available()) or f" Registered: {', '.join(LOSSES.available())}."
            raise ConfigError(f"{tpath}: no registered loss {loss_name!r}.{hint} Set 'loss:' to name one.")
        cls = LOSSES.get(loss_name)
        if cls.needs_teacher and not teachers and "teacher" not in options:
            raise ConfigError(
                f"{tpath}: the loss {loss_name!r} needs a teacher, but the method has none "
                "(teacher: null, or the method's teachers: [])"
            )
        classes[term] = cls
        for key, tp in TERM_KEYS.items():
            if key in options:
                check_value(join(tpath, key), options[key], tp)
        for role, known in (("student", students), ("teacher", teachers)):
            if options.get(role) is not None and options[role] not in known:
                raise ConfigError(
                    f"{tpath}.{role}: {options[role]!r} is not a {role} of the method."
                    f"{suggest(options[role], known)} Its {role}s: {', '.join(known) or 'none'}"
                )
        kwargs = {k: v for k, v in options.items() if k not in TERM_KEYS}
        check_kwargs(tpath, kwargs, cls, skip=INJECTED + tuple(TERM_KEYS))
        _check_taps(join(tpath, "taps"), options.get("taps"), cls)
    for i, stage in enumerate(method.stages or []):
        _check_stage(f"{path}.stages.{i}", stage, classes, students + teachers)


def _check_taps(path: str, taps: Any, cls: type) -> None:
    if taps is None or isinstance(taps, list):
        return
    if set(taps) - {"student", "teacher"}:
        raise unknown_key(path, next(iter(set(taps) - {"student", "teacher"})), ["student", "teacher"])
    lengths = {len(v) for v in taps.values()} | {len(cls.taps)}
    if len(lengths) != 1:
        raise ConfigError(
            f"{path}: {cls.__name__} reads {len(cls.taps)} taps {tuple(cls.taps)}; give that many for the "
            f"student and the teacher, got {taps}"
        )


def _check_stage(path: str, stage: StageConfig, classes: Mapping[str, type], networks: list[str]) -> None:
    if stage.epochs is not None and stage.epochs < 0:
        raise ConfigError(f"{path}.epochs: expected >= 0, got {stage.epochs}")
    terms = stage.terms if isinstance(stage.terms, Mapping) else dict.fromkeys(stage.terms or [])
    for term, use in terms.items():
        tpath = f"{path}.terms.{term}"
        if term not in classes:
            hint = suggest(term, classes) or f" The method's terms: {', '.join(classes) or 'none'}."
            raise ConfigError(f"{tpath}: not a term of the method's losses.{hint}")
        use = use or {}
        for key, value in use.items():
            if key not in STAGE_TERM_KEYS:
                raise unknown_key(tpath, key, list(STAGE_TERM_KEYS))
            check_value(join(tpath, key), value, STAGE_TERM_KEYS[key])
        network = use.get("network")
        if network is not None and network not in networks:
            raise ConfigError(
                f"{tpath}.network: {network!r} is not a network of the method.{suggest(network, networks)} "
                f"Its networks: {', '.join(networks)}"
            )
        call = use.get("call")
        if call is not None and not callable(getattr(classes[term], call, None)):
            methods = [n for n, _ in inspect.getmembers(classes[term], callable) if not n.startswith("_")]
            raise ConfigError(
                f"{tpath}.call: {classes[term].__name__} has no method {call!r}.{suggest(call, methods)}"
            )
    for key in ("optimizer", "schedule"):
        if getattr(stage, key) is not None:
            _check_component(join(path, key), getattr(stage, key), *COMPONENTS[key])
    if stage.optimizers is not None:
        _check_optimizers(join(path, "optimizers"), stage.optimizers, stage.optimizer)
    if stage.step is not None:
        _check_component(join(path, "step"), stage.step, STEPS, ())
    if stage.batches not in STAGE_BATCHES:
        raise ConfigError(
            f"{path}.batches: expected one of {', '.join(STAGE_BATCHES)}, got {stage.batches!r}"
            f"{suggest(stage.batches, STAGE_BATCHES)}"
        )
