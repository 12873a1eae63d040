"""The files of one training run (a teacher, or one method and seed), in one folder.

===================  ==================================================================
``checkpoint.pt``    the latest epoch, to resume (:mod:`relkd.train.engine`)
``final.pt``         the trained networks, loss and step modules, and the result
``result.json``      accuracies of each deployed network, evaluator numbers, wall time
``metrics.jsonl``    one row per epoch (keys in :mod:`relkd.train.metrics`), and
``metrics.csv``      the same rows as a table
``tb/``              TensorBoard events, when tensorboard is installed
===================  ==================================================================

Every reader and writer of these names goes through :class:`RunFiles`; the folders of a whole
experiment are :class:`relkd.experiment.RunDir`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunFiles"]


@dataclass(frozen=True)
class RunFiles:
    """The files of the run in ``path``."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def final(self) -> Path:
        return self.path / "final.pt"

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    def finished(self) -> bool:
        """Whether the run wrote its result and final weights."""
        return self.result.is_file() and self.final.is_file()

    def interrupted(self) -> bool:
        """Whether the run left a checkpoint without finishing."""
        return self.checkpoint.is_file() and not self.finished()

    def read_result(self) -> dict[str, Any] | None:
        """The parsed ``result.json``, None when there is none."""
        if not self.result.is_file():
            return None
        return json.loads(self.result.read_text())

    def write_result(self, result: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.result.write_text(json.dumps(result, indent=2) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` (empty when there is none)."""
        if not self.metrics_jsonl.is_file():
            return []
        return [json.loads(line) for line in self.metrics_jsonl.read_text().splitlines() if line.strip()]
