"""Interpolating networks with BatchNorm: running statistics interpolated (the authors' code) versus
re-estimated at every point (relkd's default), on two small ResNets trained from scratch on digits.

    python experiments/transfer/batchnorm.py --out /tmp/relkd_bn
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from relkd import analysis as A
from relkd.config import load_config
from relkd.data import make_loader
from relkd.experiment import RunDir, run_suite
from relkd.experiment.setup import build_model, load_bundle, load_weights, make_eval_loader

SUITE = {
    "name": "transfer_batchnorm",
    "data": {"name": "digits", "batch_size": 64},
    "teacher": None,
    "student": {"model": "small_resnet", "args": {"width": 8}},
    "train": {"epochs": 15, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
              "schedule": {"name": "cosine"}},
    "methods": ["baseline"],
    "seeds": [0, 1],
    "threads": 1,
    "tensorboard": False,
    "log_agreement": False,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/relkd_bn")
    args = parser.parse_args(argv)
    config, _ = load_config({**SUITE, "out": args.out})
    run = RunDir(run_suite(config, quiet=True, echo=lambda _: None))
    bundle = load_bundle(config.data, 0)
    nets = []
    for seed in config.seeds:
        net = build_model(config.student, bundle)
        load_weights(str(run.run("baseline", seed).final), net, "student")
        nets.append(net)
    test = list(make_loader(bundle.test, 256, False, 0, augment=False))
    train = list(make_eval_loader(bundle, config.data, torch.device("cpu")))
    lambdas = [i / 10 for i in range(11)]
    print("| BatchNorm statistics | error at λ = 0, 0.5, 1 (%) | barrier (error pts) | barrier (nats) |")
    print("|---|---|---:|---:|")
    for bn in ("interpolate", "recompute"):
        curve = A.interpolate(nets[0], nets[1], lambdas, test, bn=bn, bn_loader=train)
        ends = ", ".join(f"{100 * curve.error[i]:.1f}" for i in (0, 5, 10))
        print(f"| {bn} | {ends} | {100 * curve.barrier:.1f} | {curve.loss_barrier:.2f} |")
    print(f"\nrun directory: {Path(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
