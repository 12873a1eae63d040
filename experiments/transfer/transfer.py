"""What is being transferred? Neyshabur, Sedghi & Zhang (NeurIPS 2020) at CPU scale, on Fashion-MNIST.

Upstream: ``pretrain.yaml`` (a relkd suite) trains a LeNet on classes 0-4. Downstream: classes 5-9,
1,000 labelled training images, every image block-shuffled with one fixed permutation per block size
k (k = 28: the plain images). For each k and seed, the same network is trained from the pre-trained
weights (``P-T``, a new seeded head) and from a random initialisation (``RI-T``), with one recipe.
Then, with :mod:`relkd.analysis`: accuracy per k, the barrier on the line between two P-T runs and
between two RI-T runs, their CKA, ℓ2 distance and shared mistakes, and the module criticality of
each (rewinding toward the pre-trained weights for P-T, toward the random initialisation for RI-T).

relkd's engine trains every network; this script exists because a suite cannot yet start a
student from a checkpoint (see the README).

    python experiments/transfer/transfer.py --out /tmp/relkd_transfer
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from relkd import analysis as A
from relkd.config import DataConfig, ModelConfig, TrainConfig, load_config
from relkd.experiment import RunDir, run_suite
from relkd.experiment.setup import build_model, load_bundle, load_weights, make_batches, make_eval_loader
from relkd.train import Engine, build_stages
from relkd.train.evaluate import probe_inputs
from relkd.train.seeding import seed_everything
from relkd.viz.analysis import interpolation_curves
from relkd.viz.save import save_figure

HERE = Path(__file__).resolve().parent
INITS = ("P-T", "RI-T")
BLOCKS = (1, 2, 4, 7, 14, 28)
SEEDS = (0, 1, 2)
SHUFFLE_SEED = 1234  # the authors' block-shuffling seed offset (configs/p200_pix_shuffle.py)
MODEL = ModelConfig("lenet", {"width": 8})
DATA = DataConfig(
    name="fashion_mnist", classes=[5, 6, 7, 8, 9], train_subset=1000, subset_seed=0, augment=False,
    batch_size=64, test_batch_size=1000,
)  # fmt: skip
RECIPE = TrainConfig(
    epochs=15,
    optimizer={"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4},
    schedule={"name": "cosine"},
)
LAMBDAS = [i / 10 for i in range(11)]
EPS = 0.05  # criticality: the error may rise this much above the network's final training error


def shuffled(bundle: Any, k: int) -> Any:
    """The bundle with every training and test image block-shuffled (one permutation for all)."""

    def shuffle(dataset: Any) -> Any:
        out = copy.copy(dataset)
        out.images = A.block_shuffle(dataset.images, k, seed=SHUFFLE_SEED)
        return out

    return dataclasses.replace(bundle, train=shuffle(bundle.train), test=shuffle(bundle.test))


def pretrain(out: Path) -> Path:
    """The upstream network (``pretrain.yaml`` through ``relkd run``; reused when finished)."""
    config, _ = load_config(HERE / "pretrain.yaml", [f"out={out / 'pretrain'}"])
    run = RunDir(run_suite(config, quiet=True))
    return run.run("baseline", 0).final


def initial(init: str, seed: int, bundle: Any, pretrained: Path) -> torch.nn.Module:
    """A network as fine-tuning (``P-T``: pre-trained body, a new head drawn with ``seed``) or training
    from scratch (``RI-T``) starts it."""
    seed_everything(seed)
    net = build_model(MODEL, bundle)
    if init == "P-T":
        head = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("fc.")}
        load_weights(str(pretrained), net, "student")
        net.load_state_dict({**net.state_dict(), **head})
    return net


def train(init: str, k: int, seed: int, bundle: Any, pretrained: Path, out: Path) -> dict[str, Any]:
    """Train one downstream network with relkd's engine (reused when its files exist)."""
    folder = out / f"k{k}" / init / f"seed{seed}"
    if (folder / "result.json").is_file() and (folder / "init.pt").is_file():
        return json.loads((folder / "result.json").read_text())
    net = initial(init, seed, bundle, pretrained)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "init.pt")
    device = torch.device("cpu")
    batches, test = make_batches(bundle, DATA, seed, device)
    engine = Engine(
        {"student": net},
        build_stages(None, RECIPE, {}),
        batches,
        test,
        folder,
        num_data=bundle.num_train,
        num_classes=bundle.num_classes,
        probe=probe_inputs(bundle.test, 4, device),
        device=device,
        log_agreement=False,
        quiet=True,
        tensorboard=False,
        info={"method": init, "seed": seed, "model": MODEL.model, "block": k},
        label=f"{init} k{k} s{seed}",
    )
    result = engine.fit()
    print(f"k={k:2d} {init:4s} seed {seed}: test top-1 {result['last_acc1']:.2f}%", flush=True)
    return result


