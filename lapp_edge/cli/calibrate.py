"""`lapp-edge calibrate-latency`: flags -> calibrate -> fit summary."""

from __future__ import annotations

import argparse
import shlex

from lapp_edge.errors import UserError


def add_calibrate_latency_command(subparsers: argparse._SubParsersAction) -> None:
    from lapp_edge.deploy.measure import RatioProtocol

    defaults = RatioProtocol()
    p = subparsers.add_parser("calibrate-latency", help="fit a target's latency against FLOPs over random width configurations")
    p.add_argument("--target", required=True, help="target profile: a name (lapp-edge targets) or a YAML path")
    p.add_argument("--model", default="resnet20", help="model family (default resnet20)")
    p.add_argument("--configs", type=int, default=24, help="width configurations to measure (>= 3; default 24)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random width configurations (default 0)")
    p.add_argument("--batch", type=int, action="append", default=None, help="batch size to measure (repeat; default: the profile's batch sizes, those bench measures)")
    p.add_argument("--out", default="latency-data", help="directory for the fit JSON, its PNG and the dense reference ONNX "
                   "(default latency-data/, searched before the shipped latency data)")
    p.add_argument("--blocks", type=int, default=defaults.blocks, help="interleaved A/B blocks per measurement")
    p.add_argument("--max-other-cpu", type=float, default=defaults.max_other_cpu,
                   help="retry a measurement while other processes use more than this share of the machine")
    p.add_argument("--retries", type=int, default=defaults.retries,
                   help="measurements repeated while the machine is busy, before the ratio is kept and flagged")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=run_calibrate_latency_command)


def run_calibrate_latency_command(args: argparse.Namespace) -> int:
    from lapp_edge.deploy.measure import RatioProtocol
    from lapp_edge.latency.calibrate import calibrate, format_result

    if args.blocks < 1 or args.retries < 0 or not 0 < args.max_other_cpu <= 1:
        raise UserError("--blocks must be >= 1, --retries >= 0 and --max-other-cpu in (0, 1]")
    options = RatioProtocol(blocks=args.blocks, max_other_cpu=args.max_other_cpu, retries=args.retries)
    command = " ".join(["lapp-edge calibrate-latency", "--target", shlex.quote(args.target), "--model", shlex.quote(args.model),
                        "--configs", str(args.configs), "--seed", str(args.seed),
                        *[f"--batch {b}" for b in (args.batch or [])], "--out", shlex.quote(args.out)])
    result = calibrate(args.target, args.model, args.configs, args.seed, args.out, args.batch, options, command,
                       progress=not args.quiet)
    print(format_result(result))
    return 0
