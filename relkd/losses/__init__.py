"""Distillation losses: ``nn.Module`` forms here, functional forms in ``relkd.losses.functional``.

Build any loss by name with :func:`build`; :func:`available` lists the names.

Every module of this package is imported here, so a loss registers itself by existing: a new loss is
one file holding its functional form(s), listed in the module's ``FUNCTIONAL``, and its ``@register``-ed
module class. The names in each module's ``__all__`` are re-exported from ``relkd.losses``.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from relkd.losses.base import DistillLoss
from relkd.losses.registry import LOSSES, available, build, register

__all__ = ["DistillLoss", "LOSSES", "available", "build", "register", "functional"]

LOSS_MODULES: list[str] = []
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name in ("base", "registry", "functional"):
        continue
    _module = _importlib.import_module(f"{__name__}.{_info.name}")
    LOSS_MODULES.append(_module.__name__)
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)

from relkd.losses import functional  # noqa: E402  (collects FUNCTIONAL from the modules above)
