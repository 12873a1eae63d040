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
all loss modules, ``loss.<term>`` and below for their parts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from relkd.registry import suggest

__all__ = ["Stage", "TermUse", "build_stages", "find_module", "stage_parameters"]


@dataclass
class TermUse:
    """How a stage uses a term: ``weight``; ``call`` a loss method instead of ``distill``; ``network``
    the network whose features alone that method receives."""

    term: str
    weight: float
    call: str | None = None
    network: str | None = None


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
    schedule: dict[str, Any]
    warmup_epochs: int
    clip_grad_norm: float | None
    clip_to_ce: bool
    clip_to_ce_ramp: str | None
    batch_transform: dict[str, Any]
    after: list[str] = field(default_factory=list)


def build_stages(stages: Sequence[Any] | None, train: Any, term_weights: Mapping[str, float]) -> list[Stage]:
    """Resolve a method's stage configs (``None``: one stage with every term) against its recipe.

    Args:
        stages: :class:`relkd.config.StageConfig` objects, or None.
        train: the method's :class:`relkd.config.TrainConfig`.
        term_weights: ``{term: default weight}`` of the method's losses, in order.
    """
    return [_stage(cfg, train, term_weights) for cfg in stages or [None]]


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


def _stage(cfg: Any | None, train: Any, term_weights: Mapping[str, float]) -> Stage:
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
        schedule=dict(pick("schedule")),
        warmup_epochs=pick("warmup_epochs"),
        clip_grad_norm=train.clip_grad_norm,
        clip_to_ce=train.clip_to_ce,
        clip_to_ce_ramp=train.clip_to_ce_ramp,
        batch_transform=dict(train.batch_transform),
        after=[] if cfg is None else list(cfg.after),
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
    """The bound method at ``path`` = ``module.path.method_name``.

    Raises:
        KeyError: no such module or method.
    """
    module_path, _, method = path.rpartition(".")
    module = find_module(root, module_path, where)
    fn = getattr(module, method, None)
    if not callable(fn):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        raise KeyError(f"{where}: {type(module).__name__} has no method {method!r}.{suggest(method, public)}")
    return fn


def stage_parameters(root: nn.Module, stage: Stage, default: Sequence[str]) -> list[nn.Parameter]:
    """The parameters a stage optimises: those of its trainable modules (``default`` when it names
    none) that require gradients and do not belong to a frozen module, each once."""
    frozen = {
        id(p)
        for path in stage.frozen
        for p in find_module(root, path, f"stage {stage.name!r} frozen").parameters()
    }
    seen: set[int] = set()
    params = []
    for path in stage.trainable if stage.trainable is not None else default:
        for p in find_module(root, path, f"stage {stage.name!r} trainable").parameters():
            if p.requires_grad and id(p) not in frozen and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
