"""`lapp-edge baseline --target NAME`: measure this machine's latency ratios and record them in the profile;
`lapp-edge latency-check --target NAME`: measure and compare with the recorded ones (exit 2 on a regression)."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from lapp_edge.deploy.measure import COMPILES_PER_RATIO


def add_baseline_commands(subparsers: argparse._SubParsersAction) -> None:
    for name, help_text, handler in (
        ("baseline", "measure this machine's dense/slim speedup and ratio to the reference target; record them in the profile",
         run_baseline_command),
        ("latency-check", "measure a target's speedup and ratio to its reference target; compare with its baselines",
         run_check_command),
    ):
        p = subparsers.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.add_argument("--target", action="append", required=True, help="target profile: a name or a YAML path; repeat for several")
        p.add_argument("--batch", type=int, action="append", default=None, help="batch size (repeat; default: the profile's)")
        p.add_argument("--blocks", type=int, default=12, help="interleaved A/B blocks per ratio (default 12)")
        p.add_argument("--compiles", type=int, default=COMPILES_PER_RATIO,
                       help="fresh compiles of the models per figure, median taken (default %(default)s: one compile moves a ratio a few percent)")
        p.set_defaults(handler=handler)


def _measure(args: argparse.Namespace, records: bool = False) -> list:
    from lapp_edge.deploy.measure import RatioProtocol
    from lapp_edge.deploy.regression import measure_target
    from lapp_edge.deploy.targets import load_target
    from lapp_edge.errors import UserError
    from lapp_edge.fileio import check_output_location
    from lapp_edge.resources import find_profile

    if args.blocks < 1 or args.compiles < 1 or any(b <= 0 for b in args.batch or []):
        raise UserError("--blocks, --compiles and --batch must be positive")
    profiles = [load_target(t) for t in args.target]
    for profile in profiles if records else []:        # baseline writes each profile's file after minutes of measuring
        check_output_location(find_profile(profile.path or profile.name), "--target", "file")
    results = []
    with tempfile.TemporaryDirectory(prefix="lapp-regression-") as work:
        for profile in profiles:
            batches = sorted(set(args.batch or profile.batch_sizes))
            results.append((profile, measure_target(profile, batches, Path(work), RatioProtocol(blocks=args.blocks),
                                                          compiles=args.compiles)))
    return results


def run_baseline_command(args: argparse.Namespace) -> int:
    from lapp_edge.deploy.regression import format_results, record_baseline

    command = "lapp-edge baseline " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    for profile, results in _measure(args, records=True):
        print(format_results(results))
        print(f"recorded in {record_baseline(profile, results, command)}")
    return 0


def run_check_command(args: argparse.Namespace) -> int:
    from lapp_edge.deploy.regression import format_results

    failed = False
    for _, results in _measure(args):
        print(format_results(results))
        failed = failed or any(r.problems for r in results)
    return 2 if failed else 0
