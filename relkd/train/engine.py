"""The engine: train students (and the loss modules' parameters) through stages, teachers frozen.

The training loss of a step is ``ce_weight * CE + sum_i weight_i * term_i`` over the stage's terms, each
term built from the loss registry; the engine never names a method. Everything trainable lives in one
module tree (``engine.root``): the students and teachers by name and the losses under ``loss``, which
is what stage paths (``trainable``, ``frozen``, ``after``) refer to.

Every epoch ends with a test evaluation, a metrics row and a checkpoint (``checkpoint.pt``) holding all
that is needed to continue: students, loss modules (their buffers too, e.g. memory banks), optimiser,
schedule, gradient scaler, RNG states, epoch and stage. ``fit(resume=True)`` continues from it; on the
CPU the resumed run ends with the same weights, bit for bit, as an uninterrupted one. A non-finite term
stops the run with :class:`NonFiniteLossError` naming the term and the step, and leaves the last
checkpoint (the last good epoch) as it was.

Under ``torchrun`` (a process group of ``W > 1`` ranks, see :mod:`relkd.train.parallel`) every rank
runs the same engine on its shard of each batch, following :mod:`relkd.distributed`: in a stage with a
cross-entropy term and without ``clip_to_ce`` the students are wrapped in ``DistributedDataParallel``
(for that stage only, after its freezing, so DDP knows which parameters train); every other gradient,
the loss modules' and the students' in other stages, is averaged over ranks after the backward with
:func:`relkd.distributed.average_gradients`. With ``clip_to_ce`` the cross-entropy and distillation
gradients are averaged separately before the rule compares them. The relational losses gather their
inputs over ranks, so every rank computes the loss of the global batch, and the averaged gradient is
the single-process gradient on the concatenated batch. Test accuracy is counted on shards of the test
set and summed; the epoch's loss means are averaged over ranks. Rank 0 alone writes metrics,
checkpoints and results and shows progress; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import json
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

from relkd import distributed as D
from relkd.models import FeatureTaps, default_taps, resolve_taps
from relkd.train.batches import TrainBatches, build_transform
from relkd.train.checkpoint import load_checkpoint, load_state, save_checkpoint
from relkd.train.evaluate import agreement_metrics, evaluate
from relkd.train.metrics import MetricsLog
from relkd.train.optim import build_optimizer, build_schedule
from relkd.train.seeding import rng_state, set_rng_state
from relkd.train.stages import Stage, find_method, find_module, stage_parameters
from relkd.train.step import backward, clips_to_ce, forward, needed_networks, term_values
from relkd.train.tally import EpochTally, NonFiniteLossError
from relkd.train.terms import LossTerm, TermSpec, build_term, tap_names

__all__ = ["FORMAT", "Engine", "NonFiniteLossError"]

FORMAT = "relkd-1"
LOSS = "loss"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_KEYS = (
    "format", "config_hash", "epoch", "stage", "students", "losses", "optimizer", "scheduler", "scaler",
    "rng", "best", "wall_time_s",
)  # fmt: skip


@dataclass
class _Active:
    """The running stage: its index, optimiser, schedule and what it runs."""

    index: int
    stage: Stage
    optimizer: torch.optim.Optimizer
    scheduler: Any
    transform: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    teachers: list[str]
    students: list[str]
    frozen: list[nn.Module]
    grad_flags: dict[int, bool]
    networks: dict[str, nn.Module]
    synced: set[int]


class Engine:
    """Train ``students`` through ``stages`` with frozen ``teachers``.

    Args:
        students: trainable networks by name (usually ``{"student": net}``; a teacher is trained as
            the only student of its own run).
        stages: the run's stages, in order.
        batches: the training batches of each epoch.
        test_loader: evaluation batches (``{"input", "target"}``).
        run_dir: where checkpoints and metrics go.
        teachers: frozen networks by name (usually ``{"teacher": net}``), in eval mode throughout.
        terms: the method's term specs; the engine builds their losses, filling in sizes measured on
            ``probe``.
        num_data, targets: size and labels of the full training set (for losses that ask).
        probe: a fixed batch of test inputs: sizes the losses and measures agreement each epoch.
        device: where everything runs.
        amp: ``"bf16"`` or ``"fp16"`` autocast on CUDA (ignored elsewhere, with a warning).
        log_agreement: log student-teacher agreement of the penultimate embeddings each epoch.
        quiet: no progress bars (they are also off when stderr is not a terminal).
        tensorboard: also log to TensorBoard when it is installed.
        config_hash: stored in checkpoints; resuming from another config's checkpoint is an error.
        info: extra fields for ``result.json`` (method, seed ...).
        label: the progress bar's name (default: the run directory's).
    """

    def __init__(
        self,
        students: Mapping[str, nn.Module],
        stages: Sequence[Stage],
        batches: TrainBatches,
        test_loader: Any,
        run_dir: str | Path,
        *,
        teachers: Mapping[str, nn.Module] | None = None,
        terms: Mapping[str, TermSpec] | None = None,
        num_data: int = 0,
        targets: Tensor | None = None,
        probe: Tensor,
        device: torch.device | str = "cpu",
        amp: str | None = None,
        log_agreement: bool = True,
        quiet: bool = False,
        tensorboard: bool = True,
        config_hash: str = "",
        info: Mapping[str, Any] | None = None,
        label: str = "",
    ) -> None:
        teachers = dict(teachers or {})
        terms = dict(terms or {})
        if not students:
            raise ValueError("the engine needs at least one student network to train")
        clash = (set(students) & set(teachers)) | ({LOSS} & (set(students) | set(teachers)))
        if clash:
            raise ValueError(f"network names must be distinct and not {LOSS!r}, got {sorted(clash)} twice")
        self.device = torch.device(device)
        self.students, self.teachers = list(students), list(teachers)
        self.stages, self.batches, self.test_loader = list(stages), batches, test_loader
        self.run_dir = Path(run_dir)
        self.config_hash, self.info, self.quiet = config_hash, dict(info or {}), quiet
        self.label = label or self.run_dir.name
        self.tensorboard = tensorboard
        self.root = nn.ModuleDict({**students, **teachers, LOSS: nn.ModuleDict()}).to(self.device)
        for name in teachers:
            self.root[name].eval().requires_grad_(False)
        self._check_uses(terms)
        self._autocast, self.scaler = self._amp(amp)
        taps = tap_names(terms, self.stages, self.students, self.teachers)
        pair = (self.students[0], self.teachers[0]) if self.teachers else ()
        # Agreement compares the penultimate embeddings; a network without that tap simply has none.
        agreement = log_agreement and all("penultimate" in default_taps(self.root[n]) for n in pair)
        for name in pair if agreement else ():
            taps[name] = list(dict.fromkeys([*taps[name], "penultimate"]))
        self.taps = {
            name: FeatureTaps(self.root[name], self._resolve(name, names)) for name, names in taps.items()
        }
        features = self._probe_features(probe)
        self.terms: dict[str, LossTerm] = {}
        for name, spec in terms.items():
            self.terms[name] = build_term(
                spec, features[spec.student], features[spec.teacher], num_data, _targets(targets, num_data)
            )
            self.root[LOSS][name] = self.terms[name].module.to(self.device)
        self.probe = probe if agreement and _agreement_available() else None

    # --- setup -------------------------------------------------------------------------------------

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

    def _probe_features(self, probe: Tensor) -> dict[str, dict[str, Any]]:
        modes = {n: self.root[n].training for n in self.students + self.teachers}
        for n in modes:
            self.root[n].eval()
        with self._autocast():
            features = forward(self.root, self.taps, probe, self.teachers, [])
            with torch.no_grad():
                features.update(forward(self.root, self.taps, probe, [], self.students))
        for n, mode in modes.items():
            self.root[n].train(mode)
        return features

    # --- stages ------------------------------------------------------------------------------------

    def _begin(self, index: int, state: Mapping[str, Any] | None) -> _Active:
        stage = self.stages[index]
        frozen = [find_module(self.root, p, f"stage {stage.name!r} frozen") for p in stage.frozen]
        grad_flags = {id(p): p.requires_grad for p in self.root.parameters()}
        for module in frozen:
            module.requires_grad_(False)
        params = stage_parameters(self.root, stage, [*self.students, LOSS])
        optimizer = build_optimizer(params, stage.optimizer)
        scheduler = build_schedule(optimizer, stage.schedule, stage.epochs, stage.warmup_epochs)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        teachers, students = needed_networks(stage, self.terms, self.students, self.teachers)
        transform = build_transform(stage.batch_transform)
        networks, synced = self._wrap(stage)
        return _Active(
            index, stage, optimizer, scheduler, transform, teachers, students, frozen, grad_flags, networks,
            synced,
        )  # fmt: skip

    def _wrap(self, stage: Stage) -> tuple[dict[str, nn.Module], set[int]]:
        """The networks the steps call, students in DDP where it applies, and the ids of the
        parameters DDP averages (the engine averages the rest itself)."""
        networks: dict[str, nn.Module] = {n: self.root[n] for n in self.students + self.teachers}
        # DDP waits for a gradient of every parameter that reaches its output; only the cross-entropy
        # guarantees one, and clip_to_ce's autograd.grad bypasses DDP's hooks altogether.
        if not (D.is_distributed() and stage.ce_weight and not stage.clip_to_ce):
            return networks, set()
        synced = set()
        ids = [self.device.index] if self.device.type == "cuda" else None
        for name in self.students:
            trainable = [p for p in self.root[name].parameters() if p.requires_grad]
            if trainable:
                networks[name] = DistributedDataParallel(
                    self.root[name], device_ids=ids, find_unused_parameters=True
                )
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
        for module in active.frozen:
            module.eval()

    # --- the loop ----------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train every stage to the end and return the result (also written to ``result.json``).

        Call it once: it removes its feature hooks from the networks when it returns.

        Args:
            resume: continue from ``run_dir/checkpoint.pt`` if it exists (else start afresh).

        Raises:
            NonFiniteLossError: a term was NaN or infinite.
            CheckpointError: the checkpoint cannot be read or does not fit this run.
        """
        main = D.is_main_process()
        log = MetricsLog(self.run_dir, self.tensorboard, enabled=main)
        path = self.run_dir / "checkpoint.pt"
        done, best, wall, state = 0, {"acc1": -1.0, "acc5": 0.0, "epoch": 0}, 0.0, None
        if resume and path.is_file():
            state = self._restore(path)
            done, best, wall = state["epoch"], dict(state["best"]), state["wall_time_s"]
            log.resume(done)
        else:
            log.start()
        starts = [sum(s.epochs for s in self.stages[:i]) for i in range(len(self.stages) + 1)]
        last: tuple[float, float] | None = None
        active = None
        try:
            for epoch in range(done, starts[-1]):
                index = max(i for i in range(len(self.stages)) if starts[i] <= epoch)
                if active is None:
                    same = state is not None and state["stage"] == index and epoch > starts[index]
                    active = self._begin(index, state if same else None)
                t0 = time.perf_counter()
                row = self._train_epoch(epoch, starts[-1], active, path)
                active.scheduler.step()
                last = evaluate(self.root[self.students[0]], self.test_loader, self._autocast)
                row.update(self._evaluate_rest(last))
                if last[0] > best["acc1"]:
                    best = {"acc1": last[0], "acc5": last[1], "epoch": epoch + 1}
                row.update(best_acc1=best["acc1"], best_epoch=best["epoch"])
                stage_done = epoch + 1 == starts[index + 1]
                if stage_done:
                    self._end(active)
                row["epoch_time_s"] = time.perf_counter() - t0
                wall += row["epoch_time_s"]
                log.log(row)
                # After a stage's last epoch the next stage starts with a fresh optimiser: none is kept.
                if main:
                    self._save(path, epoch + 1, best, wall, row, None if stage_done else active)
                if stage_done:
                    active = None
            result = self._finish(best, last, wall, starts[-1])
            D.barrier()  # the files are written before any rank reads them
            return result
        finally:
            if active is not None:
                active.networks.clear()
            log.close()
            for taps in self.taps.values():
                taps.remove()

    def _train_epoch(self, epoch: int, total_epochs: int, active: _Active, path: Path) -> dict[str, Any]:
        stage = active.stage
        self._set_modes(active)
        weights = ({"ce": stage.ce_weight} if stage.ce_weight else {}) | {
            u.term: u.weight for u in stage.uses
        }
        keys = list(weights)
        tally = EpochTally(keys, self.device)
        steps = len(self.batches)
        check_every = 1 if self.device.type == "cpu" else 25
        bar = tqdm(
            total=steps,
            desc=f"{self.label} {epoch + 1}/{total_epochs}",
            disable=self.quiet or not sys.stderr.isatty() or not D.is_main_process(),
            leave=False,
        )
        lr = active.optimizer.param_groups[0]["lr"]
        ramp = 1.0
        if stage.clip_to_ce_ramp == "sigmoid":
            stage_epoch = epoch - sum(s.epochs for s in self.stages[: active.index])
            ramp = 1.0 / (1.0 + math.exp(-stage_epoch))
        step = 0
        try:
            for step, batch in enumerate(self.batches.epoch(epoch, with_transfer=bool(stage.uses)), 1):
                values, total, logits = self._step(active.transform(batch), active, weights, ramp)
                tally.add(values, total, epoch * steps + step)
                if logits is not None:
                    tally.add_accuracy(logits, batch["target"])
                if step % check_every == 0:
                    tally.check(epoch, steps, stage.name, path)
                bar.update()
                if not bar.disable and step % 20 == 0:
                    bar.set_postfix(loss=f"{float(tally.sums[-1]) / step:.4f}", acc=f"{tally.accuracy():.1f}")
        except NonFiniteLossError:
            raise
        except Exception:
            # An error after a NaN (e.g. an SVD of NaN features) is reported as the NaN that caused it.
            tally.check(epoch, steps, stage.name, path)
            raise
        finally:
            bar.close()
        tally.check(epoch, steps, stage.name, path)
        tally.reduce()
        means = (tally.sums / max(step, 1)).tolist()
        row = {"epoch": epoch + 1, "stage": stage.name, "lr": lr, "train_loss": means[-1]}
        row.update({f"loss/{k}": v for k, v in zip(keys, means, strict=False)})
        if float(tally.labelled) > 0:
            row["train_acc1"] = tally.accuracy()
        return row

    def _step(
        self, batch: dict[str, Tensor], active: _Active, weights: dict[str, float], ramp: float = 1.0
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One optimiser step; returns the detached term values, the total and the first student's logits."""
        stage = active.stage
        with self._autocast():
            features = forward(active.networks, self.taps, batch["input"], active.teachers, active.students)
            values = term_values(stage, self.terms, features, batch, active.students, self.teachers)
        params = [p for g in active.optimizer.param_groups for p in g["params"]]
        if not any(values[k].requires_grad for k in weights):
            raise ValueError(
                f"stage {stage.name!r}: the loss has no gradient (terms: {list(weights) or 'none'}); give it "
                "a nonzero ce_weight or a term that reads a trainable module"
            )
        active.optimizer.zero_grad(set_to_none=True)
        total = backward(
            values, weights, params, self.scaler.scale, stage.clip_to_ce, D.all_reduce_mean_, ramp
        )
        if D.is_distributed() and not clips_to_ce(weights, stage.clip_to_ce):
            D.average_gradients(p for p in params if id(p) not in active.synced)
        if stage.clip_grad_norm is not None:
            self.scaler.unscale_(active.optimizer)
            nn.utils.clip_grad_norm_(params, stage.clip_grad_norm)
        self.scaler.step(active.optimizer)
        self.scaler.update()
        detached = torch.stack([values[k].detach().float().reshape(()) for k in weights])
        student = features.get(self.students[0])
        return detached, total.detach(), None if student is None else student["logits"].detach()

    def _evaluate_rest(self, primary: tuple[float, float]) -> dict[str, Any]:
        row: dict[str, Any] = {"test_acc1": primary[0], "test_acc5": primary[1]}
        for name in self.students[1:]:
            acc1, acc5 = evaluate(self.root[name], self.test_loader, self._autocast)
            row.update({f"{name}/test_acc1": acc1, f"{name}/test_acc5": acc5})
        if self.probe is not None and D.is_main_process():
            from relkd.graphs.agreement import agreement

            s, t = self.students[0], self.teachers[0]
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
        return row

    # --- checkpoints -------------------------------------------------------------------------------

    def _states(self) -> dict[str, Any]:
        return {
            "students": {n: self.root[n].state_dict() for n in self.students},
            "losses": self.root[LOSS].state_dict(),
        }

    def _save(
        self, path: Path, epoch: int, best: dict, wall: float, row: dict, active: _Active | None
    ) -> None:
        save_checkpoint(
            path,
            {
                "format": FORMAT,
                "config_hash": self.config_hash,
                "epoch": epoch,
                "stage": -1 if active is None else active.index,
                **self._states(),
                "optimizer": {} if active is None else active.optimizer.state_dict(),
                "scheduler": {} if active is None else active.scheduler.state_dict(),
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
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return state

    def _finish(
        self, best: dict, last: tuple[float, float] | None, wall: float, epochs: int
    ) -> dict[str, Any]:
        if last is None:  # resumed a finished run, or zero epochs
            last = evaluate(self.root[self.students[0]], self.test_loader, self._autocast)
            if best["epoch"] == 0:
                best = {"acc1": last[0], "acc5": last[1], "epoch": epochs}
        result = {
            **self.info,
            "last_acc1": last[0],
            "last_acc5": last[1],
            "best_acc1": best["acc1"],
            "best_acc5": best["acc5"],
            "best_epoch": best["epoch"],
            "epochs": epochs,
            "wall_time_s": wall,
            "config_hash": self.config_hash,
        }
        result = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()
        }
        if D.is_main_process():
            save_checkpoint(
                self.run_dir / "final.pt",
                {"format": FORMAT, "config_hash": self.config_hash, **self._states(), "result": result},
            )
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return result


def _targets(targets: Tensor | None, num_data: int) -> Tensor:
    return targets if targets is not None else torch.zeros(num_data, dtype=torch.long)


def _agreement_available() -> bool:
    try:
        import relkd.graphs.agreement  # noqa: F401  (optional: another part of relkd provides it)
    except ImportError:
        return False
    return True
