"""Evaluation beyond test top-1: registered evaluators whose numbers become table columns.

Every module of this package is imported here, so an evaluator registers itself by existing; the names
in each module's ``__all__`` are re-exported.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from relkd.evaluation.base import EVALUATORS, EvalContext, build_evaluator, register_evaluator

__all__ = ["EVALUATORS", "EvalContext", "build_evaluator", "register_evaluator"]

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name == "base":
        continue
    _module = _importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
