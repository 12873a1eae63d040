"""The training engine: :class:`Engine` trains a method's networks through its stages.

It is usable on its own with any ``nn.Module`` s; ``relkd run`` (:mod:`relkd.experiment`) builds
engines from a config, one per teacher and per method and seed. Checkpoints and ``result.json`` are
described in :mod:`relkd.train.engine`; the run directory's layout in :mod:`relkd.experiment.rundir`.
Every ``.pt`` file loads with ``torch.load(path, weights_only=True)``. Accuracies are percentages.
"""

from relkd.methods.base import sigmoid
from relkd.train.backward import clip_to_ce_backward
from relkd.train.batches import TrainBatches
from relkd.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from relkd.train.engine import Engine
from relkd.train.stages import Stage, build_stages
from relkd.train.tally import NonFiniteLossError

__all__ = [
    "CheckpointError",
    "Engine",
    "NonFiniteLossError",
    "Stage",
    "TrainBatches",
    "build_stages",
    "clip_to_ce_backward",
    "sigmoid",
    "load_checkpoint",
    "save_checkpoint",
]
