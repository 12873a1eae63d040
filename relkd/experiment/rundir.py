"""The run directory of an experiment: one type owns its layout, and every reader and writer uses it.

::

    RUN_DIR/                           (the config's ``out``, default ``runs/<name>``)
      config.yaml                      the resolved config (every default filled in)
      teacher/                         the teacher named ``teacher``; another teacher NAME is in
      teacher-NAME/                    ``teacher-NAME/``; each holds one run's files (below)
      <method>/seed<k>/                one run's files per method and seed
      results.md, results.csv          the table: mean ± std over seeds
      viz/, plots/, analysis/          what ``relkd viz``, ``plot`` and ``analyze`` write

A run's own files (``checkpoint.pt``, ``final.pt``, ``result.json``, ``metrics.jsonl``,
``metrics.csv``, ``tb/``) are :class:`relkd.train.files.RunFiles`'.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from relkd.train.files import RunFiles

__all__ = ["RunDir", "RUN_HINT"]

RUN_HINT = "relkd run CONFIG out={run_dir}"
TEACHER = "teacher"


class RunDir:
    """The folder of one experiment (a suite of teachers, methods and seeds)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # --- names ----------------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def results_md(self) -> Path:
        return self.path / "results.md"

    @property
    def results_csv(self) -> Path:
        return self.path / "results.csv"

    @property
    def viz(self) -> Path:
        return self.path / "viz"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def analysis(self) -> Path:
        return self.path / "analysis"

    def teacher(self, name: str = TEACHER) -> RunFiles:
        """The files of the teacher ``name``."""
        return RunFiles(self.path / (TEACHER if name == TEACHER else f"{TEACHER}-{name}"))

    def run(self, method: str, seed: int) -> RunFiles:
        """The files of method ``method``'s run with seed ``seed``."""
        return RunFiles(self.path / method / f"seed{seed}")

    @property
    def hint(self) -> str:
        """The command that writes this directory, for error messages."""
        return RUN_HINT.format(run_dir=self.path)

    # --- what is on disk --------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.path.is_dir()

    def require(self) -> None:
        """Raise ``FileNotFoundError`` naming the command that writes the directory when it is absent."""
        if not self.exists():
            raise FileNotFoundError(f"no run directory {self.path}: `{self.hint}` writes one")

    def teachers(self) -> Iterator[tuple[str, RunFiles]]:
        """``(name, files)`` of every teacher folder, ``teacher`` first."""
        if (self.path / TEACHER).is_dir():
            yield TEACHER, self.teacher()
        for folder in sorted(self.path.glob(f"{TEACHER}-*")):
            if folder.is_dir():
                yield folder.name.removeprefix(f"{TEACHER}-"), RunFiles(folder)

    def runs(self) -> Iterator[tuple[str, int, RunFiles]]:
        """``(method, seed, files)`` of every method run folder, methods in config order (others
        alphabetically), seeds in numeric order."""
        found = []
        for folder in self.path.glob("*/seed*"):
            seed = folder.name.removeprefix("seed")
            method = folder.parent.name
            if folder.is_dir() and seed.isdigit() and not method.startswith(TEACHER):
                found.append((method, int(seed)))
        rank = {m: i for i, m in enumerate(self.method_order())}
        for method, seed in sorted(found, key=lambda ms: (rank.get(ms[0], len(rank)), ms[0], ms[1])):
            yield method, seed, self.run(method, seed)

    def read_config_data(self) -> dict[str, Any]:
        """The plain data of ``config.yaml`` (empty when there is none)."""
        if not self.config.is_file():
            return {}
        return yaml.safe_load(self.config.read_text()) or {}

    def method_order(self) -> list[str]:
        """The methods of ``config.yaml`` in its order."""
        methods = self.read_config_data().get("methods") or {}
        return list(methods) if isinstance(methods, Mapping) else []

    def load_config(self) -> Any:
        """The run's :class:`relkd.config.SuiteConfig` and load notes.

        Raises:
            FileNotFoundError: no directory, or no ``config.yaml`` in it; the message says what writes it.
        """
        from relkd.config import load_config

        self.require()
        if not self.config.is_file():
            raise FileNotFoundError(
                f"{self.config} is missing: {self.path} was not written by `relkd run` (`{self.hint}` "
                "writes the resolved config there)"
            )
        return load_config(self.config)

    def write_config(self, data: Mapping[str, Any]) -> None:
        """Write the resolved config's data to ``config.yaml``."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(dict(data), sort_keys=False))

    def results(self) -> dict[str, list[dict[str, Any]]]:
        """``{name: [result of each seed]}``: each teacher (``teacher`` or ``teacher-NAME``) first, then
        the methods in config order."""
        found: dict[str, list[dict[str, Any]]] = {}
        for name, files in self.teachers():
            result = files.read_result()
            if result is not None:
                found[TEACHER if name == TEACHER else f"{TEACHER}-{name}"] = [result]
        for method, _, files in self.runs():
            result = files.read_result()
            if result is not None:
                found.setdefault(method, []).append(result)
        return found

    def histories(self) -> dict[str, list[list[dict[str, Any]]]]:
        """``{name: [metrics rows of each seed]}`` in the order of :meth:`results`."""
        found: dict[str, list[list[dict[str, Any]]]] = {}
        for name, files in self.teachers():
            rows = files.read_metrics()
            if rows:
                found[TEACHER if name == TEACHER else f"{TEACHER}-{name}"] = [rows]
        for method, _, files in self.runs():
            rows = files.read_metrics()
            if rows:
                found.setdefault(method, []).append(rows)
        return found
