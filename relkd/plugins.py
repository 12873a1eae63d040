"""Code of one's own, without editing relkd: modules that register models, losses, datasets, steps,
evaluators or batch transforms, imported before a config is read.

Three ways, all equivalent:

* the config key ``imports: [my_project.models, my_project.losses]``;
* the command-line flag ``relkd --import my_project.models run ...`` (repeatable);
* an installed package's entry point in the group ``relkd.plugins``, loaded by every relkd command::

      [project.entry-points."relkd.plugins"]
      my_project = "my_project.relkd_plugin"

The current folder is on the path, so a module next to the config can be named directly.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

__all__ = ["ENTRY_POINT_GROUP", "import_modules", "load_entry_points"]

ENTRY_POINT_GROUP = "relkd.plugins"
_loaded: set[str] = set()


def import_modules(modules: Sequence[str], where: str = "imports") -> None:
    """Import ``modules`` (their ``@register`` calls run), the current folder on the path.

    Raises:
        ImportError: a module cannot be imported; the message names it and says what to do.
    """
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing = f"{e.name!r} (needed by {module!r})" if e.name != module else repr(module)
            raise ImportError(
                f"{where}: no module named {missing} on the Python path; install the package that holds "
                "it, or run from the folder that holds it"
            ) from None


def load_entry_points() -> list[str]:
    """Import every installed ``relkd.plugins`` entry point once; the names loaded this time."""
    loaded = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in _loaded:
            continue
        try:
            point.load()
        except Exception as e:  # a broken plugin names itself rather than failing as a traceback
            raise ImportError(f"the relkd plugin {point.name!r} ({point.value}) failed to load: {e}") from e
        _loaded.add(point.name)
        loaded.append(point.name)
    return loaded
