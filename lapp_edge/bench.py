"""`lapp-edge bench PACKAGE --target PROFILE.yaml [--target ...] [--out FILE.json]`.

For each target: compile the package's ONNX for the profile's precision (int8 with the
profile's calibration set; every int8 route the profile lists), run the full test split
and compare top-1 with the package's fp32 ONNX Runtime run (the PyTorch-free reference:
agreement of the predicted class, max |logit difference|), then measure latency at each
profile batch (warm-up, iterations and seconds from the profile; median/p90/p99 and
throughput), and the latency ratio to the fp32 reference measured interleaved in one
process (the figure that survives a noisy shared machine). A target whose
runtime is missing prints one line and the others still run (exit 2 at the end).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.backends import BackendUnavailable, LoadRequest, Runner, RunnerInfo, get_backend, run_batched
from lapp_edge.backends.measure import LatencyStats, interleaved_ratio, measure_latency
from lapp_edge.calibration import CalibrationSet, draw_calibration, load_definition, normalize_uint8
from lapp_edge.data import InMemorySplit, load_dataset
from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_json
from lapp_edge.latency_model import find_fit
from lapp_edge.package import ModelPackage, load_package
from lapp_edge.targets import TargetProfile, load_target

ACCURACY_BATCH = 32
REFERENCE = "onnxruntime-cpu fp32"


@dataclass
class Accuracy:
    top1: float
    reference_top1: float
    agreement: float              # fraction of test images where the top-1 class equals the reference's
    max_abs_logit_diff: float
    images: int


@dataclass
class VariantResult:
    runner: RunnerInfo            # what was compiled at the accuracy batch
    accuracy: Accuracy
    latency: list[LatencyStats]
    reference_latency_ratio: dict[int, float]   # latency / reference latency, interleaved in one process (median of blocks)
    precision_used_per_batch: dict[int, str]
    # latency predicted from FLOPs by the target's fit (calibration/latency-fit-<target>-<model>.json), if one exists
    predicted_from_flops: list[Any] = field(default_factory=list)


@dataclass
class TargetResult:
    target: str
    profile: str
    backend: str
    precision: str
    threads: int
    status: str                   # ok | unavailable
    message: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, VariantResult] = field(default_factory=dict)


@dataclass
class BenchReport:
    package: str
    model: str
    dataset: str
    reference: dict[str, Any]
    targets: list[TargetResult]


@dataclass
class TestSet:
    images: np.ndarray
    labels: np.ndarray


def load_test_set(package: ModelPackage, data_dir: str | None) -> TestSet:
    manifest = package.manifest
    dataset = load_dataset(str(manifest.get("dataset", "")), data_dir)
    split = dataset.test
    if not isinstance(split, InMemorySplit):
        raise UserError(f"bench needs an in-memory test split; {manifest.get('dataset')} is not one")
    images = normalize_uint8(split.images.numpy(), manifest["input"]["mean"], manifest["input"]["std"])
    if images.shape[1:] != package.input_shape:
        raise UserError(f"test images are {images.shape[1:]}, the package expects {package.input_shape}")
    return TestSet(images, split.labels.numpy())


def _request(package: ModelPackage, profile: TargetProfile, precision: str, threads: int, batch: int, work_dir: Path,
             calibration: CalibrationSet | None, route: str) -> LoadRequest:
    return LoadRequest(
        onnx_path=package.onnx_path, input_name=package.input_name, input_shape=package.input_shape,
        precision=precision, threads=threads, batch=batch, work_dir=work_dir,
        calibration=None if calibration is None else calibration.images, int8_route=route,
    )


class Reference:
    """The package's fp32 ONNX Runtime run: logits on the test set; its runner is the latency reference."""

    def __init__(self, package: ModelPackage, test: TestSet, threads: int, work_dir: Path) -> None:
        self.package, self.test, self.threads, self.work_dir = package, test, threads, work_dir
        backend = get_backend("onnxruntime-cpu")
        request = LoadRequest(package.onnx_path, package.input_name, package.input_shape, "fp32", threads, ACCURACY_BATCH, work_dir)
        self.runner = backend.load(request)
        self.logits = run_batched(self.runner, test.images, ACCURACY_BATCH)
        self.top1 = float((self.logits.argmax(1) == test.labels).mean())


