"""`lapp-edge targets`: the shipped target profiles, and whether this machine can run each."""

from __future__ import annotations

import argparse


def add_targets_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("targets", help="list the target profiles (usable by name with --target)")
    p.set_defaults(handler=run_targets_command)


def run_targets_command(args: argparse.Namespace) -> int:
    from lapp_edge.deploy.backends import runtime_available
    from lapp_edge.deploy.targets import load_target
    from lapp_edge.resources import find_profile, profile_names

    print(f"{'name':24s} {'backend':16s} {'precision':9s} {'threads':>7s} {'batches':10s} here")
    for name in profile_names():
        profile = load_target(find_profile(name))
        available, why = runtime_available(profile.backend)
        print(f"{profile.name:24s} {profile.backend:16s} {profile.precision:9s} {profile.threads:7d} "
              f"{','.join(map(str, profile.batch_sizes)):10s} {'yes' if available else 'no: ' + why}")
    return 0
