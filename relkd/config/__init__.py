"""Configs: YAML files checked against a dataclass schema, with ``key.sub=value`` overrides.

>>> from relkd.config import load_config
>>> config, notes = load_config("experiments/fashion_mnist/config.yaml", ["seeds=[0]", "train.epochs=2"])
>>> config.methods["kd"].losses
{'kd': {'weight': 0.9, 'T': 4.0}}

Unknown keys and values of the wrong type are :class:`ConfigError` s naming the full key and the
closest valid one. The schema (every key and default) is in :mod:`relkd.config.schema`.
"""

from relkd.config.load import load_config, read_config, resolve, to_data
from relkd.config.overrides import apply_overrides, deep_merge, parse_override
from relkd.config.schema import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    StageConfig,
    SuiteConfig,
    TeacherConfig,
    TrainConfig,
)
from relkd.config.validate import ConfigError, from_data

__all__ = [
    "ConfigError",
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "StageConfig",
    "SuiteConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "deep_merge",
    "from_data",
    "load_config",
    "parse_override",
    "read_config",
    "resolve",
    "to_data",
]
