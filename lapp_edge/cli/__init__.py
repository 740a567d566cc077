"""Command line: `lapp-edge <command> ...`. Bad input -> one line on stderr, exit code 2.

One module per command (`cli/<command>.py`: flags -> config -> stage function -> printed
summary); each stage is also callable from Python with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from lapp_edge.errors import UserError

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage block) and exits with 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


def _commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    from lapp_edge.cli.bench import add_bench_command
    from lapp_edge.cli.calibrate import add_calibrate_latency_command
    from lapp_edge.cli.export import add_export_commands
    from lapp_edge.cli.targets import add_targets_command
    from lapp_edge.cli.train import add_train_command

    return [add_train_command, add_export_commands, add_bench_command, add_calibrate_latency_command, add_targets_command]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lapp-edge", description="Train slim CNNs with LAPP, export them fused, measure them on targets.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add_command in _commands():
        add_command(subparsers)
    return parser


def one_line(message: str) -> str:
    """`message` with control characters (newlines included) shown escaped: an error is always one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args))
    except UserError as error:
        print(f"lapp-edge: error: {one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lapp-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
