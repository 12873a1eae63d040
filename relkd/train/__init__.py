"""The experiment engine behind ``relkd run``: one trainer for teachers and students.

``run_suite(config)`` trains (or reuses) the teacher, then one student per method and seed, then
writes the results table; :class:`Engine` is the trainer itself, usable on its own with any
``nn.Module`` s (see :mod:`relkd.train.engine`).

Run directory layout (``RUN_DIR`` is the config's ``out``, default ``runs/<name>``)::

    RUN_DIR/
      config.yaml                 the resolved config (every default filled in)
      teacher/
        final.pt                  {"students": {"teacher": state_dict}, "result", "config_hash", ...}
        checkpoint.pt             latest epoch, to resume (see below)
        metrics.jsonl, metrics.csv
        result.json               the teacher's accuracy
      <method>/seed<k>/
        checkpoint.pt             latest epoch: students, losses (memory banks ...), optimiser,
                                  schedule, scaler, RNG states, epoch, stage, best-so-far
        final.pt                  {"students": {"student": ...}, "losses": ..., "result", ...}
        metrics.jsonl, metrics.csv  one row per epoch (keys in relkd.train.metrics)
        result.json               {"method", "seed", "last_acc1", "last_acc5", "best_acc1",
                                   "best_acc5", "best_epoch", "epochs", "wall_time_s", "config_hash"}
        tb/                       TensorBoard events, when tensorboard is installed
      results.md, results.csv     the table: mean ± std over seeds of last- and best-epoch top-1

Every ``.pt`` file loads with ``torch.load(path, weights_only=True)``. Accuracies are percentages.
"""

from typing import Any

from relkd.train.batches import BATCH_TRANSFORMS, TrainBatches
from relkd.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from relkd.train.engine import Engine
from relkd.train.optim import OPTIMIZERS, SCHEDULES
from relkd.train.stages import Stage, TermUse, build_stages
from relkd.train.tally import NonFiniteLossError
from relkd.train.terms import LossTerm, TermSpec, parse_terms

__all__ = [
    "BATCH_TRANSFORMS",
    "OPTIMIZERS",
    "SCHEDULES",
    "CheckpointError",
    "Engine",
    "LossTerm",
    "NonFiniteLossError",
    "Stage",
    "TermSpec",
    "TermUse",
    "TrainBatches",
    "build_stages",
    "load_checkpoint",
    "parse_terms",
    "run_suite",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    # relkd.config imports this package's registries, and the suite runner imports relkd.config:
    # loading the runner lazily keeps the two packages free of an import cycle.
    if name == "run_suite":
        from relkd.train.suite import run_suite

        return run_suite
    raise AttributeError(f"module 'relkd.train' has no attribute {name!r}")