def load(init: str, k: int, seed: int, bundle: Any, out: Path) -> torch.nn.Module:
    net = build_model(MODEL, bundle)
    load_weights(str(out / f"k{k}" / init / f"seed{seed}" / "final.pt"), net, "student")
    return net.eval()


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def analyse(out: Path, base: Any) -> dict[str, Any]:
    """Every number of the README's tables, from the trained networks."""
    record: dict[str, Any] = {"accuracy": {}, "pairs": {}, "criticality": {}, "p-t_vs_ri-t": {}}
    for k in BLOCKS:
        bundle = shuffled(base, k)
        test = list(make_batches(bundle, DATA, 0, torch.device("cpu"))[1])
        train_batches = list(make_eval_loader(bundle, DATA, torch.device("cpu")))
        predictions = {}
        for init in INITS:
            results = [out / f"k{k}" / init / f"seed{s}" / "result.json" for s in SEEDS]
            record["accuracy"][f"{k}/{init}"] = [json.loads(r.read_text())["last_acc1"] for r in results]
            nets = {s: load(init, k, s, bundle, out) for s in SEEDS}
            logits = predictions[init] = {s: A.predict(nets[s], test) for s in SEEDS}
            pairs = []
            for a, b in itertools.combinations(SEEDS, 2):
                curve = A.interpolate(nets[a], nets[b], LAMBDAS, test, bn_loader=train_batches)
                cka = A.layer_cka(nets[a], nets[b], test, ["penultimate"], ["penultimate"]).matrix[0, 0]
                (la, y), (lb, _) = logits[a], logits[b]
                table = A.mistakes(la, lb, y)
                pairs.append({
                    "seeds": [a, b], "curve": curve.as_dict(), "cka_penultimate": float(cka),
                    "distance": A.parameter_distance(nets[a], nets[b]),
                    "common_mistakes": table.common_mistakes / table.total,
                    "uncommon_mistakes": (table.only_a_correct + table.only_b_correct) / table.total,
                    "top1_agreement": A.topk_agreement(la, lb),
                })  # fmt: skip
            record["pairs"][f"{k}/{init}"] = pairs
            if k in (BLOCKS[0], BLOCKS[-1]):
                start = torch.load(out / f"k{k}" / init / "seed0" / "init.pt", weights_only=True)
                error, _ = A.evaluate_error(nets[0], train_batches)
                found = A.module_criticality(nets[0], start, train_batches, min(1.0, error + EPS))
                record["criticality"][f"{k}/{init}"] = {
                    "train_error": error,
                    "modules": {m: c.as_dict() for m, c in found.items()},
                }
            print(f"analysed k={k} {init}", flush=True)
        # The paper's mistakes analysis: a P-T run against the RI-T run of the same seed.
        record["p-t_vs_ri-t"][str(k)] = [
            A.mistakes(
                predictions["P-T"][s][0], predictions["RI-T"][s][0], predictions["P-T"][s][1]
            ).fractions()
            for s in SEEDS
        ]
    return record


