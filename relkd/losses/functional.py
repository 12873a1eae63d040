"""Functional forms of every loss: pure math on tensors or RelationGraphs.

Collected from the ``FUNCTIONAL`` names of each module of :mod:`relkd.losses`.
"""

import sys as _sys

__all__: list[str] = []
for _module_name in _sys.modules["relkd.losses"].LOSS_MODULES:
    _module = _sys.modules[_module_name]
    for _name in getattr(_module, "FUNCTIONAL", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
