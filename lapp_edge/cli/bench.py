"""`lapp-edge bench PACKAGE --target NAME ...`: flags -> run_bench -> table (exit 2 if a target's runtime is missing)."""

from __future__ import annotations

import argparse
import sys

from lapp_edge.deploy.measure import COMPILES_PER_RATIO


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="compile a model package for targets; accuracy and latency")
    p.add_argument("package", help="model package directory (model.onnx + manifest.json)")
    p.add_argument("--target", action="append", required=True,
                   help="target profile: a name (lapp-edge targets lists them) or a YAML path; repeat for several")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: the dataset's standard place)")
    p.add_argument("--work-dir", default=None, help="keep quantized artifacts here for reuse (default: a temporary directory); "
                   "a reused artifact is checked against its authenticated sidecar first")
    p.add_argument("--baseline", default=None, metavar="PACKAGE",
                   help="another package of the same data (the dense network), compiled the same way on every target and "
                        "measured side by side: its top-1 there and the speedup over it, interleaved in one process")
    p.add_argument("--compiles", type=int, default=COMPILES_PER_RATIO,
                   help="fresh compiles of the package and the dense reference behind each predicted-vs-measured latency "
                        "ratio (median taken; one compile's ratio moves by a few percent; default %(default)s)")
    p.add_argument("--test-images", type=int, default=None, metavar="N",
                   help="top-1 on the first N images of the test split (default: all of it); a quicker, noisier check")
    p.set_defaults(handler=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    from lapp_edge.errors import one_line
    from lapp_edge.deploy.bench import format_bench, run_bench

    report = run_bench(args.package, args.target, args.out, args.data_dir, args.work_dir, baseline_dir=args.baseline,
                       compiles=args.compiles, test_images=args.test_images)
    print(format_bench(report))
    unavailable = [t for t in report.targets if t.status != "ok"]
    for target in unavailable:
        print(one_line(f"lapp-edge: error: target {target.target}: {target.message}"), file=sys.stderr)
    return 2 if unavailable else 0
