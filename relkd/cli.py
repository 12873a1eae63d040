"""The ``relkd`` command (also ``python -m relkd``).

    relkd run [CONFIG] [key.sub=value ...] [--resume] [--quiet]
    torchrun --nproc_per_node N -m relkd run [CONFIG] ...   (data-parallel: relkd.train.parallel)
    relkd table RUN_DIR
    relkd list [models|losses|datasets|methods]
    relkd viz RUN_DIR ... / relkd plot RUN_DIR ...      (figures: relkd.viz.commands)

``relkd run`` without a config runs the built-in default experiment (digits). Each subcommand is one
function registered with :func:`command` (or, for the figures, in ``relkd.viz.commands.CLI_COMMANDS``).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence

__all__ = ["COMMANDS", "command", "main"]

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


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] [key.sub=value ...]",
        help="a YAML config or built-in config name (default: the digits experiment), then overrides",
    )
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("run", "run an experiment suite: teacher, methods x seeds, results table", _run_arguments)
def run(args: argparse.Namespace) -> int:
    from relkd.config import load_config
    from relkd.train import run_suite
    from relkd.train.parallel import launched_rank

    # Under torchrun every rank runs this; rank 0 alone speaks.
    main = launched_rank() == 0
    items = list(args.items)
    source = items.pop(0) if items and "=" not in items[0] else None
    config, notes = load_config(source, items)
    for note in notes if main else ():
        print(f"note: {note}", file=sys.stderr)
    start = time.perf_counter()
    run_dir = run_suite(config, resume=args.resume, quiet=args.quiet)
    if main:
        print(f"wall time {time.perf_counter() - start:.0f} s; results in {run_dir}/results.md")
    return 0


@command("table", "print the results table of a run directory (and write results.md/.csv)",
         lambda p: p.add_argument("run_dir", help="a directory written by relkd run"))  # fmt: skip
def table(args: argparse.Namespace) -> int:
    from relkd.results import write_table

    print(write_table(args.run_dir), end="")
    return 0


def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "what", nargs="?", choices=["models", "losses", "datasets", "methods"], help="one list only"
    )


@command("list", "show the registered models, losses, datasets and built-in methods", _list_arguments)
def list_registered(args: argparse.Namespace) -> int:
    import yaml

    from relkd import configs, data, losses, models
    from relkd.config.methods import missing_losses

    zoo = models.MODELS.available()
    external = len(models.available("torchvision:*"))
    sections = {
        "models": [", ".join(zoo), f"and {external} torchvision models as torchvision:<name>"],
        "losses": [", ".join(losses.available())],
        "datasets": [", ".join(data.available())],
        "methods": [],
    }
    for name in configs.method_names():
        method = yaml.safe_load(configs.method_path(name).read_text()) or {}
        missing = missing_losses(method)
        state = f" (needs loss {', '.join(missing)}, not registered)" if missing else ""
        sections["methods"].append(f"{name:10s} {method.get('description', '')}{state}")
    for what, lines in sections.items():
        if args.what in (None, what):
            print(f"{what}:")
            for line in lines:
                print(f"  {line}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status.

    Config and checkpoint problems print one ``relkd: error: ...`` line and return 2 and 1.
    """
    # torch-geometric's import triggers torch's own deprecation notice; it says nothing to a user here.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    from relkd.config import ConfigError
    from relkd.train import CheckpointError, NonFiniteLossError

    # `relkd viz` and `relkd plot` live with the figures; matplotlib loads only when the command runs.
    from relkd.viz.commands import CLI_COMMANDS

    commands = {**COMMANDS, **CLI_COMMANDS}
    parser = argparse.ArgumentParser(
        prog="relkd", description="Graph-based relational knowledge distillation."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, arguments, _) in commands.items():
        arguments(sub.add_parser(name, help=summary, description=summary))
    # Overrides may follow options (`relkd run cfg.yaml --quiet seeds=[0]`): argparse leaves them over.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "run" or any("=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.items += extra
    try:
        return commands[args.command][2](args)
    except ConfigError as e:
        print(f"relkd: config error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"relkd: error: {e}", file=sys.stderr)
        return 1
