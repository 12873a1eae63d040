"""The teacher's shifted and scaled accuracy and the teacher-student RSA of a finished Reflect run.

    python experiments/reflect/analysis.py RUN_DIR [--probe-size 1000]

Prints two markdown tables: the teacher's ``shift_scale`` accuracies (the evaluator's options of the
run's config), and per method the second-order representational similarity (RSA, Abnar et al.,
:func:`relkd.analysis.rsa`) between the teacher's and each seed's student's penultimate features
(the authors' ``rep_layer = -1``: the last hidden layer) and logits, on ``probe-size`` test images
(a fixed permutation seeded with 0), clean and moved 2 pixels right, mean ± sample std over seeds.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from relkd.analysis import rsa
from relkd.evaluation.shift import shift_scale_accuracy, translate
from relkd.experiment.networks import deployed_networks, load_teacher
from relkd.experiment.rundir import RunDir
from relkd.experiment.setup import load_bundle, make_batches
from relkd.models import FeatureTaps, resolve_taps
from relkd.train.evaluate import probe_inputs


@torch.no_grad()
def embeddings(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    model.eval()
    taps = FeatureTaps(model, resolve_taps(model, ["penultimate"]))
    try:
        logits = model(x)
        return {"penultimate": taps["penultimate"].flatten(1).clone(), "logits": logits}
    finally:
        taps.remove()


def spread(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--probe-size", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = RunDir(args.run_dir)
    config, _ = run.load_config()
    bundle = load_bundle(config.data, config.seeds[0])
    teacher = load_teacher(run, config, "teacher", bundle).eval()
    _, test = make_batches(bundle, config.data, config.seeds[0], torch.device("cpu"))
    options = dict(config.evaluate.get("shift_scale", {}))
    shifted = shift_scale_accuracy(teacher, test, **options)
    print("| network | " + " | ".join(shifted) + " |")
    print("|---|" + "---:|" * len(shifted))
    print("| teacher | " + " | ".join(f"{v:.2f}" for v in shifted.values()) + " |\n")

    clean = probe_inputs(bundle.test, args.probe_size, torch.device("cpu"))
    black = -torch.tensor(bundle.test.mean) / torch.tensor(bundle.test.std)
    views = {"clean": clean, "moved 2 px": translate(clean, 2, 0, black)}
    teacher_emb = {view: embeddings(teacher, x) for view, x in views.items()}
    columns = [(view, tap) for view in views for tap in ("penultimate", "logits")]
    print("| method | " + " | ".join(f"RSA {tap}, {view}" for view, tap in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for method in config.methods:
        values: dict[tuple[str, str], list[float]] = {c: [] for c in columns}
        for seed in config.seeds:
            seed_bundle = load_bundle(config.data, seed)
            for _, student in deployed_networks(run, config, method, seed, seed_bundle):
                for view, x in views.items():
                    student_emb = embeddings(student, x)
                    for tap in ("penultimate", "logits"):
                        values[(view, tap)].append(rsa(teacher_emb[view][tap], student_emb[tap]))
        print(f"| {method} | " + " | ".join(spread(values[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
