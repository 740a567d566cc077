"""Build and bench a model package (default: the demo package) on GPU target profiles.

For each profile (default: the two TensorRT ones) and each of its batch sizes: build the
engine (cached under --work-dir, so a second run reuses it), run the full test split for
top-1 and agreement with the package's fp32 ONNX Runtime CPU reference, and measure GPU
latency as trtexec does (`runner.gpu_latency`: 200 ms warm-up, >= 10 iterations and >= 3 s,
CUDA events, compute apart from host<->device copies, CUDA graph where capture works).
Writes a JSON report (--out) and prints a table.

    .venv/bin/python benchmarks/tensorrt_check.py [--package runs/demo/models/slim] \
        [--target gpu-tensorrt-fp16 --target ...] [--out bench-results/tensorrt.json]

Exit codes: 0 all targets ran; 1 a target failed to build or run (the others still ran);
2 nothing ran: TensorRT or a CUDA GPU is missing, or bad input (one line on stderr, no
traceback). A torch-cuda profile may be passed as a --target too (it needs no TensorRT, but
the TensorRT check still runs first: this script is for TensorRT machines).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_TARGETS = ["gpu-tensorrt-fp16", "gpu-tensorrt-int8"]
ACCURACY_BATCH = 32


def preflight() -> str | None:
    """None when TensorRT (10/11) imports and torch sees a CUDA GPU; else the one-line reason."""
    from lapp_edge.deploy.backends.base import BackendUnavailable
    from lapp_edge.deploy.backends.gpu_measure import cuda_torch
    from lapp_edge.deploy.backends.tensorrt import NAME, tensorrt_module

    try:
        tensorrt_module()
        cuda_torch(NAME)
    except BackendUnavailable as error:
        return str(error)
    return None


def bench_profile(profile: Any, package: Any, test: Any, reference_logits: Any, work_dir: Path,
                  data_dir: str | None) -> dict[str, Any]:
    import numpy as np

    from lapp_edge.deploy.backends import run_batched
    from lapp_edge.deploy.compile import compile_runner, int8_calibration

    result: dict[str, Any] = {"target": profile.name, "backend": profile.backend, "precision": profile.precision, "status": "ok"}
    calibration = int8_calibration(profile, package.manifest["input"]["mean"], package.manifest["input"]["std"], data_dir)
    if calibration is not None:
        definition = calibration.definition
        result["calibration"] = {"name": definition.name, "count": definition.count, "fingerprint": calibration.fingerprint}

    def load(batch: int) -> Any:
        return compile_runner(package, profile, batch, work_dir, None if calibration is None else calibration.images)

    accuracy_runner = load(ACCURACY_BATCH)
    logits = run_batched(accuracy_runner, test.images, ACCURACY_BATCH)
    result["accuracy"] = {
        "images": len(test.labels), "top1": float((logits.argmax(1) == test.labels).mean()),
        "reference_top1": float((reference_logits.argmax(1) == test.labels).mean()),
        "agreement": float((logits.argmax(1) == reference_logits.argmax(1)).mean()),
        "max_abs_logit_diff": float(np.abs(logits - reference_logits).max()),
    }
    result["runner"] = {"precision_used": accuracy_runner.info.precision_used, "runtime_version": accuracy_runner.info.runtime_version,
                        "details": accuracy_runner.info.details}
    result["latency"] = []
    for batch in profile.batch_sizes:
        runner = accuracy_runner if batch == ACCURACY_BATCH else load(batch)
        latency = runner.gpu_latency(test.images[:batch])          # type: ignore[attr-defined]
        latency["precision_used"] = runner.info.precision_used
        latency["engine_cache_hit"] = runner.info.details.get("engine_cache_hit")
        result["latency"].append(latency)
    return result


def format_results(results: list[dict[str, Any]], header: str) -> str:
    lines = [header, f"{'target':22s} {'used':5s} {'top-1':>7s} {'agree':>7s} {'batch':>5s} {'graph':>5s} "
                     f"{'compute med':>11s} {'p90':>7s} {'p95':>7s} {'p99':>7s} {'h2d med':>8s} {'d2h med':>8s} {'img/s':>10s}"]
    for result in results:
        if result["status"] != "ok":
            lines.append(f"{result['target']:22s} {result['status']}: {result.get('message', '')}")
            continue
        accuracy = result["accuracy"]
        for lat in result["latency"]:
            c = lat["compute_ms"]
            lines.append(f"{result['target']:22s} {lat['precision_used']:5s} {accuracy['top1']:7.4f} {accuracy['agreement']:7.4f} "
                         f"{lat['batch']:5d} {'yes' if lat['cuda_graph'] else 'no':>5s} {c['median']:11.4f} {c['p90']:7.4f} "
                         f"{c['p95']:7.4f} {c['p99']:7.4f} {lat['h2d_ms']['median']:8.4f} {lat['d2h_ms']['median']:8.4f} "
                         f"{lat['throughput_ips']:10.0f}")
    lines.append("times in ms of GPU time (CUDA events); compute excludes the H2D/D2H copies, shown apart; "
                 "agree = top-1 agreement with the fp32 ONNX Runtime CPU reference")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from lapp_edge.deploy.backends import run_batched
    from lapp_edge.deploy.bench import load_test_set, reference_profile
    from lapp_edge.deploy.compile import compile_runner
    from lapp_edge.errors import UserError
    from lapp_edge.fileio import atomic_write_json
    from lapp_edge.deploy.package import load_package
    from lapp_edge.deploy.targets import load_target

    profiles = [load_target(path) for path in args.target or DEFAULT_TARGETS]
    package = load_package(args.package)
    test = load_test_set(package, args.data_dir)
    with tempfile.TemporaryDirectory(prefix="lapp-trt-") as temporary:
        work = Path(args.work_dir) if args.work_dir else Path(temporary)
        reference = compile_runner(package, reference_profile(package, 1), ACCURACY_BATCH, work)
        reference_logits = run_batched(reference, test.images, ACCURACY_BATCH)
        results = []
        for profile in profiles:
            try:
                results.append(bench_profile(profile, package, test, reference_logits, work, args.data_dir))
            except UserError as error:
                results.append({"target": profile.name, "status": "failed", "message": str(error)})
    import tensorrt
    import torch

    environment = {"tensorrt": str(tensorrt.__version__), "torch": str(torch.__version__), "cuda": str(torch.version.cuda),
                   "gpu": torch.cuda.get_device_name()}
    report = {"package": str(package.directory), "environment": environment, "targets": results}
    if args.out:
        atomic_write_json(args.out, report)
    print(format_results(results, f"{package.directory} on {environment['gpu']}, TensorRT {environment['tensorrt']}, "
                                  f"torch {environment['torch']} (CUDA {environment['cuda']})"))
    failed = [r for r in results if r["status"] != "ok"]
    for result in failed:
        print(f"tensorrt_check: target {result['target']}: {result['message']}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="runs/demo/models/slim", help="model package directory (default: runs/demo/models/slim, from `make demo`)")
    parser.add_argument("--target", action="append", default=None, help="GPU target profile (repeat; default: the two TensorRT ones)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--data-dir", default=None, help="dataset directory (default: the dataset's standard place)")
    parser.add_argument("--work-dir", default=None, help="keep ONNX variants and engines here (default: a temporary directory)")
    args = parser.parse_args(argv)
    problem = preflight()
    if problem is not None:
        print(f"tensorrt_check: not run: {problem}", file=sys.stderr)
        return 2
    if not (Path(args.package) / "manifest.json").is_file():
        print(f"tensorrt_check: no model package at {args.package} (make demo builds runs/demo/models/slim)", file=sys.stderr)
        return 2
    from lapp_edge.errors import UserError

    try:
        return run(args)
    except UserError as error:
        print(f"tensorrt_check: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
