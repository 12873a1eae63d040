"""The ``relkd`` command (also ``python -m relkd``).

    relkd run [CONFIG] [key.sub=value ...] [--resume] [--quiet]
    torchrun --nproc_per_node N -m relkd run [CONFIG] ...   (data-parallel: relkd.train.parallel)
    relkd table RUN_DIR [--out DIR]
    relkd list [models|losses|datasets|methods|steps|evaluators|transforms]
    relkd viz RUN_DIR ...    relkd plot RUN_DIR ...          (figures: relkd.experiment.viz / .plot)
    relkd analyze RUN_DIR ...                                (relkd.experiment.analyze)

``relkd run`` without a config runs the built-in default experiment (digits). Each subcommand is one
function registered with :func:`command`. Nothing heavy (torch, matplotlib) is imported until a
subcommand runs, so ``relkd --help`` answers at once. ``--import MODULE`` (repeatable) imports a
module of one's own first, so that the models, losses, datasets, steps and evaluators it registers
can be named in configs and on the command line (the config key ``imports:`` does the same).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = ["COMMANDS", "command", "main"]

log = logging.getLogger("relkd")

# name -> (help, add its arguments, run it and return the exit status)
COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {}


def command(name: str, summary: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``fn(args) -> exit status`` as the subcommand ``name`` (``arguments`` adds its options)."""

    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (summary, arguments, fn)
        return fn

    return deco


class UsageError(ValueError):
    """Options that do not fit together (printed as ``relkd <command>: error: ...``, status 2)."""


@contextlib.contextmanager
def _writing(where: str, fix: str) -> Iterator[None]:
    """Turn a failed write (a read-only run directory, a full disk) into one line that says what to do."""
    try:
        yield
    except OSError as e:
        if isinstance(e, FileNotFoundError) and e.filename is None:
            raise
        target = e.filename or where
        raise OSError(f"cannot write {target} ({e.strerror or e}); {fix}") from None


# --- relkd run -------------------------------------------------------------------------------------


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] [key.sub=value ...]",
        help="a YAML config or built-in config name (default: the digits experiment), then overrides",
    )
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    p.add_argument(
        "--overwrite", action="store_true",
        help="delete the run directory first (it holds another configuration's runs)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("run", "run an experiment suite: teachers, methods x seeds, results table", _run_arguments)
def run(args: argparse.Namespace) -> int:
    from relkd.config import load_config
    from relkd.experiment import run_suite
    from relkd.train.parallel import launched_rank

    # Under torchrun every rank runs this; rank 0 alone speaks.
    main = launched_rank() == 0
    items = list(args.items)
    source = items.pop(0) if items and "=" not in items[0] else None
    config, notes = load_config(source, items)
    for note in notes if main else ():
        log.warning("note: %s", note)
    start = time.perf_counter()
    run_dir = run_suite(config, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    if main:
        print(f"wall time {time.perf_counter() - start:.0f} s; results in {run_dir}/results.md")
    return 0


# --- relkd table -----------------------------------------------------------------------------------


def _table_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by relkd run")
    p.add_argument("--out", help="write results.md/.csv here instead of the run directory")
    p.add_argument("--no-write", action="store_true", help="print the table only")


@command("table", "print the results table of a run directory (and write results.md/.csv)", _table_arguments)
def table(args: argparse.Namespace) -> int:
    from relkd.experiment.results import markdown, summarize, write_table
    from relkd.experiment.rundir import RunDir

    if args.no_write:
        run = RunDir(args.run_dir)
        rows = summarize(run.results())
        if not rows:
            raise FileNotFoundError(f"{run.path}: no result.json under teacher/ or <method>/seed<k>/")
        print(markdown(rows), end="")
    else:
        with _writing(args.out or args.run_dir, "pass --out DIR to write the table elsewhere, or --no-write"):
            print(write_table(args.run_dir, args.out), end="")
    return 0


# --- relkd list ------------------------------------------------------------------------------------

LISTS = ("models", "losses", "datasets", "methods", "steps", "evaluators", "transforms")


def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", choices=LISTS, help="one list only")


@command(
    "list", "show the registered models, losses, datasets, methods, steps and evaluators", _list_arguments
)
def list_registered(args: argparse.Namespace) -> int:
    import yaml

    from relkd import configs, data, evaluation, losses, methods, models
    from relkd.config.methods import missing_losses

    sections: dict[str, list[str]] = {}
    if args.what in (None, "models"):
        zoo = models.MODELS.available()
        sections["models"] = [", ".join(zoo), "and torchvision's classification models as torchvision:<name>"]
    sections["losses"] = [", ".join(losses.available())]
    sections["datasets"] = [", ".join(data.available())]
    sections["methods"] = []
    for name in configs.method_names():
        method = yaml.safe_load(configs.method_path(name).read_text()) or {}
        missing = missing_losses(method)
        state = f" (needs loss {', '.join(missing)}, not registered)" if missing else ""
        sections["methods"].append(f"{name:16s} {method.get('description', '')}{state}")
    sections["steps"] = [", ".join(methods.STEPS.available())]
    sections["evaluators"] = [", ".join(evaluation.EVALUATORS.available())]
    sections["transforms"] = [", ".join(methods.BATCH_TRANSFORMS.available())]
    for what, lines in sections.items():
        if args.what in (None, what):
            print(f"{what}:")
            for line in lines:
                print(f"  {line}")
    return 0


# --- relkd viz -------------------------------------------------------------------------------------

FIGURE_FORMATS = ("png", "svg", "pdf")
EXPORT_FORMATS = ("graphml", "gexf", "pyg", "npz")


def _yaml_mapping(text: str) -> dict:
    import yaml

    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{width: 8}}', got {text!r}")
    return value


def _figure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format", nargs="+", default=["png"], choices=FIGURE_FORMATS, dest="formats",
        help="figure formats (default: png)",
    )  # fmt: skip
    p.add_argument("--dpi", type=int, default=None, help="PNG resolution (default 300)")


