"""Clean and robust accuracy of the teachers of a finished suite, measured by the suite's evaluators.

The results table measures the students only; a teacher trained by a method (the robust teacher here,
by PGD adversarial training) is measured with the same evaluators by this script::

    python experiments/rslad/teacher_robust.py /tmp/relkd_runs/rslad
"""

from __future__ import annotations

import sys

import yaml

from relkd.config import load_config
from relkd.evaluation import EvalContext, build_evaluator
from relkd.experiment import RunDir
from relkd.experiment.setup import build_model, load_bundle, load_weights, make_batches, resolve_device
from relkd.experiment.suite import used_teachers


def main(path: str) -> None:
    run_dir = RunDir(path)
    config, _ = load_config(yaml.safe_load(run_dir.config.read_text()))
    device = resolve_device(config.device)
    for name in used_teachers(config):
        spec = config.teachers[name]
        bundle = load_bundle(spec.data, spec.seed)
        teacher = build_model(spec, bundle)
        load_weights(str(run_dir.teacher(name).final), teacher, "teacher")
        teacher.to(device).eval()
        _, test = make_batches(bundle, spec.data, spec.seed, device)
        ctx = EvalContext(name, {name: teacher}, {"test": test}, device)
        for evaluator, options in config.evaluate.items():
            numbers = build_evaluator(evaluator, options)(ctx)
            print(name, evaluator, {k: round(v, 2) for k, v in numbers.items()})


if __name__ == "__main__":
    main(sys.argv[1])
