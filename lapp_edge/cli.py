"""Command line: `lapp-edge <command> ...`. Bad input -> one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from lapp_edge.errors import UserError

if TYPE_CHECKING:
    from lapp_edge.train import TrainConfig
from lapp_edge.export_cli import add_export_commands

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage block) and exits with 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    from lapp_edge.train import TrainConfig

    defaults = TrainConfig(out="")
    p = subparsers.add_parser("train", help="train a network (LAPP from scratch, or dense)")
    p.add_argument("--out", required=True, help="run directory (must be new, unless --resume)")
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--dataset", default=defaults.dataset)
    p.add_argument("--data-dir", default=None, help="dataset directory (default: the dataset's standard place)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--prune-epochs", type=int, default=defaults.prune_epochs)
    p.add_argument("--flops-target", type=float, default=defaults.flops_target, help="kept FLOPs ratio in (0, 1]")
    p.add_argument("--channel-multiple", type=int, default=defaults.channel_multiple, help="round widths to this (1: off)")
    p.add_argument("--dense", action="store_true", help="train the dense baseline without LAPP")
    p.add_argument("--no-bypass", dest="bypass", action="store_false", help="no 1x1 bypass branches")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--lr-schedule", default=defaults.lr_schedule, help="cosine or step")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--train-subset", type=int, default=0, help="train on a seeded random subset of this many images")
    p.add_argument("--test-subset", type=int, default=0)
    p.add_argument("--device", default=defaults.device, help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    p.add_argument("--scorer", default=defaults.scorer)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from lapp_edge.fileio import read_json
    from lapp_edge.report import format_report
    from lapp_edge.train import CONFIG, TrainConfig, run_training

    if args.resume:
        saved = read_json(Path(args.out) / CONFIG) if (Path(args.out) / CONFIG).is_file() else None
        if saved is None:
            raise UserError(f"nothing to resume: {Path(args.out) / CONFIG} does not exist")
        config = config_from_saved(saved, Path(args.out) / CONFIG)
        config.out = args.out  # the directory asked for, even if the run was moved or copied since
        config.progress = not args.quiet
    else:
        config = TrainConfig(
            out=args.out, model=args.model, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
            prune_epochs=args.prune_epochs, flops_target=args.flops_target, channel_multiple=args.channel_multiple,
            dense=args.dense, bypass=args.bypass, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, seed=args.seed,
            train_subset=args.train_subset, test_subset=args.test_subset, device=args.device,
            threads=args.threads, scorer=args.scorer, progress=not args.quiet,
        )
    report = run_training(config, resume=args.resume)
    print(format_report(report))
    return 0


def config_from_saved(saved: object, path: Path) -> "TrainConfig":
    """A TrainConfig from a run's config.json; wrong shapes or types are a UserError, not a traceback."""
    from lapp_edge.train import TrainConfig

    if not isinstance(saved, dict):
        raise UserError(f"{path} is not a run configuration (a JSON object)")
    defaults = {f.name: getattr(TrainConfig(out=""), f.name) for f in fields(TrainConfig)}
    values = {}
    for key, value in saved.items():
        if key not in defaults:
            continue
        default = defaults[key]
        if default is None:
            expected: tuple[type, ...] = (str, type(None))
        elif isinstance(default, bool):
            expected = (bool,)
        elif isinstance(default, float):
            expected = (int, float)
        else:
            expected = (type(default),)
        if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
            raise UserError(f"{path}: '{key}' has the wrong type ({type(value).__name__}: {str(value)[:40]!r})")
        values[key] = value
    values["out"] = str(path.parent)
    return TrainConfig(**values)


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from lapp_edge.bench import add_bench_command

    add_bench_command(subparsers)


def _add_calibrate_latency(subparsers: argparse._SubParsersAction) -> None:
    from lapp_edge.latency_calibration import add_calibrate_latency_command

    add_calibrate_latency_command(subparsers)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, add_export_commands, _add_bench, _add_calibrate_latency]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lapp-edge", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args))
    except UserError as error:
        print(f"lapp-edge: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lapp-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
