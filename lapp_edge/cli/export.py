"""`lapp-edge export RUN --out DIR` and `lapp-edge verify DIR` (wired into cli.COMMANDS)."""

from __future__ import annotations

import argparse


def add_export_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="fuse, export to ONNX, verify and package a finished run")
    p.add_argument("run", help="run directory of a finished training run")
    p.add_argument("--out", required=True, help="package directory (must be new or empty, or already hold this model)")
    p.add_argument("--data-dir", default=None, help="test images for verification (default: the run's data directory)")
    p.set_defaults(handler=_run_export)

    p = subparsers.add_parser("verify", help="check a model package's hashes and re-run ORT vs PyTorch")
    p.add_argument("package", help="model package directory")
    p.add_argument("--data-dir", default=None, help="test images for verification (default: where the package says its data "
                   "came from, else the dataset's standard place)")
    p.set_defaults(handler=_run_verify)


def _run_export(args: argparse.Namespace) -> int:
    from lapp_edge.export.package_writer import export_run, tolerance_text

    manifest = export_run(args.run, args.out, args.data_dir)
    check = manifest["verification"]
    print(f"exported {args.run} -> {args.out}: {manifest['model']}, opset {manifest['export']['opset']}, "
          f"ORT vs PyTorch on {check['images']} test images max |diff| {check['max_abs_diff']:.2e} "
          f"({check.get('max_rel_diff', 0.0):.1e} of max|logit|; {tolerance_text(check['tolerance'])}), "
          f"top-1 agreement {check['top1_agreement']:.4f} (lapp-edge verify {args.out} prints the summary)")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from lapp_edge.export.package_writer import format_summary, verify_package
    from lapp_edge.deploy.package import load_package

    verification = verify_package(args.package, args.data_dir)
    print(f"{args.package}: hashes match, verification passed")
    print(format_summary(load_package(args.package).manifest, verification))
    return 0
