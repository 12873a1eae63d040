"""Stages: a run is a sequence of them, each with its trainable modules, terms, optimiser and length.

A method without ``stages`` is one stage with every loss term. A two-stage method, e.g. MHGD's head
pre-training on the teacher followed by distillation::

    losses:
      mhgd: {weight: 1.0}
    stages:
      - name: heads
        epochs: 10
        terms: {mhgd: {call: pretrain_step, network: teacher}}   # loss.pretrain_step(teacher_feats, batch)
        ce_weight: 0.0
        trainable: [loss.mhgd.heads]
        after: [loss.mhgd.freeze_heads]
      - name: distill                                      # every term, the recipe's epochs

Module paths name parts of one tree: each network by its name (``student``, ``teacher``), ``loss`` for
all loss modules, ``loss.<term>`` and below for their parts, ``steps.<i>`` for the own modules of
the step of stage ``i`` (0-based).
A network's modules up to a tap are ``student.until(stage2)`` (every module that runs before the
tapped one, and the tapped one), between two taps ``student.between(stage1, stage2)`` (after the first
tapped module, up to and including the second), after a tap ``student.after(stage3)`` (to the end):
found by running the network once on a probe batch,
so they need no knowledge of the architecture.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from relkd.config.schema import StageConfig, TrainConfig
from relkd.methods.base import StageInfo, TermUse
from relkd.models.order import modules_between
from relkd.registry import suggest

__all__ = ["Stage", "TermUse", "build_stages", "find_module", "resolve_paths", "stage_parameters"]

_CALL = re.compile(r"^(?P<target>[\w.]+)\((?P<args>[\w.,]*)\)$")
_RANGE = re.compile(r"^(?P<net>[\w.]+)\.(?P<kind>until|after|between)\((?P<args>[^()]*)\)$")


@dataclass
class Stage:
    """A resolved stage (every default filled in from the method's recipe)."""

    name: str
    epochs: int
    uses: list[TermUse]
    ce_weight: float
    trainable: list[str] | None
    frozen: list[str]
    optimizer: dict[str, Any]
    optimizers: dict[str, dict[str, Any]]
    schedule: dict[str, Any]
    warmup_epochs: int
    clip_grad_norm: float | None
    clip_to_ce: bool
    clip_to_ce_ramp: str | None
    batch_transform: dict[str, Any]
    step: dict[str, Any] = field(default_factory=lambda: {"name": "weighted_sum"})
    after: list[str] = field(default_factory=list)
    after_epoch: list[str] = field(default_factory=list)
    batches: str = "train"

    def info(self, index: int, start_epoch: int) -> StageInfo:
        """What a step sees of this stage."""
        options = {k: v for k, v in self.step.items() if k != "name"}
        return StageInfo(
            self.name, index, self.epochs, start_epoch, tuple(self.uses), self.ce_weight, options
        )


def build_stages(
    stages: Sequence[StageConfig] | None,
    train: TrainConfig,
    term_weights: Mapping[str, float],
    step: Mapping[str, Any] | None = None,
) -> list[Stage]:
    """Resolve a method's stage configs (``None``: one stage with every term) against its recipe.

    Args:
        stages: the method's stages, or None.
        train: the method's recipe.
        term_weights: ``{term: default weight}`` of the method's losses, in order.
        step: the method's step ``{name, **options}`` (default ``weighted_sum``); a stage may name
            its own.
    """
    step = dict(step or {"name": "weighted_sum"})
    return [_stage(cfg, train, term_weights, step) for cfg in stages or [None]]


def _uses(terms: Any, term_weights: Mapping[str, float]) -> list[TermUse]:
    if terms is None:
        return [TermUse(t, w) for t, w in term_weights.items()]
    if not isinstance(terms, Mapping):
        terms = dict.fromkeys(terms)
    out = []
    for term, use in terms.items():
        use = use or {}
        out.append(
            TermUse(term, float(use.get("weight", term_weights[term])), use.get("call"), use.get("network"))
        )
    return out


def _stage(
    cfg: StageConfig | None, train: TrainConfig, term_weights: Mapping[str, float], step: dict[str, Any]
) -> Stage:
    def pick(key: str) -> Any:
        value = None if cfg is None else getattr(cfg, key)
        return getattr(train, key) if value is None else value

    return Stage(
        name="train" if cfg is None else cfg.name,
        epochs=pick("epochs"),
        uses=_uses(None if cfg is None else cfg.terms, term_weights),
        ce_weight=float(pick("ce_weight")),
        trainable=None if cfg is None else cfg.trainable,
        frozen=[] if cfg is None else list(cfg.frozen),
        optimizer=dict(pick("optimizer")),
        optimizers={k: dict(v) for k, v in pick("optimizers").items()},
        schedule=dict(pick("schedule")),
        warmup_epochs=pick("warmup_epochs"),
        clip_grad_norm=train.clip_grad_norm,
        clip_to_ce=train.clip_to_ce,
        clip_to_ce_ramp=train.clip_to_ce_ramp,
        batch_transform=dict(train.batch_transform),
        step=dict(step if cfg is None or cfg.step is None else cfg.step),
        after=[] if cfg is None else list(cfg.after),
        after_epoch=[] if cfg is None else list(cfg.after_epoch),
        batches="train" if cfg is None else cfg.batches,
    )


def find_module(root: nn.Module, path: str, where: str) -> nn.Module:
    """``root.get_submodule(path)``, with the closest paths named when there is none.

    Raises:
        KeyError: no module at ``path``.
    """
    try:
        return root.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        hint = (
            suggest(path, names) or f" Top-level modules: {', '.join(n for n, _ in root.named_children())}."
        )
        raise KeyError(f"{where}: no module {path!r}.{hint}") from None


def find_method(root: nn.Module, path: str, where: str) -> Callable[[], Any]:
    """The call at ``path`` = ``module.path.method_name``, or ``module.path.method_name(arg, ...)``
    whose arguments are module paths too (``loss.lce.arcface.copy_to(student.fc)``).

    Raises:
        KeyError: no such module or method.
    """
    call = _CALL.match(path.replace(" ", ""))
    target, args = (call["target"], [a for a in call["args"].split(",") if a]) if call else (path, [])
    module_path, _, method = target.rpartition(".")
    module = find_module(root, module_path, where)
    fn = getattr(module, method, None)
    if not callable(fn):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        raise KeyError(f"{where}: {type(module).__name__} has no method {method!r}.{suggest(method, public)}")
    modules = [find_module(root, a, where) for a in args]
    return functools.partial(fn, *modules) if modules else fn


def resolve_paths(
    root: nn.Module, paths: Sequence[str], where: str, probe: Tensor | None = None, taps: Any = None
) -> list[nn.Module]:
    """The modules named by ``paths``: plain module paths, or a network's range ``net.until(tap)`` /
    ``net.between(tap_a, tap_b)`` found by running the network on ``probe`` (see the module docstring).

    Raises:
        KeyError: no such module or tap.
        ValueError: a range without a probe batch.
    """
    modules: list[nn.Module] = []
    for path in paths:
        match = _RANGE.match(path.replace(" ", ""))
        if match is None:
            modules.append(find_module(root, path, where))
            continue
        network = find_module(root, match["net"], where)
        args = [a for a in match["args"].split(",") if a]
        expected = 2 if match["kind"] == "between" else 1
        if len(args) != expected:
            raise KeyError(f"{where}: {path!r} takes {expected} tap name(s), got {len(args)}")
        if probe is None:
            raise ValueError(f"{where}: {path!r} needs a probe batch to find the modules' order")
        specs = [taps(match["net"], a) if taps is not None else a for a in args]
        start, end = {"until": (None, specs[0]), "after": (specs[0], None)}.get(match["kind"], tuple(specs))
        modules += modules_between(network, probe, start, end)
    return modules


def stage_parameters(
    root: nn.Module,
    stage: Stage,
    default: Sequence[str],
    probe: Tensor | None = None,
    taps: Any = None,
) -> list[nn.Parameter]:
    """The parameters a stage optimises: those of its trainable modules (``default`` when it names
    none) that require gradients and do not belong to a frozen module, each once.

    ``probe`` and ``taps(network, tap name) -> module path spec`` resolve ``until``/``between`` ranges.
    """
    where = f"stage {stage.name!r}"
    frozen = {
        id(p)
        for m in resolve_paths(root, stage.frozen, f"{where} frozen", probe, taps)
        for p in m.parameters()
    }
    paths = stage.trainable if stage.trainable is not None else default
    seen: set[int] = set()
    params = []
    for module in resolve_paths(root, paths, f"{where} trainable", probe, taps):
        for p in module.parameters():
            if p.requires_grad and id(p) not in frozen and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