def bench_target(package: ModelPackage, profile: TargetProfile, test: TestSet, reference: Reference, work_dir: Path,
                 data_dir: str | None = None) -> TargetResult:
    result = TargetResult(profile.name, profile.path, profile.backend, profile.precision, profile.threads, "ok")
    if profile.input_shape != package.input_shape:
        raise UserError(f"target {profile.name} is for inputs {list(profile.input_shape)}; {package.name} takes {list(package.input_shape)}")
    try:
        backend = get_backend(profile.backend)
        calibration = None
        if profile.precision == "int8":
            definition = load_definition(profile.calibration, (Path(profile.path).resolve().parent.parent / "calibration",))
            calibration = draw_calibration(definition, package.manifest["input"]["mean"], package.manifest["input"]["std"], data_dir=data_dir)
            result.calibration = {"name": definition.name, "count": definition.count, "seed": definition.seed,
                                  "split": definition.split, "fingerprint": calibration.fingerprint}
        routes = list(profile.int8_routes) or ([backend.int8_routes[0]] if profile.precision == "int8" else [""])
        for route in routes:
            accuracy_runner = backend.load(_request(package, profile, profile.precision, profile.threads, ACCURACY_BATCH, work_dir, calibration, route))
            logits = run_batched(accuracy_runner, test.images, ACCURACY_BATCH)
            predicted = logits.argmax(1)
            accuracy = Accuracy(
                top1=float((predicted == test.labels).mean()), reference_top1=reference.top1,
                agreement=float((predicted == reference.logits.argmax(1)).mean()),
                max_abs_logit_diff=float(np.abs(logits - reference.logits).max()), images=len(test.labels),
            )
            latencies, ratios, used, runners = [], {}, {}, {}
            for batch in profile.batch_sizes:
                runner: Runner = accuracy_runner if batch == ACCURACY_BATCH else backend.load(
                    _request(package, profile, profile.precision, profile.threads, batch, work_dir, calibration, route))
                stats = measure_latency(runner, test.images[:batch], profile.latency)
                latencies.append(stats)
                runners[batch] = runner
                used[batch] = runner.info.precision_used
                ratios[batch] = interleaved_ratio(runner, reference.runner, test.images[:batch], calls=25 if batch == 1 else 8)
            variant = VariantResult(accuracy_runner.info, accuracy, latencies, ratios, used)
            fit_path = find_fit(profile.name, str(package.manifest.get("model", "")), (Path(profile.path).resolve().parent.parent / "calibration",))
            if fit_path is not None and route == routes[0]:      # the fit describes the target's own route
                from lapp_edge.latency_calibration import compare_with_fit

                variant.predicted_from_flops = compare_with_fit(
                    fit_path, package.directory, profile, runners, {s.batch: s.median_ms for s in latencies},
                    work_dir, None if calibration is None else calibration.images)
            result.variants[route or profile.precision] = variant
    except BackendUnavailable as error:
        result.status, result.message = "unavailable", str(error)
    return result


def run_bench(package_dir: str | Path, target_paths: list[str], out: str | None = None, data_dir: str | None = None,
              work_dir: str | None = None, reference_threads: int | None = None) -> BenchReport:
    profiles = [load_target(path) for path in target_paths]          # validate every profile before any work
    for profile in profiles:                                          # and every calibration set they name
        if profile.precision == "int8":
            load_definition(profile.calibration, (Path(profile.path).resolve().parent.parent / "calibration",))
    package = load_package(package_dir)
    test = load_test_set(package, data_dir)
    threads = reference_threads or min(p.threads for p in profiles)
    with tempfile.TemporaryDirectory(prefix="lapp-bench-") as temporary:
        work = Path(work_dir) if work_dir else Path(temporary)
        reference = Reference(package, test, threads, work)
        results = [bench_target(package, profile, test, reference, work, data_dir) for profile in profiles]
    report = BenchReport(
        package=str(package.directory), model=str(package.manifest.get("model", "")), dataset=str(package.manifest.get("dataset", "")),
        reference={"runtime": REFERENCE, "threads": threads, "top1": reference.top1, "images": len(test.labels),
                   "runner": asdict(reference.runner.info)},
        targets=results,
    )
    if out:
        atomic_write_json(out, asdict(report))
    return report


