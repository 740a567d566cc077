"""`lapp-edge ship PACKAGE --target NAME ... --out dist/`: one device bundle per target (run with lapp-edge-run)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_ship_command(subparsers: argparse._SubParsersAction) -> None:
    """`lapp-edge ship PACKAGE --target PROFILE [...] --out DIR`."""
    p = subparsers.add_parser("ship", help="build one device bundle per target profile (run with lapp-edge-run)")
    _add_arguments(p)
    p.set_defaults(handler=_run_ship)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="model package directory (model.onnx + manifest.json)")
    p.add_argument("--target", action="append", required=True, help="target profile: a name (lapp-edge targets) or a YAML path; repeat for several")
    p.add_argument("--out", required=True, help="directory for the bundles (and their .latency.json sidecars)")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: the dataset's standard place)")
    p.add_argument("--replace", action="store_true",
                   help="replace a bundle of the same name in --out built from another package manifest (refused otherwise)")
    p.add_argument("--expected-latency-from", default=None, metavar="DIR",
                   help="embed <DIR>/<bundle>.latency.json in each bundle instead of measuring (reproducible release)")


def _run_ship(args: argparse.Namespace) -> int:
    from lapp_edge.deploy.bundle import SIDECAR_SUFFIX, build_bundles
    from lapp_edge.deploy.package import sha256_of

    for path in build_bundles(args.package, args.target, args.out, args.data_dir, args.expected_latency_from, args.replace):
        sidecar = Path(str(path) + SIDECAR_SUFFIX)
        note = f", expected latency in {sidecar.name}" if not args.expected_latency_from else ", expected latency embedded"
        print(f"{path} ({path.stat().st_size} bytes, sha256 {sha256_of(path)[:16]}{note})")
    return 0
