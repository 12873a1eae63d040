"""Per-epoch metrics: top-k counts on the device, and the logs of a run directory.

One row per epoch goes to ``metrics.jsonl`` (appended and flushed at once, so an interrupted run keeps
its history), is mirrored in ``metrics.csv`` (rewritten from the rows, columns in order of first
appearance) and, when TensorBoard is installed, in ``tb/`` event files. Row keys: ``epoch`` (1-based),
``stage``, ``lr``, ``train_loss`` (the weighted total), ``loss/<term>`` (each term's unweighted mean,
``loss/ce`` included), ``train_acc1`` (labelled images), ``test_acc1``, ``test_acc5``, ``best_acc1``,
``best_epoch``, the agreement metrics (``knn_overlap``, ``cka``, ``distance_spearman``) and
``epoch_time_s``. Accuracies are percentages. With several students the student-specific keys are
prefixed by the network's name (``peer1/test_acc1``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from relkd.train.files import RunFiles

__all__ = ["MetricsLog", "topk_correct"]


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of labelled samples (``target >= 0``) whose label is among the top ``k`` logits.

    **Shapes:** logits ``[B, C]``, target ``[B]`` -> ``[len(ks)]`` float counts, on the device (no sync);
    ``k`` larger than ``C`` counts every labelled sample.
    """
    labelled = target >= 0
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hit = top == target[:, None]
    return torch.stack([(hit[:, : min(k, k_max)].any(1) & labelled).sum() for k in ks]).float()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Rows of per-epoch metrics written to ``run_dir``.

    Args:
        run_dir: the run's directory.
        tensorboard: also write TensorBoard events (skipped when tensorboard is not installed).
        enabled: write anything at all (off on every rank but the first of a multi-process run).
    """

    def __init__(
        self, run_dir: str | Path | RunFiles, tensorboard: bool = True, enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.files = run_dir if isinstance(run_dir, RunFiles) else RunFiles(Path(run_dir))
        self.rows: list[dict[str, Any]] = []
        self._writer = None
        if not enabled:
            return
        self.files.path.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.files.metrics_jsonl
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional dependency
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(str(self.files.tensorboard))

    def resume(self, epochs_done: int) -> None:
        """Keep the rows of the first ``epochs_done`` epochs (a resumed run rewrites the rest)."""
        if not self.enabled:
            return
        self.rows = [r for r in self.files.read_metrics() if r.get("epoch", 0) <= epochs_done]
        self._rewrite()

    def start(self) -> None:
        """Start a fresh history."""
        if not self.enabled:
            return
        self.rows = []
        self._rewrite()

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one epoch's row to every log."""
        if not self.enabled:
            return
        row = {k: _jsonable(v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()
        if self._writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._writer.add_scalar(key, value, row["epoch"])
            self._writer.flush()

    def _rewrite(self) -> None:
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()

    def _write_csv(self) -> None:
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        with open(self.files.metrics_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
