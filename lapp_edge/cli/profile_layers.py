"""`lapp-edge profile-layers`: flags -> latency.profile_layers -> table summary."""

from __future__ import annotations

import argparse
import shlex

from lapp_edge.deploy.measure import COMPILES_PER_RATIO
from lapp_edge.errors import UserError


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """"1x28x28" -> (1, 28, 28); UserError (one line) for anything else."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and 0 < int(p) <= 4096 for p in parts):
        raise UserError(f"--input must be CxHxW with positive integers (e.g. 1x28x28), got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def add_profile_layers_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile-layers", help="measure a target's layer latency table for a model (latency-aware LAPP)",
                              description="Measure, on one target, the latency of each of a model's conv shapes over the "
                                          "widths the target's channel multiple allows, then whole networks at random widths "
                                          "to fit and check the table's prediction (held-out error vs the FLOPs fit).")
    p.add_argument("--target", default="", help="target profile: a name (lapp-edge targets) or a YAML path (required unless --refit)")
    p.add_argument("--refit", default="", metavar="TABLE", help="fit TABLE's whole-network model again from the measurements it "
                   "stores, without measuring (rewrites it in place; with --in-network, calibration networks' node "
                   "profiles are measured first)")
    p.add_argument("--model", default="resnet20", help="model family (default resnet20)")
    p.add_argument("--input", default="", help="input shape CxHxW (default: the target profile's)")
    p.add_argument("--configs", type=int, default=24, help="whole networks measured to fit and check the table (default 24)")
    p.add_argument("--batch", type=int, action="append", default=None, help="batch size (repeat; default: the profile's)")
    p.add_argument("--grid-multiple", dest="channel_multiple", type=int, default=0, help="widths measured are multiples of this (default: the target profile's channel multiple on this CPU, what train --target rounds to)")
    p.add_argument("--no-groups", dest="coupled", action="store_false", help="inner convs only (as train --no-groups)")
    p.add_argument("--max-grid", type=int, default=12, help="widths measured per axis of a layer shape (default 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="latency-data", help="directory for the table (default latency-data/, searched first)")
    p.add_argument("--reuse-layers", default="", metavar="TABLE",
                   help="keep TABLE's layer points (same target, model, input, multiple, batches, machine) and measure "
                        "only the whole networks again")
    p.add_argument("--network-compiles", type=int, default=COMPILES_PER_RATIO,
                   help="fresh compiles of each whole network and the dense one; its ratio is their median (default %(default)s)")
    p.add_argument("--block-removal", action="store_true",
                   help="about half the whole networks also remove residual branches (what train --block-removal "
                        "ends with), so the fit covers such plans")
    p.add_argument("--in-network", action="store_true",
                   help="profile calibration networks node by node on the target's runtime (ONNX Runtime, OpenVINO) and "
                        "correct each layer point to what it costs inside them before the fit; with --refit TABLE: "
                        "measure them for TABLE (this machine's) and fit again from its stored networks")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=run_profile_layers_command)


def recorded_command(args: argparse.Namespace) -> str:
    """The command line a table records (its `command`): every option of this run that shapes the table, so that
    running it again measures the same table (`--quiet` left out). Found missing before: `--grid-multiple`,
    `--no-groups` and `--seed`, without which the recorded command measured on another grid."""
    return " ".join([
        "lapp-edge profile-layers", "--target", shlex.quote(args.target), "--model", shlex.quote(args.model),
        *(["--input", shlex.quote(args.input)] if args.input else []), "--configs", str(args.configs),
        *[f"--batch {b}" for b in (args.batch or [])],
        *(["--grid-multiple", str(args.channel_multiple)] if args.channel_multiple else []),
        *([] if args.coupled else ["--no-groups"]), "--max-grid", str(args.max_grid), "--seed", str(args.seed),
        *(["--reuse-layers", shlex.quote(args.reuse_layers)] if args.reuse_layers else []),
        "--network-compiles", str(args.network_compiles), *(["--block-removal"] if args.block_removal else []),
        *(["--in-network"] if args.in_network else []), "--out", shlex.quote(args.out),
    ])


def run_profile_layers_command(args: argparse.Namespace) -> int:
    from lapp_edge.costs.latency_table import load_table
    from lapp_edge.latency.profile_layers import format_table_summary, profile_layers

    if args.refit:
        from lapp_edge.latency.profile_layers import refit_table

        path = refit_table(args.refit, seed=args.seed, in_network=args.in_network, progress=not args.quiet)
        print(format_table_summary(load_table(path), path))
        return 0
    if not args.target:
        raise UserError("profile-layers needs --target PROFILE (or --refit TABLE)")
    shape = parse_input_shape(args.input) if args.input else None
    if args.channel_multiple < 0:
        raise UserError(f"--grid-multiple must be positive (0: the target's channel multiple), got {args.channel_multiple}")
    command = recorded_command(args)
    path = profile_layers(args.target, args.model, shape, args.configs, args.batch, args.channel_multiple, args.coupled,
                          args.out, args.seed, args.max_grid, command=command, progress=not args.quiet,
                          reuse_layers=args.reuse_layers or None, network_compiles=args.network_compiles,
                          block_removal=args.block_removal, in_network=args.in_network)
    print(format_table_summary(load_table(path), path))
    return 0