def format_bench(report: BenchReport) -> str:
    lines = [f"bench {report.package} ({report.model}, {report.dataset}); reference {REFERENCE} "
             f"top-1 {report.reference['top1']:.4f} on {report.reference['images']} images, {report.reference['threads']} thread(s)"]
    header = f"{'target':20s} {'variant':9s} {'used':5s} {'top-1':>7s} {'d top-1':>8s} {'agree':>7s} {'batch':>5s} " \
             f"{'median ms':>10s} {'p90 ms':>8s} {'p99 ms':>8s} {'img/s':>9s} {'x ref':>6s}"
    lines.append(header)
    lines.append("-" * len(header))
    for target in report.targets:
        if target.status != "ok":
            lines.append(f"{target.target:20s} {target.message}")
            continue
        for variant, result in target.variants.items():
            for stats in result.latency:
                acc = result.accuracy
                lines.append(
                    f"{target.target:20s} {variant:9s} {result.precision_used_per_batch[stats.batch]:5s} {acc.top1:7.4f} "
                    f"{100 * (acc.top1 - acc.reference_top1):+8.2f} {acc.agreement:7.4f} {stats.batch:5d} {stats.median_ms:10.3f} "
                    f"{stats.p90_ms:8.3f} {stats.p99_ms:8.3f} {stats.throughput_ips:9.0f} {result.reference_latency_ratio[stats.batch]:6.2f}"
                )
    lines.append("used = precision of most conv/FC kernels as compiled; d top-1 in points vs the fp32 ORT reference; "
                 "x ref = latency / fp32 ORT reference latency, interleaved in one process")
    for target in report.targets:
        for variant, result in target.variants.items():
            details = result.runner.details
            summary = details.get("conv_kernels") or {k: v for k, v in details.get("optimized_ops", {}).items() if "Conv" in k or "Gemm" in k}
            lines.append(f"  {target.target}/{variant}: {json.dumps(summary)}"
                         + (f" calibration {target.calibration['name']} #{target.calibration['fingerprint']}" if target.calibration else ""))
            for c in result.predicted_from_flops:
                lines.append(f"  {target.target}/{variant}: latency predicted from FLOPs by the target's fit ({Path(c.fit).name}), batch {c.batch}: "
                             f"{c.predicted_ms:.3f} ms (x{c.predicted_ratio:.3f} of the dense model's {c.dense_median_ms:.3f} ms here, "
                             f"MACs x{c.features['macs_ratio']:.3f}); measured {c.measured_ms:.3f} ms (x{c.measured_ratio:.3f} of dense, "
                             f"interleaved): prediction error {c.error_pct:+.1f}%")
    return "\n".join(lines)


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="compile a model package for CPU targets; accuracy and latency")
    p.add_argument("package", help="model package directory (model.onnx + manifest.json)")
    p.add_argument("--target", action="append", required=True, help="target profile YAML (repeat for several)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: the dataset's standard place)")
    p.add_argument("--work-dir", default=None, help="keep quantized artifacts here (default: a temporary directory)")
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    report = run_bench(args.package, args.target, args.out, args.data_dir, args.work_dir)
    print(format_bench(report))
    unavailable = [t for t in report.targets if t.status != "ok"]
    for target in unavailable:
        print(f"lapp-edge: error: target {target.target}: {target.message}", file=sys.stderr)
    return 2 if unavailable else 0
