"""The experiment layer behind ``relkd run``, ``table``, ``viz``, ``plot``: suites of teachers, methods
and seeds built from a config, their run directory, results tables and figures.

>>> from relkd.config import load_config
>>> from relkd.experiment import run_suite, RunDir
>>> config, _ = load_config("experiments/fashion_mnist/config.yaml", ["seeds=[0]"])
>>> path = run_suite(config)
>>> RunDir(path).results()["kd"][0]["last_acc1"]
"""

from relkd.experiment.results import collect, summarize, write_table
from relkd.experiment.rundir import RunDir
from relkd.experiment.suite import run_dir_of, run_method, run_suite, run_teacher

__all__ = [
    "RunDir",
    "collect",
    "run_dir_of",
    "run_method",
    "run_suite",
    "run_teacher",
    "summarize",
    "write_table",
]
