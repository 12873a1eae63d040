"""The engine: train a method's networks through its stages, one registered step per batch.

A run has named networks: students (trained) and teachers (frozen, in eval mode throughout). Each
stage names a step (:mod:`relkd.methods`; the default, ``weighted_sum``, is ``ce_weight * CE + sum_i
weight_i * term_i`` over the stage's loss terms) that receives a :class:`relkd.methods.StepContext` and
returns the logits its training accuracy is read from and its named losses. The engine never names a
method. Everything trainable lives in one module tree (``engine.root``): the networks by name, the loss
modules under ``loss`` and each stage's step under ``steps.<stage index>``, which is what stage paths
(``trainable``, ``frozen``, ``after``) refer to.

Without ``manual`` steps the engine sums the step's losses, backpropagates once (with the KD-SVD/MHGD
authors' clip-to-CE rule where the recipe asks for it), clips and steps the optimiser; a ``manual``
step calls :meth:`relkd.methods.StepContext.update` itself, as often as it needs.

Every epoch ends with a test evaluation of each deployed network (the method says which it deploys:
by default every student), a metrics row, one INFO line on the ``relkd`` logger and a checkpoint
(``checkpoint.pt``) holding all that is needed to continue: networks, loss and step modules (their
buffers too, e.g. memory banks), optimiser, schedule, gradient scaler, RNG states, epoch and stage.
``fit(resume=True)`` continues from it; on the CPU the resumed run ends with the same weights, bit for
bit, as an uninterrupted one. A non-finite loss stops the run with :class:`NonFiniteLossError` naming
the loss and the step, and leaves the last checkpoint (the last good epoch) as it was. At the end the
run's evaluators (robust accuracy, retrieval ...) measure each deployed network once.

Under ``torchrun`` (a process group of ``W > 1`` ranks, see :mod:`relkd.train.parallel`) every rank runs
the same engine on its shard of each batch, following :mod:`relkd.distributed`: where the step allows it
(``ddp_wrap``: the default step in a stage with a cross-entropy and without ``clip_to_ce``) the students
are wrapped in ``DistributedDataParallel`` for that stage; every other gradient is averaged over ranks
after the backward with :func:`relkd.distributed.average_gradients`. With ``clip_to_ce`` the
cross-entropy and distillation gradients are averaged separately before the rule compares them. Test
accuracy is counted on shards of the test set and summed; the epoch's loss means are averaged over
ranks. A step whose batch every rank holds whole (an epoch's last batch that ``W`` does not divide) is
computed alike on every rank with global relations off; BatchNorm layers of trained modules use the
global batch's statistics (``sync_bn``); a non-finite term on any rank stops every rank at the same
check. Rank 0 alone writes metrics, checkpoints and results and shows progress.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from relkd import _quiet_inductor
from relkd import distributed as D
from relkd.evaluation import EvalContext
from relkd.evaluation.robust import PixelSpace
from relkd.methods import (
    STEPS,
    LossTerm,
    Step,
    StepContext,
    StepOutput,
    TermSpec,
    build_step,
    build_term,
    build_transform,
    sigmoid,
    tap_names,
)
from relkd.models import FeatureTaps, default_taps, resolve_taps
from relkd.optim import build_optimizer, build_schedule
from relkd.train.backward import backward, clips_to_ce
from relkd.train.batches import TrainBatches
from relkd.train.checkpoint import load_checkpoint, load_state, save_checkpoint
from relkd.train.evaluate import agreement_metrics, evaluate
from relkd.train.files import RunFiles
from relkd.train.metrics import MetricsLog
from relkd.train.parallel import assemble, replicated_step, use_global_batchnorm
from relkd.train.seeding import rng_state, set_rng_state
from relkd.train.stages import Stage, find_method, resolve_paths, stage_parameters
from relkd.train.tally import EpochTally, NonFiniteLossError

__all__ = ["FORMAT", "Engine", "NonFiniteLossError"]

log = logging.getLogger("relkd")

FORMAT = "relkd-2"
LOSS, STEP_MODULES = "loss", "steps"
RESERVED = (LOSS, STEP_MODULES)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_KEYS = (
    "format", "config_hash", "epoch", "stage", "students", "losses", "steps", "optimizer", "scheduler",
    "scaler", "rng", "best", "wall_time_s",
)  # fmt: skip
NO_BEST = {"acc1": -1.0, "acc5": 0.0, "epoch": 0}


@dataclass
class _Active:
    """The running stage: its index, optimiser, schedule, step and what it runs."""

    index: int
    stage: Stage
    start: int
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    params: list[nn.Parameter]
    transform: Callable[[dict[str, Tensor], Any], dict[str, Tensor]]
    step: Step
    frozen: list[nn.Module]
    grad_flags: dict[int, bool]
    networks: dict[str, nn.Module]
    synced: set[int]


class Engine:
    """Train ``students`` through ``stages``, with frozen ``teachers``.

    Args:
        students: trainable networks by name (usually ``{"student": net}``; a teacher is trained as
            the only student of its own run).
        stages: the run's stages, in order (:func:`relkd.train.build_stages`).
        batches: the training batches of each epoch.
        test_loader: evaluation batches (``{"input", "target"}``).
        run_dir: where checkpoints and metrics go.
        teachers: frozen networks by name (usually ``{"teacher": net}``), in eval mode throughout.
        terms: the method's term specs; the engine builds their losses, filling in sizes measured on
            ``probe``.
        deploy: the networks that are the method's result (tested each epoch, in result.json and the
            tables); default the step's choice, else every student.
        evaluators: called once at the end on each deployed network with an
            :class:`relkd.evaluation.EvalContext`, returning ``{metric: value}``.
        eval_loaders: evaluation data by split for the evaluators (``test`` is ``test_loader``
            unless given; ``train``: the training images without augmentation).
        num_data, targets: size and labels of the full training set (for losses that ask).
        num_classes: number of classes (for steps that ask).
        probe: a fixed batch of test inputs: sizes the losses and steps and measures agreement.
        device: where everything runs.
        amp: ``"bf16"`` or ``"fp16"`` autocast on CUDA (ignored elsewhere, with a warning).
        log_agreement: log student-teacher agreement of the penultimate embeddings each epoch.
        quiet: no progress bars (they are also off when stderr is not a terminal).
        tensorboard: also log to TensorBoard when it is installed.
        config_hash: stored in checkpoints; resuming from another config's checkpoint is an error.
        info: extra fields for ``result.json`` (method, seed ...).
        label: the name in progress bars and log lines (default: the run directory's).
        sync_bn: BatchNorm of the students, losses and steps over the global batch under data
            parallelism (:func:`relkd.train.parallel.use_global_batchnorm`); None: whenever ``W > 1``
            and one of them has BatchNorm.
        compile: ``train.compile``: the steps call the networks compiled (``torch.compile``, shapes
            specialised) and the loss modules are compiled in place (:func:`relkd.compile`); state-dict
            keys, checkpoints, feature hooks and the step protocol stay as they are.
    """

    def __init__(
        self,
        students: Mapping[str, nn.Module],
        stages: Sequence[Stage],
        batches: TrainBatches,
        test_loader: Any,
        run_dir: str | Path | RunFiles,
        *,
        teachers: Mapping[str, nn.Module] | None = None,
        terms: Mapping[str, TermSpec] | None = None,
        deploy: Sequence[str] | None = None,
        evaluators: Mapping[str, Callable[[EvalContext], Mapping[str, float]]] | None = None,
        eval_loaders: Mapping[str, Any] | None = None,
        num_data: int = 0,
        targets: Tensor | None = None,
        num_classes: int | None = None,
        probe: Tensor,
        device: torch.device | str = "cpu",
        amp: str | None = None,
        log_agreement: bool = True,
        quiet: bool = False,
        tensorboard: bool = True,
        config_hash: str = "",
        info: Mapping[str, Any] | None = None,
        label: str = "",
        sync_bn: bool | None = None,
        compile: bool = False,
    ) -> None:
        teachers = dict(teachers or {})
        terms = dict(terms or {})
        if not students:
            raise ValueError("the engine needs at least one student network to train")
        names = [*students, *teachers]
        clash = {n for n in names if names.count(n) > 1} | (set(RESERVED) & set(names))
        if clash:
            raise ValueError(
                f"network names must be distinct and not {' or '.join(map(repr, RESERVED))}, got "
                f"{sorted(clash)}"
            )
        self.device = torch.device(device)
        self.students, self.teachers = list(students), list(teachers)
        self.stages, self.batches, self.test_loader = list(stages), batches, test_loader
        if not self.stages:
            raise ValueError("the engine needs at least one stage")
        self.starts = [sum(s.epochs for s in self.stages[:i]) for i in range(len(self.stages) + 1)]
        self.files = run_dir if isinstance(run_dir, RunFiles) else RunFiles(Path(run_dir))
        self.config_hash, self.info, self.quiet = config_hash, dict(info or {}), quiet
        self.label = label or self.files.path.name
        self.tensorboard = tensorboard
        self.evaluators = dict(evaluators or {})
        self.eval_loaders = {"test": test_loader, **dict(eval_loaders or {})}
        self.root = nn.ModuleDict(
            {**students, **teachers, LOSS: nn.ModuleDict(), STEP_MODULES: nn.ModuleList()}
        ).to(self.device)
        for name in teachers:
            self.root[name].eval().requires_grad_(False)
        self._check_uses(terms)
        self._autocast, self.scaler = self._amp(amp)
        step_classes = [STEPS.get(stage.step["name"]) for stage in self.stages]
        self.deploy = self._deployed(deploy, step_classes[-1])
        taps = tap_names(terms, self.stages, self.students, self.teachers)
        for cls in step_classes:
            for name in taps:
                taps[name] = list(dict.fromkeys([*taps[name], *(t for t in cls.taps if t != "logits")]))
        pair = (self.deploy[0], self.teachers[0]) if self.teachers else ()
        # Agreement compares the penultimate embeddings; a network without that tap simply has none.
        agreement = (
            bool(pair) and log_agreement and all("penultimate" in default_taps(self.root[n]) for n in pair)
        )
        for name in pair if agreement else ():
            taps[name] = list(dict.fromkeys([*taps[name], "penultimate"]))
        self.taps = {
            name: FeatureTaps(self.root[name], self._resolve(name, names)) for name, names in taps.items()
        }
        self.probe = probe
        features = self._probe_features(probe)
        self.terms: dict[str, LossTerm] = {}
        for name, spec in terms.items():
            t_features = None if spec.teacher is None else features[spec.teacher]
            self.terms[name] = build_term(
                spec, features[spec.student], t_features, num_data, _targets(targets, num_data), num_classes
            )
            self.root[LOSS][name] = self.terms[name].module.to(self.device)
        for index, (stage, cls) in enumerate(zip(self.stages, step_classes, strict=True)):
            step = build_step(
                stage.step,
                students=self.students,
                teachers=self.teachers,
                features=features,
                num_classes=num_classes,
                terms=terms,
                stage=stage.info(index, self.starts[index]),
                pixels=PixelSpace.of(test_loader),
            )
            if not isinstance(step, cls):
                raise TypeError(f"step {stage.step['name']!r} built a {type(step).__name__}, not a Step")
            self.root[STEP_MODULES].append(step.to(self.device))
        self.agreement = agreement and _agreement_available()
        trained = [self.root[n] for n in self.students] + [self.root[LOSS], self.root[STEP_MODULES]]
        self.sync_bn = use_global_batchnorm(trained, sync_bn)
        self.compile = compile
        if compile:
            # A suite builds new networks for every run: the graphs compiled for the previous run's
            # modules (guarded on their identity) are of no further use, and counting them towards
            # dynamo's recompile limit would silently turn this run's compilation off.
            torch._dynamo.reset()
            _quiet_inductor()
        # The steps call compiled wrappers of the networks (evaluation and the probe call the networks
        # themselves, so they add no compilation); loss modules are compiled in place.
        self._compiled = (
            {n: _compiled(self.root[n]) for n in self.students + self.teachers} if compile else {}
        )
        for module in self.root[LOSS].values() if compile else ():
            _compiled(module, in_place=True)

    # --- setup -------------------------------------------------------------------------------------

    def _deployed(self, deploy: Sequence[str] | None, step: type[Step]) -> list[str]:
        chosen = list(deploy) if deploy else list(step.deploy or self.students)
        unknown = [n for n in chosen if n not in self.students]
        if unknown:
            raise KeyError(
                f"deploy: {unknown[0]!r} is not a student of this run; the students are "
                f"{', '.join(self.students)}"
            )
        return chosen

    def _check_uses(self, terms: Mapping[str, TermSpec]) -> None:
        networks = set(self.students) | set(self.teachers)
        for stage in self.stages:
            for use in stage.uses:
                if use.term not in terms:
                    raise KeyError(
                        f"stage {stage.name!r} uses term {use.term!r}, which is not among the losses"
                    )
                if use.network is not None and use.network not in networks:
                    raise KeyError(
                        f"stage {stage.name!r}, term {use.term!r}: 'network: {use.network}' names no network"
                    )

    def _amp(self, amp: str | None) -> tuple[Callable[[], Any], torch.amp.GradScaler]:
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
        enabled = amp is not None and self.device.type == "cuda"
        if amp is not None and not enabled:
            warnings.warn(
                f"amp={amp!r} needs a CUDA device; training in float32 on {self.device}", stacklevel=3
            )
        dtype = AMP_DTYPES.get(amp or "bf16")

        def autocast() -> Any:
            return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

        return autocast, torch.amp.GradScaler(self.device.type, enabled=enabled and amp == "fp16")

    def _resolve(self, network: str, names: Sequence[str]) -> dict[str, str]:
        try:
            return resolve_taps(self.root[network], names)
        except KeyError as e:
            raise KeyError(f"{network}: {e.args[0]}") from None

    def _tap_spec(self, network: str, name: str) -> str:
        return self._resolve(network, [name])[name]

    def _probe_features(self, probe: Tensor) -> dict[str, dict[str, Any]]:
        modes = {n: self.root[n].training for n in self.students + self.teachers}
        features: dict[str, dict[str, Any]] = {}
        for n in modes:
            self.root[n].eval()
        with self._autocast(), torch.no_grad():
            for name in self.teachers + self.students:
                logits = self.root[name](probe)
                taps = self.taps.get(name)
                features[name] = {**(taps.features if taps is not None else {}), "logits": logits}
        for n, mode in modes.items():
            self.root[n].train(mode)
        return features

    # --- stages ------------------------------------------------------------------------------------

    def _begin(self, index: int, state: Mapping[str, Any] | None) -> _Active:
        stage = self.stages[index]
        where = f"stage {stage.name!r} frozen"
        frozen = resolve_paths(self.root, stage.frozen, where, self.probe, self._tap_spec)
        grad_flags = {id(p): p.requires_grad for p in self.root.parameters()}
        for module in frozen:
            module.requires_grad_(False)
        params = stage_parameters(
            self.root, stage, [*self.students, LOSS, STEP_MODULES], self.probe, self._tap_spec
        )
        optimizers, schedulers = {}, {}
        if params or stage.trainable != []:
            groups = self._optimizer_groups(stage, params)
            for name, (group, spec) in groups.items():
                optimizers[name] = build_optimizer(group, spec)
                schedulers[name] = build_schedule(
                    optimizers[name], stage.schedule, stage.epochs, stage.warmup_epochs
                )
            if state is not None:
                for name in optimizers:
                    optimizers[name].load_state_dict(state["optimizer"][name])
                    schedulers[name].load_state_dict(state["scheduler"][name])
        step = self.root[STEP_MODULES][index]
        transform = build_transform(stage.batch_transform)
        networks, synced = self._wrap(stage, step)
        return _Active(
            index, stage, self.starts[index], optimizers, schedulers, params, transform, step, frozen,
            grad_flags, networks, synced,
        )  # fmt: skip

    def _optimizer_groups(
        self, stage: Stage, params: list[nn.Parameter]
    ) -> dict[str, tuple[list[nn.Parameter], dict[str, Any]]]:
        """``{name: (parameters, optimiser spec)}``: the stage's ``optimizers`` paths each take their
        parameters out of the main optimiser (``main``) into an optimiser of their own, whose spec is the
        main one with the path's options merged in (another ``name`` starts from that optimiser's
        defaults)."""
        taken: set[int] = set()
        groups: dict[str, tuple[list[nn.Parameter], dict[str, Any]]] = {}
        wanted = {id(p) for p in params}
        for path, options in stage.optimizers.items():
            modules = resolve_paths(
                self.root, [path], f"stage {stage.name!r} optimizers", self.probe, self._tap_spec
            )
            group = [p for m in modules for p in m.parameters() if id(p) in wanted and id(p) not in taken]
            if not group:
                raise ValueError(
                    f"stage {stage.name!r} optimizers: {path!r} holds no parameter the stage trains"
                )
            taken |= {id(p) for p in group}
            same = options.get("name", stage.optimizer["name"]) == stage.optimizer["name"]
            groups[path] = (group, {**stage.optimizer, **options} if same else dict(options))
        main = [p for p in params if id(p) not in taken]
        return {"main": (main, dict(stage.optimizer)), **groups} if main else groups

    def _wrap(self, stage: Stage, step: Step) -> tuple[dict[str, nn.Module], set[int]]:
        """The networks the steps call, students in DDP where it applies, and the ids of the
        parameters DDP averages (the engine averages the rest itself)."""
        networks = {n: self._compiled.get(n, self.root[n]) for n in self.students + self.teachers}
        # DDP waits for a gradient of every parameter that reaches its output; only the cross-entropy
        # guarantees one, and clip_to_ce's autograd.grad bypasses DDP's hooks altogether.
        if not (D.is_distributed() and step.ddp_wrap and stage.ce_weight and not stage.clip_to_ce):
            return networks, set()
        synced = set()
        ids = [self.device.index] if self.device.type == "cuda" else None
        for name in self.students:
            trainable = [p for p in self.root[name].parameters() if p.requires_grad]
            if trainable:
                networks[name] = DistributedDataParallel(
                    self.root[name], device_ids=ids, find_unused_parameters=True
                )
                if self.compile:
                    networks[name] = _compiled(networks[name])
                synced |= {id(p) for p in trainable}
        return networks, synced

    def _end(self, active: _Active) -> None:
        active.networks.clear()  # drops the DDP wrappers and their gradient hooks
        for p in self.root.parameters():
            p.requires_grad_(active.grad_flags.get(id(p), p.requires_grad))
        for path in active.stage.after:
            find_method(self.root, path, f"stage {active.stage.name!r} after")()

    def _set_modes(self, active: _Active) -> None:
        for name in self.students:
            self.root[name].train()
        self.root[LOSS].train()
        self.root[STEP_MODULES].train()
        for module in active.frozen:
            module.eval()

    # --- the loop ----------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train every stage to the end and return the result (also written to ``result.json``).

        Call it once: it removes its feature hooks from the networks when it returns.

        Args:
            resume: continue from ``run_dir/checkpoint.pt`` if it exists (else start afresh).

        Raises:
            NonFiniteLossError: a loss was NaN or infinite.
            CheckpointError: the checkpoint cannot be read or does not fit this run.
        """
        main = D.is_main_process()
        metrics_log = MetricsLog(self.files, self.tensorboard, enabled=main)
        path = self.files.checkpoint
        done, wall, state = 0, 0.0, None
        best = {n: dict(NO_BEST) for n in self.deploy}
        if resume and path.is_file():
            state = self._restore(path)
            done, best, wall = (
                state["epoch"],
                {n: dict(b) for n, b in state["best"].items()},
                state["wall_time_s"],
            )
            metrics_log.resume(done)
        else:
            metrics_log.start()
        total = self.starts[-1]
        last: dict[str, tuple[float, float]] = {}
        active = None
        try:
            for epoch in range(done, total):
                index = max(i for i in range(len(self.stages)) if self.starts[i] <= epoch)
                if active is None:
                    same = state is not None and state["stage"] == index and epoch > self.starts[index]
                    active = self._begin(index, state if same else None)
                t0 = time.perf_counter()
                row = self._train_epoch(epoch, total, active, path)
                for scheduler in active.schedulers.values():
                    scheduler.step()
                for call in active.stage.after_epoch:
                    find_method(self.root, call, f"stage {active.stage.name!r} after_epoch")()
                stage_done = epoch + 1 == self.starts[index + 1]
                if stage_done:  # before the evaluation: an `after` call may change what is deployed
                    self._end(active)
                last = self._evaluate(row, best, epoch)
                row["epoch_time_s"] = time.perf_counter() - t0
                wall += row["epoch_time_s"]
                metrics_log.log(row)
                if main:
                    self._log_epoch(row, total)
                    # After a stage's last epoch the next stage starts with a fresh optimiser.
                    self._save(path, epoch + 1, best, wall, row, None if stage_done else active)
                if stage_done:
                    active = None
            result = self._finish(best, last, wall, total)
            D.barrier()  # the files are written before any rank reads them
            return result
        finally:
            if active is not None:
                active.networks.clear()
            metrics_log.close()
            for taps in self.taps.values():
                taps.remove()

    def _train_epoch(self, epoch: int, total_epochs: int, active: _Active, path: Path) -> dict[str, Any]:
        stage = active.stage
        self._set_modes(active)
        tally: EpochTally | None = None
        distill = bool(stage.uses) or not isinstance(active.step, _default_step())
        if stage.batches == "labelled_once":
            if "train" not in self.eval_loaders:
                raise ValueError(
                    f"stage {stage.name!r} reads the labelled images once (batches: labelled_once), but the "
                    "engine was given no eval_loaders['train']"
                )
            loader = self.eval_loaders["train"]
            steps, epoch_batches = len(loader), iter(loader)
        else:
            steps, epoch_batches = len(self.batches), self.batches.epoch(epoch, with_transfer=distill)
        check_every = 1 if self.device.type == "cpu" else 25
        bar = tqdm(
            total=steps,
            desc=f"{self.label} {epoch + 1}/{total_epochs}",
            disable=self.quiet or not sys.stderr.isatty() or not D.is_main_process(),
            leave=False,
        )
        first = next(iter(active.optimizers.values()), None)
        lr = first.param_groups[0]["lr"] if first is not None else 0.0
        ramp = sigmoid(epoch - active.start) if stage.clip_to_ce_ramp == "sigmoid" else 1.0
        info = stage.info(active.index, active.start)
        step, ctx = 0, None
        try:
            for step, batch in enumerate(epoch_batches, 1):
                batch, replicated = assemble(batch)
                ctx = StepContext(
                    batch=batch,
                    epoch=epoch,
                    step=step - 1,
                    steps_per_epoch=steps,
                    stage=info,
                    networks=active.networks,
                    students=self.students,
                    teachers=self.teachers,
                    terms=self.terms,
                    taps=self.taps,
                    update=(lambda loss, a=active: self._update(a, {"loss": loss}))
                    if active.step.manual
                    else None,
                )
                with replicated_step(replicated):
                    ctx.batch = active.transform(batch, ctx)
                    out, total = self._step(ctx, active, ramp)
                if tally is None:
                    tally = EpochTally([*out.losses, *(f"raw/{k}" for k in out.metrics)], self.device)
                values = [*out.losses.values(), *out.metrics.values()]
                tally.add(
                    torch.stack([v.detach().float().reshape(()) for v in values]), total, epoch * steps + step
                )
                if out.logits is not None:
                    tally.add_accuracy(out.logits.detach(), ctx.batch["target"], replicated)
                if step % check_every == 0:
                    tally.check(epoch, steps, stage.name, path)
                bar.update()
                if not bar.disable and step % 20 == 0:
                    bar.set_postfix(loss=f"{float(tally.sums[-1]) / step:.4f}", acc=f"{tally.accuracy():.1f}")
        except NonFiniteLossError as e:
            raise _blame_input(e, ctx.batch if ctx is not None else {}) from None
        except Exception:
            # An error after a NaN (e.g. an SVD of NaN features) is reported as the NaN that caused it.
            if tally is not None:  # this rank's record only: the other ranks may not be here
                tally.check(epoch, steps, stage.name, path, collective=False)
            raise
        finally:
            bar.close()
        if tally is None:
            raise ValueError("an epoch without a training batch: check data.batch_size and the data set")
        tally.check(epoch, steps, stage.name, path)
        tally.reduce()
        means = (tally.sums / max(step, 1)).tolist()
        row: dict[str, Any] = {"epoch": epoch + 1, "stage": stage.name, "lr": lr, "train_loss": means[-1]}
        row.update(
            {(k if k.startswith("raw/") else f"loss/{k}"): v for k, v in zip(tally.keys, means, strict=False)}
        )
        if float(tally.labelled) > 0:
            row["train_acc1"] = tally.accuracy()
        return row

    def _step(self, ctx: StepContext, active: _Active, ramp: float) -> tuple[StepOutput, Tensor]:
        """One step: the method's forward, then (unless it updates itself) one optimiser update."""
        with self._autocast():
            out = active.step(ctx)
        if not isinstance(out, StepOutput):
            raise TypeError(
                f"step {active.stage.step['name']!r} returned {type(out).__name__}, not StepOutput"
            )
        if not out.losses:
            raise ValueError(f"stage {active.stage.name!r}: the step returned no loss")
        if active.step.manual or not active.optimizers:
            total = sum(v.detach().float() for v in out.losses.values())
        else:
            total = self._update(active, out.losses, ramp)
        if active.optimizers and not active.step.manual:
            self.scaler.update()
        return out, total.detach()

    def _update(self, active: _Active, losses: Mapping[str, Tensor], ramp: float = 1.0) -> Tensor:
        """Zero the gradients, backpropagate ``losses`` (summed, or clip-to-CE), average over ranks,
        clip, step the optimiser; returns the summed loss."""
        stage = active.stage
        optimizers = list(active.optimizers.values())
        if not optimizers:
            raise RuntimeError(f"stage {stage.name!r} trains nothing ('trainable: []'), so it cannot update")
        if not any(v.requires_grad for v in losses.values()):
            raise ValueError(
                f"stage {stage.name!r}: the loss has no gradient (losses: {list(losses) or 'none'}); give "
                "it a nonzero ce_weight or a term that reads a trainable module"
            )
        params = active.params
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        clip = stage.clip_to_ce and not active.step.manual
        total = backward(losses, params, self.scaler.scale, clip, D.all_reduce_mean_, ramp)
        if D.is_distributed() and not clips_to_ce(losses, clip):
            D.average_gradients(p for p in params if id(p) not in active.synced and p.grad is not None)
        if stage.clip_grad_norm is not None:
            for optimizer in optimizers:
                self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, stage.clip_grad_norm)
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        if active.step.manual:  # a manual step may update several times per batch
            self.scaler.update()
        return total

    def _evaluate(
        self, row: dict[str, Any], best: dict[str, dict], epoch: int
    ) -> dict[str, tuple[float, float]]:
        last = {}
        for i, name in enumerate(self.deploy):
            acc1, acc5 = evaluate(self.root[name], self.test_loader, self._autocast)
            last[name] = (acc1, acc5)
            prefix = "" if i == 0 else f"{name}/"
            row.update({f"{prefix}test_acc1": acc1, f"{prefix}test_acc5": acc5})
            if acc1 > best[name]["acc1"]:
                best[name] = {"acc1": acc1, "acc5": acc5, "epoch": epoch + 1}
            row.update({f"{prefix}best_acc1": best[name]["acc1"], f"{prefix}best_epoch": best[name]["epoch"]})
        if self.agreement and D.is_main_process():
            from relkd.graphs.agreement import agreement

            s, t = self.deploy[0], self.teachers[0]
            with self._autocast():
                row.update(
                    agreement_metrics(
                        self.root[s],
                        self.root[t],
                        lambda: self.taps[s]["penultimate"],
                        lambda: self.taps[t]["penultimate"],
                        self.probe,
                        agreement,
                    )
                )
        return last

    def _log_epoch(self, row: Mapping[str, Any], total: int) -> None:
        losses = "  ".join(
            f"{k.removeprefix('loss/')} {v:.4g}" for k, v in row.items() if k.startswith("loss/")
        )
        named = len(self.deploy) > 1
        accuracy = "  ".join(
            (f"{k.removesuffix('test_acc1').rstrip('/') or self.deploy[0]} " if named else "") + f"{v:.2f}%"
            for k, v in row.items()
            if k.endswith("test_acc1")
        )
        log.info(
            "%s epoch %d/%d [%s]  loss %.4g (%s)  test top-1 %s  %.1f s",
            self.label, row["epoch"], total, row["stage"], row["train_loss"], losses, accuracy,
            row["epoch_time_s"],
        )  # fmt: skip

    # --- checkpoints -------------------------------------------------------------------------------

    def _states(self) -> dict[str, Any]:
        return {
            "students": {n: self.root[n].state_dict() for n in self.students},
            "losses": self.root[LOSS].state_dict(),
            "steps": self.root[STEP_MODULES].state_dict(),
        }

    def _save(
        self, path: Path, epoch: int, best: dict, wall: float, row: dict, active: _Active | None
    ) -> None:
        keep = active is not None
        save_checkpoint(
            path,
            {
                "format": FORMAT,
                "config_hash": self.config_hash,
                "epoch": epoch,
                "stage": -1 if active is None else active.index,
                **self._states(),
                "optimizer": {n: o.state_dict() for n, o in active.optimizers.items()} if keep else {},
                "scheduler": {n: s.state_dict() for n, s in active.schedulers.items()} if keep else {},
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
                "best": best,
                "wall_time_s": wall,
                "last": {k: v for k, v in row.items() if isinstance(v, (int, float))},
            },
        )

    def _restore(self, path: Path) -> dict[str, Any]:
        state = load_checkpoint(path, CHECKPOINT_KEYS)
        if state["config_hash"] != self.config_hash:
            raise ValueError(
                f"{path} was written by another configuration (hash {state['config_hash'][:12]}, this "
                f"run {self.config_hash[:12]}); delete it or run without --resume to start over"
            )
        for name in self.students:
            if name not in state["students"]:
                raise KeyError(
                    f"{path}: no state for the student {name!r} (it has {sorted(state['students'])})"
                )
            load_state(path, f"student {name!r}", self.root[name], state["students"][name])
        load_state(path, "loss modules", self.root[LOSS], state["losses"])
        load_state(path, "step modules", self.root[STEP_MODULES], state["steps"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return state

    def _run_evaluators(self, name: str) -> dict[str, float]:
        if not self.evaluators:
            return {}
        nets = {n: self.root[n] for n in self.students + self.teachers}
        modes = {n: m.training for n, m in nets.items()}
        for m in nets.values():
            m.eval()
        ctx = EvalContext(name, nets, self.eval_loaders, self.device, self._autocast, tuple(self.teachers))
        out = {}
        try:
            for evaluator_name, evaluator in self.evaluators.items():
                for key, value in evaluator(ctx).items():
                    out[f"{evaluator_name}/{key}"] = float(value)
        finally:
            for n, m in nets.items():
                m.train(modes[n])
        return out

    def _finish(
        self, best: dict[str, dict], last: dict[str, tuple[float, float]], wall: float, epochs: int
    ) -> dict[str, Any]:
        networks: dict[str, dict[str, Any]] = {}
        for name in self.deploy:
            if name not in last:  # resumed a finished run, or zero epochs
                last[name] = evaluate(self.root[name], self.test_loader, self._autocast)
                if best[name]["epoch"] == 0:
                    best[name] = {"acc1": last[name][0], "acc5": last[name][1], "epoch": epochs}
            networks[name] = {
                "last_acc1": last[name][0],
                "last_acc5": last[name][1],
                "best_acc1": best[name]["acc1"],
                "best_acc5": best[name]["acc5"],
                "best_epoch": best[name]["epoch"],
            }
            networks[name].update(self._run_evaluators(name))
        first = networks[self.deploy[0]]
        result = {
            **self.info,
            **first,
            "epochs": epochs,
            "wall_time_s": wall,
            "config_hash": self.config_hash,
            "deployed": list(self.deploy),
            "networks": networks,
        }
        result = _finite(result)
        if D.is_main_process():
            save_checkpoint(
                self.files.final,
                {"format": FORMAT, "config_hash": self.config_hash, **self._states(), "result": result},
            )
            self.files.write_result(result)
        return result


def _blame_input(error: NonFiniteLossError, batch: Mapping[str, Any]) -> NonFiniteLossError:
    """The error, told that the inputs were not finite when the batch's were."""
    x = batch.get("input")
    if isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        rows = (~torch.isfinite(x)).flatten(1).any(1)
        index = batch.get("index")
        positions = index[rows] if isinstance(index, Tensor) else rows.nonzero().flatten()
        where = positions[:5].tolist()
        return NonFiniteLossError(
            f"{str(error).split(';')[0]}: the training batch itself holds NaN or infinite inputs (data set "
            f"indices {where}), so the data, not the learning rate, is at fault; fix or drop those images"
        )
    return error


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _compiled(module: nn.Module, in_place: bool = False) -> nn.Module:
    """``module`` compiled with shapes specialised: in place (:func:`relkd.compile`), or a
    ``torch.compile`` wrapper that shares its parameters and hooks and leaves its own calls eager."""
    if in_place:
        from relkd import compile as compile_in_place

        return compile_in_place(module)
    return torch.compile(module, dynamic=False)


def _targets(targets: Tensor | None, num_data: int) -> Tensor:
    return targets if targets is not None else torch.zeros(num_data, dtype=torch.long)


def _default_step() -> type[Step]:
    return STEPS.get("weighted_sum")


def _agreement_available() -> bool:
    try:
        import relkd.graphs.agreement  # noqa: F401  (optional: another part of relkd provides it)
    except ImportError:
        return False
    return True