def tables(record: dict[str, Any]) -> str:
    """The README's three tables (markdown)."""
    lines = ["| block size k | P-T top-1 (%) | RI-T top-1 (%) | P-T − RI-T |", "|---:|---:|---:|---:|"]
    for k in BLOCKS:
        pt, ri = record["accuracy"][f"{k}/P-T"], record["accuracy"][f"{k}/RI-T"]
        gap = [a - b for a, b in zip(pt, ri, strict=True)]
        lines.append(f"| {k} | {pm(pt)} | {pm(ri)} | {pm(gap)} |")
    columns = [
        ("barrier (error pts)", lambda p: p["curve"]["barrier"], 100, 1),
        ("CKA penultimate", lambda p: p["cka_penultimate"], 1, 3),
        ("ℓ2 distance", lambda p: p["distance"]["total"], 1, 1),
        ("top-1 agreement (%)", lambda p: p["top1_agreement"], 100, 1),
        ("common mistakes (%)", lambda p: p["common_mistakes"], 100, 1),
        ("uncommon mistakes (%)", lambda p: p["uncommon_mistakes"], 100, 1),
    ]
    lines += [
        "",
        "| k | pairs | " + " | ".join(c[0] for c in columns) + " |",
        "|---:|---|" + "---:|" * len(columns),
    ]
    for k, init in itertools.product(BLOCKS, INITS):
        pairs = record["pairs"][f"{k}/{init}"]
        cells = [pm([get(p) for p in pairs], scale, digits) for _, get, scale, digits in columns]
        lines.append(f"| {k} | {init} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| k | both right (%) | only P-T right (%) | only RI-T right (%) | both wrong (%) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for k in BLOCKS:
        rows = record["p-t_vs_ri-t"][str(k)]
        cells = [
            pm([r[key] for r in rows], 100, 1) for key in ("both_correct", "only_a_correct", "only_b_correct")
        ]
        cells.append(pm([r["same_mistake"] + r["different_mistake"] for r in rows], 100, 1))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    modules = list(next(iter(record["criticality"].values()))["modules"])
    lines += [
        "",
        "| k | network (seed 0) | train error (%) | " + " | ".join(f"{m}: α, μ" for m in modules) + " |",
        "|---:|---|---:|" + "---:|" * len(modules),
    ]
    for key, found in record["criticality"].items():
        k, init = key.split("/")
        cells = []
        for m in modules:
            c = found["modules"][m]
            mu = "∞" if c["criticality"] is None else f"{c['criticality']:.3g}"
            cells.append(f"{c['rewind_alpha']}, {mu}")
        lines.append(f"| {k} | {init} | {100 * found['train_error']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figures(record: dict[str, Any], out: Path, dpi: int) -> list[Path]:
    """The README figure (accuracy per block size, the two lines at k = 28, criticality) and the
    curves of every pair at k = 28."""
    fig = Figure(figsize=(14.0, 3.9), layout="constrained")
    ax_acc, ax_int, ax_crit = fig.subplots(1, 3, width_ratios=[1.0, 1.0, 1.25])
    colours = {"P-T": "tab:blue", "RI-T": "tab:orange"}
    for init in INITS:
        values = np.array([record["accuracy"][f"{k}/{init}"] for k in BLOCKS])
        ax_acc.errorbar(BLOCKS, values.mean(1), yerr=values.std(1, ddof=1), marker="o", capsize=3,
                        color=colours[init], label=init)  # fmt: skip
        pair = record["pairs"][f"{BLOCKS[-1]}/{init}"][0]
        c = pair["curve"]
        label = f"{init}, seeds {pair['seeds'][0]} → {pair['seeds'][1]}: barrier {100 * c['barrier']:.1f} pts"
        ax_int.plot(c["lambdas"], np.array(c["error"]) * 100, marker="o", markersize=3,
                    color=colours[init], label=label)  # fmt: skip
    ax_acc.set_xscale("log", base=2)
    ax_acc.set_xticks(BLOCKS, [str(k) for k in BLOCKS])
    ax_acc.minorticks_off()
    ax_acc.set_xlabel("block size k (28: no shuffling)")
    ax_acc.set_ylabel("test top-1 (%), mean ± std over 3 seeds")
    ax_acc.set_title("fine-tuned (P-T) vs from scratch (RI-T)", fontsize=10)
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    ax_int.set_xlabel("λ  (0: first run, 1: second)")
    ax_int.set_ylabel("test error (%)")
    ax_int.set_title(f"the straight line between two runs (k = {BLOCKS[-1]})", fontsize=10)
    ax_int.legend(fontsize=7)
    ax_int.grid(alpha=0.3)
    rows = list(record["criticality"])
    modules = list(record["criticality"][rows[0]]["modules"])
    alpha = [[record["criticality"][r]["modules"][m]["rewind_alpha"] for m in modules] for r in rows]
    values = np.array([[np.nan if a is None else a for a in row] for row in alpha], dtype=float)
    image = ax_crit.imshow(values, cmap="magma_r", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        text, dark = ("–", False) if np.isnan(v) else (f"{v:.1f}", v > 0.6)
        ax_crit.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax_crit.set_xticks(range(len(modules)), modules)
    ax_crit.set_yticks(range(len(rows)), [f"{r.split('/')[1]}, k = {r.split('/')[0]}" for r in rows])
    ax_crit.set_title(f"module criticality: smallest α within final error + {EPS:g}", fontsize=10)
    fig.colorbar(image, ax=ax_crit, label="rewinding α (1: critical)")
    written = save_figure(fig, out / "transfer", dpi=dpi)
    curves = {}
    for init in INITS:
        for p in record["pairs"][f"{BLOCKS[-1]}/{init}"]:
            c = p["curve"]
            label = f"{init} seeds {p['seeds'][0]}→{p['seeds'][1]}"
            curves[label] = A.InterpolationCurve(c["lambdas"], c["error"], c["loss"])
    written += save_figure(interpolation_curves(curves), out / "interpolation_k28", dpi=dpi)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="/tmp/relkd_transfer", help="run folder (default /tmp/relkd_transfer)"
    )
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)
    start = time.perf_counter()
    pretrained = pretrain(out)
    print(f"pre-trained: {pretrained} ({time.perf_counter() - start:.0f} s)", flush=True)
    base = load_bundle(DATA, 0)
    for k in BLOCKS:
        bundle = shuffled(base, k)
        for init, seed in itertools.product(INITS, SEEDS):
            train(init, k, seed, bundle, pretrained, out)
    trained = time.perf_counter()
    record = analyse(out, base)
    record["wall_time_s"] = {"train": trained - start, "analysis": time.perf_counter() - trained}
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    text = tables(record)
    (out / "results.md").write_text(text)
    print(text)
    for path in figures(record, out, args.dpi):
        print(path)
    print(f"wall time {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
