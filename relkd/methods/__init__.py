"""Methods: the step protocol, the built-in steps and batch transforms, and loss terms.

A method is a YAML file in ``relkd/configs/methods/`` naming its loss terms and, when it is more than
"cross-entropy plus weighted terms", its ``step``: a registered :class:`Step` that receives a
:class:`StepContext` (epoch, step, stage, every network by name, the batch) and returns a
:class:`StepOutput` (the logits it is evaluated on and its named losses). Every module of this package
is imported here, so a step or a batch transform registers itself by existing.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from relkd.methods.base import (
    STEPS,
    Features,
    StageInfo,
    Step,
    StepContext,
    StepOutput,
    TermUse,
    register_step,
    sigmoid,
)
from relkd.methods.terms import INJECTED, TERM_KEYS, LossTerm, TermSpec, build_term, parse_terms, tap_names
from relkd.methods.transforms import BATCH_TRANSFORMS, build_transform, register_transform
from relkd.methods.weighted_sum import WeightedSum, cross_entropy

__all__ = [
    "BATCH_TRANSFORMS",
    "INJECTED",
    "STEPS",
    "TERM_KEYS",
    "Features",
    "LossTerm",
    "StageInfo",
    "Step",
    "StepContext",
    "StepOutput",
    "TermSpec",
    "TermUse",
    "WeightedSum",
    "build_step",
    "build_term",
    "build_transform",
    "cross_entropy",
    "parse_terms",
    "register_step",
    "register_transform",
    "sigmoid",
    "tap_names",
]

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_info.name}")


def build_step(spec, **available):
    """The step ``spec = {name, **options}``, given the engine's facts it asks for by name
    (``students``, ``teachers``, ``features``, ``num_classes``, ``terms``, ``stage``)."""
    import inspect

    cls = STEPS.get(spec["name"])
    params = inspect.signature(cls).parameters
    options = {k: v for k, v in spec.items() if k != "name"}
    injected = {k: v for k, v in available.items() if k in params and k not in options}
    return cls(**options, **injected)
