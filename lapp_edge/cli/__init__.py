"""Command line: `lapp-edge <command> ...`. Bad input -> one line on stderr, exit code 2.

One module per command (`cli/<command>.py`: flags -> config -> stage function -> printed
summary); each stage is also callable from Python with the same arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from lapp_edge.errors import UserError, one_line, os_error_text

EXIT_USAGE = 2
DEBUG_VARIABLE = "LAPP_EDGE_DEBUG"     # set (to anything): an OSError shows its traceback instead of one line


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage block) and exits with 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]      # "lapp-edge train" -> "train"; main prints "lapp-edge: error: "
        raise UserError(f"{command}: {message}" if command else message)


def _commands() -> list[tuple[tuple[str, ...], Callable[[argparse._SubParsersAction], None]]]:
    """(command names, the function adding them) in the order `--help` lists them."""
    from lapp_edge.cli.baseline import add_baseline_commands
    from lapp_edge.cli.bench import add_bench_command
    from lapp_edge.cli.calibrate import add_calibrate_latency_command
    from lapp_edge.cli.profile_layers import add_profile_layers_command
    from lapp_edge.cli.run_all import add_run_all_command
    from lapp_edge.cli.ship import add_ship_command
    from lapp_edge.cli.export import add_export_commands
    from lapp_edge.cli.targets import add_targets_command
    from lapp_edge.cli.train import add_train_command

    return [(("train",), add_train_command), (("export", "verify"), add_export_commands), (("bench",), add_bench_command),
            (("calibrate-latency",), add_calibrate_latency_command), (("profile-layers",), add_profile_layers_command),
            (("ship",), add_ship_command),
            (("baseline", "latency-check"), add_baseline_commands), (("targets",), add_targets_command),
            (("run-all",), add_run_all_command)]


def _needs_torch(names: tuple[str, ...], subparsers: argparse._SubParsersAction, error: ImportError) -> None:
    """Commands whose set-up needs PyTorch, on a machine without it (a device): each says so in one line."""
    def refuse(args: argparse.Namespace) -> int:
        raise UserError(f"lapp-edge {args.command} needs PyTorch, which cannot be imported here ({error}); "
                        "install it with 'pip install torch torchvision' (bench and targets work without it)")

    for name in names:
        p = subparsers.add_parser(name, help="(needs PyTorch)", add_help=False)
        p.set_defaults(handler=refuse, accepts_any_arguments=True)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lapp-edge", description="Train slim CNNs with LAPP, export them fused, measure them on targets.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for names, add_command in _commands():
        try:
            add_command(subparsers)
        except ImportError as error:
            if not str(getattr(error, "name", "") or error).startswith(("torch", "torchvision")) and "torch" not in str(error):
                raise
            _needs_torch(names, subparsers, error)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown and not getattr(args, "accepts_any_arguments", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return int(args.handler(args))
    except UserError as error:
        print(f"lapp-edge: error: {one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as error:
        if "torch" not in str(error):
            raise
        print(f"lapp-edge: error: this command needs PyTorch, which cannot be imported here ({one_line(str(error))}); "
              "install it with 'pip install torch torchvision' (bench and targets work without it)", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        # what the checks before the work cannot foresee: a disk that fills, a mount gone read-only
        if os.environ.get(DEBUG_VARIABLE):
            raise
        print(f"lapp-edge: error: {one_line(os_error_text(error))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lapp-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