def _viz_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", help="a directory written by relkd run")
    p.add_argument("--method", nargs="+", help="methods to draw (default: every finished one)")
    p.add_argument("--seed", type=int, default=0, help="the students' seed, and the batch's (default 0)")
    p.add_argument("--batch-size", type=int, default=128, help="test images, class-balanced (default 128)")
    p.add_argument("-k", type=int, default=5, help="neighbours per image in the kNN graphs (default 5)")
    p.add_argument(
        "--relation", nargs="+", default=["cosine", "normalized_distance"], dest="relations",
        help="relation matrices to draw (default: cosine normalized_distance)",
    )  # fmt: skip
    _figure_options(p)
    p.add_argument(
        "--export", nargs="+", default=[], choices=EXPORT_FORMATS,
        help="also write each network's kNN graph to viz/graphs/ in these formats",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto ... (default cpu)")
    p.add_argument("--out", help="output folder (default RUN_DIR/viz, or ./viz with --teacher)")
    alone = p.add_argument_group("without a run directory")
    alone.add_argument("--teacher", help="teacher checkpoint (relkd final.pt or a state dict)")
    alone.add_argument(
        "--student", action="append", default=[], metavar="[NAME=]PATH",
        help="student checkpoint; repeat for several",
    )  # fmt: skip
    alone.add_argument("--dataset", help="registered dataset whose test set gives the batch")
    alone.add_argument("--data-root", help="the dataset's folder")
    for role in ("teacher", "student"):
        alone.add_argument(f"--{role}-model", help=f"{role} model name (default: recorded in its final.pt)")
        alone.add_argument(
            f"--{role}-args", type=_yaml_mapping, default={}, metavar="YAML",
            help=f"{role} constructor arguments, e.g. '{{width: 8}}'",
        )  # fmt: skip


def _student_paths(values: Sequence[str]) -> dict[str, str]:
    from relkd.experiment.networks import recorded

    students: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or Path(value).exists():
            path = value
            name = (recorded(path, "method") if Path(path).is_file() else None) or Path(path).stem
        if name in students:
            raise UsageError(f"two students named {name!r}: name them with --student NAME=PATH")
        students[name] = path
    return students


@command("viz", "draw a run's relation graphs: teacher vs each student on a fixed batch of test images",
         _viz_arguments)  # fmt: skip
def viz(args: argparse.Namespace) -> int:
    from relkd.experiment.viz import viz_checkpoints, viz_run

    options = {
        "seed": args.seed, "batch_size": args.batch_size, "formats": args.formats, "export": args.export,
        "k": args.k, "relations": args.relations, "device": args.device, "dpi": args.dpi,
    }  # fmt: skip
    alone = {"--teacher": args.teacher, "--student": args.student, "--dataset": args.dataset}
    if args.run_dir is not None:
        given = [flag for flag, value in alone.items() if value]
        if given:
            raise UsageError(f"give a RUN_DIR or {', '.join(alone)}, not both (got RUN_DIR and {given[0]})")
        with _writing(args.out or args.run_dir, "pass --out DIR to write the figures elsewhere"):
            viz_run(args.run_dir, method=args.method, out=args.out, **options)
        return 0
    missing = [flag for flag, value in alone.items() if not value]
    if missing:
        raise UsageError(f"give a RUN_DIR, or {', '.join(alone)} (missing {', '.join(missing)})")
    viz_checkpoints(
        args.teacher,
        _student_paths(args.student),
        args.dataset,
        data_root=args.data_root,
        teacher_model=args.teacher_model,
        teacher_args=args.teacher_args,
        student_model=args.student_model,
        student_args=args.student_args,
        out=args.out or "viz",
        **options,
    )
    return 0


# --- relkd plot ------------------------------------------------------------------------------------


def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by relkd run")
    _figure_options(p)
    p.add_argument(
        "--band", default="minmax", choices=["minmax", "std"],
        help="spread over seeds around the mean (default minmax)",
    )  # fmt: skip
    p.add_argument("--out", help="output folder (default RUN_DIR/plots)")


@command("plot", "plot a run's training curves (and agreement curves): every method, mean over seeds",
         _plot_arguments)  # fmt: skip
def plot(args: argparse.Namespace) -> int:
    from relkd.experiment.plot import plot_run

    with _writing(args.out or args.run_dir, "pass --out DIR to write the figures elsewhere"):
        plot_run(args.run_dir, formats=args.formats, band=args.band, dpi=args.dpi, out=args.out)
    return 0


# --- relkd analyze ---------------------------------------------------------------------------------


def _analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by relkd run")
    p.add_argument("--method", nargs="+", help="methods to analyse (default: every finished one)")
    p.add_argument("--seed", type=int, help="the networks' seed (default: the run's first)")
    p.add_argument(
        "--only", nargs="+", dest="analyses", metavar="ANALYSIS",
        help="run only these: cka rsa predictions block_shuffle interpolation criticality (default: all)",
    )  # fmt: skip
    p.add_argument("--kernel", default="linear", choices=["linear", "rbf"], help="CKA kernel (linear)")
    p.add_argument("--eps", type=float, default=0.05, help="criticality: error margin over the final (0.05)")
    p.add_argument("--lambdas", type=int, default=11, help="points per interpolation line (default 11)")
    p.add_argument("--probe-size", type=int, default=512, help="test images for RSA (default 512)")
    _figure_options(p)
    p.add_argument("--export", action="store_true", help="also write the matrices and curves as CSV")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto ... (default cpu)")
    p.add_argument("--out", help="output folder (default RUN_DIR/analysis)")


@command("analyze", "compare a run's networks: layer CKA, RSA, agreement, barriers, module criticality",
         _analyze_arguments)  # fmt: skip
def analyze(args: argparse.Namespace) -> int:
    from relkd.experiment.analyze import ANALYSES, analyze_run

    analyze_run(
        args.run_dir, out=args.out, seed=args.seed, methods=args.method, analyses=args.analyses or ANALYSES,
        kernel=args.kernel, eps=args.eps, lambdas=args.lambdas, probe_size=args.probe_size,
        formats=args.formats, dpi=args.dpi, export=args.export, device=args.device,
    )  # fmt: skip
    return 0


# --- main ------------------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("relkd")
    except PackageNotFoundError:
        from relkd import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relkd", description="Graph-based relational knowledge distillation."
    )
    parser.add_argument("--version", action="version", version=f"relkd {_version()}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="what the relkd logger prints to stderr (default INFO: one line per epoch)",
    )  # fmt: skip
    parser.add_argument(
        "--import", action="append", default=[], dest="imports", metavar="MODULE",
        help="import a module of your own first (its @register calls add models, losses, datasets ...)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, arguments, _) in COMMANDS.items():
        arguments(sub.add_parser(name, help=summary, description=summary))
    return parser


def _setup_logging(level: str) -> None:
    logger = logging.getLogger("relkd")
    logger.setLevel(level)
    if not any(getattr(h, "_relkd", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._relkd = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status.

    Config problems print one ``relkd: config error: ...`` line and return 2; usage errors one
    ``relkd <command>: error: ...`` line and 2; missing files, unreadable checkpoints and stopped
    runs one ``relkd: error: ...`` line and 1.
    """
    parser = _parser()
    # Overrides may follow options (`relkd run cfg.yaml --quiet seeds=[0]`): argparse leaves them over.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "run" or any("=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.items += extra
    _setup_logging(args.log_level)
    # torch-geometric's import triggers torch's own deprecation notice; it says nothing to a user here.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    from relkd.config import ConfigError
    from relkd.experiment.probe import VizUsageError
    from relkd.experiment.suite import TeacherError
    from relkd.train import CheckpointError, NonFiniteLossError

    try:
        from relkd.plugins import import_modules, load_entry_points

        load_entry_points()
        import_modules(args.imports, "--import")
        return COMMANDS[args.command][2](args)
    except ConfigError as e:
        print(f"relkd: config error: {e}", file=sys.stderr)
        return 2
    except (UsageError, VizUsageError) as e:
        print(f"relkd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLossError, TeacherError, FileNotFoundError, ImportError, OSError) as e:
        print(f"relkd: error: {e}", file=sys.stderr)
        return 1
