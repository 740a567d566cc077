"""The bench stage: accuracy and latency of a model package on each target (no torch).

    lapp-edge bench PACKAGE --target NAME|PROFILE.yaml [--target ...] [--out FILE.json]

For each target: compile the package's ONNX for the profile's precision (int8 with the
profile's calibration set; every int8 route the profile lists), run the full test split
and compare top-1 with the package's fp32 ONNX Runtime run (the PyTorch-free reference:
agreement of the predicted class, max |logit difference|), then measure latency at each
profile batch (warm-up, iterations and seconds from the profile; median/p90/p99 and
throughput), and the latency ratio to the fp32 reference measured interleaved in one
process (the figure that survives a noisy shared machine). A target whose
runtime is missing prints one line and the others still run (exit 2 at the end).

Where the target has a latency fit for the package's model family (`latency-fit-<target>-
<model>-<machine>.json` in the latency data, this machine's first: `costs.latency_fit.find_fit_file`), the package's latency is also predicted from its
deployed figures (MACs, params, activations, from the manifest) and checked against the
fit's dense reference model (an ONNX file written beside the fit by calibrate-latency),
compiled on the target and measured interleaved with the package: the median over `--compiles`
fresh compiles of both (one compile's ratio moves by a few percent, docs/RESULTS.md). Nothing here builds a
PyTorch model: the deploy side imports no torch.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.deploy import artifacts
from lapp_edge.costs.latency_fit import LatencyFit, find_fit_file, load_fit
from lapp_edge.costs.latency_table import LatencyTable, find_table_file, load_table, onnx_conv_layers
from lapp_edge.data.imagefolder import layout_from_manifest, load_eval_split
from lapp_edge.data.readers import InMemorySplit, data_directory, load_arrays
from lapp_edge.deploy.backends import BackendUnavailable, Runner, RunnerInfo, run_batched
from lapp_edge.deploy.calibration_set import load_definition, normalize_uint8
from lapp_edge.deploy.compile import OnnxModel, compile_runner, int8_calibration, int8_route, ratio_over_compiles
from lapp_edge.deploy.measure import COMPILES_PER_RATIO, LatencyStats, RatioProtocol, interleaved_ratio, measure_latency, quiet_block_ratios
from lapp_edge.deploy.package import MAX_MODEL_BYTES, ModelPackage, check_external_data, load_package, recorded_data_dir
from lapp_edge.deploy.targets import TargetProfile, check_input_shape, load_target, target_machine_key
from lapp_edge.deploy.tolerance import RUNTIME_FP32, compare_logits
from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_json, check_output_location, read_file_bytes
from lapp_edge.resources import find_latency_file, find_profile, profile_names

ACCURACY_BATCH = 32
REFERENCE = "onnxruntime-cpu fp32"


@dataclass
class FitComparison:
    """A package's latency on a target as the target's fit predicts it and as measured, at one batch."""

    fit: str                       # the fit file used
    batch: int
    features: dict[str, float]     # the package's ratios to the dense model of its family
    predicted_ratio: float         # the fit: predicted latency / dense latency on this target
    measured_ratio: float          # package latency / dense latency, interleaved in this process: median over compiles
    dense_median_ms: float         # the fit's dense reference on this target, in this process
    predicted_ms: float            # predicted_ratio * dense_median_ms
    measured_ms: float             # the package's median latency from the bench
    error_pct: float               # 100 * (predicted_ratio / measured_ratio - 1)
    measured_per_compile: list[float] = field(default_factory=list)   # each fresh compile's ratio (the compile noise)
    measured_flagged: bool = False     # some compile was measured while other processes loaded the machine


LANDING_TOLERANCE = 0.05      # a latency-aware package should measure within +-5% of its budget (issue: latency-aware LAPP)


def budget_met(off: float, ceiling: bool) -> bool:
    """`off` = measured / budget - 1: within LANDING_TOLERANCE of the budget, or for a ceiling at most that far over."""
    return off <= LANDING_TOLERANCE if ceiling else abs(off) <= LANDING_TOLERANCE


def budget_verdict(met: bool, ceiling: bool) -> str:
    """The words bench and the summary print for a budget check."""
    if ceiling:
        return f"under the ceiling (+{LANDING_TOLERANCE:.0%} allowed)" if met else f"OVER the ceiling by more than {LANDING_TOLERANCE:.0%}"
    return f"{'within' if met else 'OUTSIDE'} +-{LANDING_TOLERANCE:.0%}"


@dataclass
class BudgetCheck:
    """A package shaped for a latency budget on this target (manifest `latency_budgets`), measured: its
    latency / the dense network's at the budget's batch (the ratio measured for the layer table's or
    the FLOPs fit's comparison, interleaved, median over compiles) against the budget."""

    batch: int
    budget_ratio: float
    measured_ratio: float | None       # None where no dense reference was measured at that batch
    off_pct: float | None              # 100 * (measured / budget - 1)
    within: bool | None                # |off| <= LANDING_TOLERANCE (a ceiling: off <= LANDING_TOLERANCE)
    note: str = ""
    ceiling: bool = False              # --land-on-flops: the budget is a ceiling, any latency under it lands


def budget_checks(manifest: dict[str, Any], target: str, comparisons: list["FitComparison"]) -> list[BudgetCheck]:
    """One check per `latency_budgets` entry of the package for `target`, from the measured ratios in
    `comparisons` (the table's first, then the FLOPs fit's; both are measured against the same dense network)."""
    checks = []
    for entry in manifest.get("latency_budgets") or []:
        if entry["target"] != target:
            continue
        batch, budget, ceiling = int(entry["batch"]), float(entry["budget_ratio"]), bool(entry.get("ceiling", False))
        measured = next((c.measured_ratio for c in comparisons if c.batch == batch), None)
        if measured is None:
            checks.append(BudgetCheck(batch, budget, None, None, None,
                                      f"not measured: no dense reference of this family was measured on {target} at batch {batch} "
                                      "(profile-layers or calibrate-latency on this machine gives one)", ceiling))
            continue
        off = measured / budget - 1
        checks.append(BudgetCheck(batch, budget, measured, 100 * off, budget_met(off, ceiling), ceiling=ceiling))
    return checks


@dataclass
class Accuracy:
    top1: float
    reference_top1: float
    agreement: float              # fraction of test images where the top-1 class equals the reference's
    max_abs_logit_diff: float
    images: int
    max_rel_logit_diff: float = 0.0   # max over images of max|logit - reference| / max|reference logit|
    # the logits against the reference under RUNTIME_FP32 (lapp_edge.deploy.tolerance), where the target
    # computed in fp32 (bf16 falling back to f32 included); lossy precisions are reported, not checked
    logit_check: dict[str, Any] = field(default_factory=dict)


@dataclass
class VariantResult:
    runner: RunnerInfo            # what was compiled at the accuracy batch
    accuracy: Accuracy
    latency: list[LatencyStats]
    reference_latency_ratio: dict[int, float]   # latency / reference latency, interleaved in one process (median of blocks)
    precision_used_per_batch: dict[int, str]
    # latency predicted from FLOPs by the target's fit (latency-fit-<target>-<model>-<machine>.json), if one exists
    predicted_from_flops: list[FitComparison] = field(default_factory=list)
    prediction_note: str = ""     # why there is no prediction, where there is none; else warnings on the one made
    # latency predicted by the target's layer table (layer-table-<target>-<model>-...json, profile-layers), if one exists
    predicted_from_table: list[FitComparison] = field(default_factory=list)
    table_note: str = ""          # why there is no table prediction, where there is none
    baseline: "BaselineComparison | None" = None   # with --baseline: the other package on the same target
    budgets: list[BudgetCheck] = field(default_factory=list)   # the latency budgets the package was shaped for on this target


@dataclass
class BaselineComparison:
    """Another package (the dense network) compiled the same way on the same target, measured side by
    side with this one: its accuracy on the same test images, and the latency ratio interleaved in one
    process (the speedup is its inverse)."""

    package: str
    top1: float
    macs_ratio: float                   # this package's MACs / the baseline's (deployed networks)
    latency_ratio: dict[int, float]     # this package's latency / the baseline's, interleaved (median of blocks)
    speedup: dict[int, float]           # 1 / latency_ratio
    baseline_median_ms: dict[int, float]  # this package's median / latency_ratio (derived, not measured alone)
    precision_used: str


@dataclass
class TargetResult:
    target: str
    profile: str
    backend: str
    precision: str
    threads: int
    status: str                   # ok | unavailable | mismatch (fp32 compute outside the tolerance)
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
    baseline: str | None = None


@dataclass
class TestSet:
    images: np.ndarray
    labels: np.ndarray


def load_test_split(package: ModelPackage, data_dir: str | None, count: int | None = None) -> InMemorySplit:
    """The (first `count`) uint8 test images of the package's dataset, from `data_dir` or the data
    directory its manifest records (else the standard place). ImageFolder data: val/, labelled with
    the package's class names and preprocessed as its manifest says."""
    manifest = package.manifest
    name = str(manifest.get("dataset", ""))
    directory = data_dir or recorded_data_dir(manifest)
    if name == "imagefolder":
        return load_eval_split(data_directory(name, directory), list(manifest.get("class_names") or []),
                               layout_from_manifest(manifest), count)
    split = load_arrays(name, directory).test
    if not isinstance(split, InMemorySplit):
        raise UserError(f"{name} has no test split in memory")
    return split if count is None else InMemorySplit(split.images[:count], split.labels[:count])


def load_test_set(package: ModelPackage, data_dir: str | None, count: int | None = None) -> TestSet:
    """The package's dataset's test split (its first `count` images; all when None), normalised with the
    package's mean/std (float32 NCHW). Raises UserError when its images do not fit the package."""
    manifest = package.manifest
    split = load_test_split(package, data_dir, count)
    images = normalize_uint8(split.images, manifest["input"]["mean"], manifest["input"]["std"])
    if images.shape[1:] != package.input_shape:
        raise UserError(f"test images are {images.shape[1:]}, the package expects {package.input_shape}")
    return TestSet(images, split.labels)


def batch_of(images: np.ndarray, batch: int) -> np.ndarray:
    """`batch` test images for latency: the first ones, repeated when the test split is smaller."""
    if len(images) >= batch:
        return images[:batch]
    return np.concatenate([images] * -(-batch // len(images)))[:batch]


def reference_profile(package: ModelPackage, threads: int) -> TargetProfile:
    """The fp32 ONNX Runtime CPU profile the bench compares every target with."""
    return TargetProfile(name="reference", backend="onnxruntime-cpu", precision="fp32", threads=threads,
                         batch_sizes=(ACCURACY_BATCH,), input_shape=package.input_shape, path="(bench reference)")


class Reference:
    """The package's fp32 ONNX Runtime run: logits on the test set; its runner is the latency reference."""

    def __init__(self, package: ModelPackage, test: TestSet, threads: int, work_dir: Path) -> None:
        self.package, self.test, self.threads, self.work_dir = package, test, threads, work_dir
        self.runner = compile_runner(package, reference_profile(package, threads), ACCURACY_BATCH, work_dir)
        self.logits = run_batched(self.runner, test.images, ACCURACY_BATCH)
        self.top1 = float((self.logits.argmax(1) == test.labels).mean())


def package_features(package: ModelPackage) -> dict[str, float]:
    """The package's deployed figures as ratios to the dense model of its family (manifest
    `figures`; older packages carry MACs and params only, in `flops` and `params`)."""
    manifest = package.manifest
    figures = manifest.get("figures")
    if isinstance(figures, dict) and isinstance(figures.get("dense"), dict) and isinstance(figures.get("slim"), dict):
        dense, slim = figures["dense"], figures["slim"]
        return {f"{key}_ratio": float(slim[key]) / float(dense[key]) for key in ("macs", "params", "activations")
                if key in dense and key in slim and float(dense[key]) > 0}
    flops, params = manifest.get("flops", {}), manifest.get("params", {})
    features = {"macs_ratio": float(flops["ratio"])} if "ratio" in flops else {}
    if params.get("dense"):
        features["params_ratio"] = float(params["slim"]) / float(params["dense"])
    return features


def fit_for(profile: TargetProfile, package: ModelPackage, precision_used: str = "") -> tuple[LatencyFit | None, Path | None, Path | None, str]:
    """The target's latency fit for the package's family, its path and the fit's dense reference ONNX,
    or a note why not. Where the fit was measured with other kernels than this CPU compiled (bf16 fit,
    no bf16 here), the fit of a profile of the same backend and threads measured with the precision
    compiled here is used instead, and the note says so."""
    model = str(package.manifest.get("model", ""))
    fit_path = find_fit_file(profile.name, model, target_machine_key(profile.backend))
    if fit_path is None:
        return None, None, None, f"no latency fit for {profile.name}/{model} (lapp-edge calibrate-latency --target {profile.argument} --model {model})"
    fit = load_fit(fit_path)
    note = ""
    if precision_used and fit.precision_used != precision_used:
        substitute = _fit_measured_with(profile, model, precision_used)
        if substitute is None:
            return None, None, None, (f"{fit_path.name} was measured with {fit.precision_used} kernels; this CPU compiled "
                                      f"{precision_used} and no {profile.backend} fit measured with {precision_used} exists")
        note = (f"{fit_path.name} was measured with {fit.precision_used} kernels, this CPU compiled {precision_used}: "
                f"predicted with {substitute[1].name}")
        fit, fit_path = substitute
    if not fit.dense_reference:
        return fit, fit_path, None, f"{fit_path.name} names no dense reference model (re-run calibrate-latency)"
    reference = find_latency_file(fit.dense_reference)
    if reference is None:
        return fit, fit_path, None, f"the dense reference {fit.dense_reference} of {fit_path.name} is missing"
    # calibrate-latency writes it self-contained: external data (read by the runtime from beside it) is refused
    check_external_data(read_file_bytes(reference, MAX_MODEL_BYTES), str(reference), {})
    if list(package.input_shape) != list(fit.input_shape):
        return fit, fit_path, None, f"{fit_path.name} is for inputs {fit.input_shape}, the package takes {list(package.input_shape)}"
    machine_note = fit_machine_note(fit, target_machine_key(profile.backend), profile.argument)
    return fit, fit_path, reference, "; ".join(part for part in (note, machine_note) if part)


def fit_machine_note(fit: LatencyFit, this_machine: str, target_argument: str = "") -> str:
    """A warning where `fit` was measured on another CPU than `this_machine` (a `measure.machine_key`:
    CPU model + ISA flags), or on one whose ISA flags it did not record; "" where they match.
    The fit is still used, but the bench says so; a layer table from another machine is refused
    instead (training/latency.py). Fits are keyed by machine since 2026-12-04; the three unkeyed
    fits shipped before were measured, loaded, on an AVX-512 EPYC (docs/RESULTS.md) and serve
    where this machine has none of its own."""
    load = fit.load if isinstance(fit.load, dict) else {}
    recorded = str(load.get("machine", ""))
    if recorded == this_machine:
        return ""
    measured_on = recorded or f"{load.get('cpu') or 'an unrecorded CPU'} without its ISA flags recorded"
    return (f"{fit.target}'s fit was measured on {measured_on}, this machine is {this_machine}: "
            f"re-run lapp-edge calibrate-latency --target {target_argument or fit.target} --model {fit.model} here")


def _fit_measured_with(profile: TargetProfile, model: str, precision_used: str) -> tuple[LatencyFit, Path] | None:
    """A shipped profile's fit for `model` with the same backend and threads, measured with `precision_used` kernels."""
    for name in profile_names():
        other = load_target(find_profile(name))
        if other.backend != profile.backend or other.threads != profile.threads:
            continue
        path = find_fit_file(other.name, model, target_machine_key(other.backend))
        if path is None:
            continue
        fit = load_fit(path)
        if fit.precision_used == precision_used:
            return fit, path
    return None


def compare_with_fit(fit: LatencyFit, fit_path: str, reference_onnx: Path, package: ModelPackage, profile: TargetProfile,
                     runners: dict[int, Runner], medians_ms: dict[int, float], work_dir: Path,
                     calibration: np.ndarray | None, route: str, compiles: int = COMPILES_PER_RATIO,
                     measured_against: DenseMeasurements | None = None) -> list[FitComparison]:
    """Predict the package's latency from its figures with the target's fit, and measure it against the
    fit's dense reference compiled on the target, interleaved in this process (median over `compiles`
    compiles: `measure_against_dense`), at each batch both have."""
    features = package_features(package)
    missing = [name for name in fit.batches[min(fit.batches)].chosen.features if name not in features]
    if missing:
        raise UserError(f"the latency fit for {profile.name} needs {', '.join(missing)}, which {package.directory} does not record")
    dense_model = OnnxModel(reference_onnx, "input", package.input_shape)
    rng = np.random.default_rng(0)
    comparisons = []
    for batch in sorted(set(fit.batches) & set(runners)):
        data = rng.standard_normal((batch, *package.input_shape)).astype(np.float32)
        dense_ms, per_compile, flagged = measured_once(measured_against, package, dense_model, profile, runners[batch], data,
                                                       work_dir, calibration, route, compiles)
        measured = float(np.median(per_compile))
        predicted = fit.predict_ratio(batch, features)
        comparisons.append(FitComparison(fit_path, batch, features, predicted, measured, dense_ms, predicted * dense_ms,
                                         medians_ms[batch], 100.0 * (predicted / measured - 1.0), per_compile, flagged))
    return comparisons


DenseMeasurements = dict[tuple[str, int], tuple[float, list[float], bool]]   # (reference ONNX, batch) -> measured


def measured_once(measured: DenseMeasurements | None, package: ModelPackage, dense_model: OnnxModel, profile: TargetProfile,
                  runner: Runner, data: np.ndarray, work_dir: Path, calibration: np.ndarray | None, route: str,
                  compiles: int) -> tuple[float, list[float], bool]:
    """`measure_against_dense`, measured once per (dense reference file, batch) where `measured` is
    given: the FLOPs fit and the layer table of a target usually share one dense reference, and each
    measurement is `compiles` fresh compiles (for int8, a quantization each)."""
    key = (str(Path(dense_model.onnx_path).resolve()), len(data))
    if measured is not None and key in measured:
        return measured[key]
    result = measure_against_dense(package, dense_model, profile, runner, data, work_dir, calibration, route, compiles)
    if measured is not None:
        measured[key] = result
    return result


def measure_against_dense(package: ModelPackage, dense_model: OnnxModel, profile: TargetProfile, runner: Runner, data: np.ndarray,
                          work_dir: Path, calibration: np.ndarray | None, route: str, compiles: int) -> tuple[float, list[float], bool]:
    """The dense reference's median latency (ms) on `profile` at len(data), the package's latency
    ratio to it per compile, and whether some compile was measured while other processes loaded the
    machine beyond the protocol's limit. First compile: the package's own `runner` against a fresh
    dense compile; then `compiles` - 1 fresh compiles of both in a folder of their own
    (`compile.ratio_over_compiles`; one compile's ratio moves by a few percent, docs/RESULTS.md).
    Each compile's ratio is the median of its interleaved blocks (`quiet_block_ratios`, with load
    checks). Raises UserError / BackendUnavailable as `compile_runner`."""
    with compile_runner(dense_model, profile, len(data), work_dir, calibration, route) as dense_runner:
        dense_ms = measure_latency(dense_runner, data, profile.latency).median_ms
        first = quiet_block_ratios(runner, dense_runner, data, RatioProtocol())
    per_compile, flagged = [float(np.median(first.block_ratios))], first.flagged
    if compiles > 1:
        fresh = Path(tempfile.mkdtemp(prefix=f"compiles-{profile.name}-b{len(data)}-", dir=work_dir))
        more = ratio_over_compiles(package, dense_model, profile, len(data), fresh, data, compiles - 1,
                                   calibration=calibration, route=route)
        per_compile += more.per_compile
        flagged = flagged or more.flagged
    return dense_ms, per_compile, flagged


def table_for(profile: TargetProfile, package: ModelPackage) -> tuple[LatencyTable | None, Path | None, Path | None, str]:
    """This machine's layer table for the package's target, family and input, its path and its dense
    reference ONNX, or a note why not (only a table measured on this CPU is used: training/latency.py)."""
    model = str(package.manifest.get("model", ""))
    path = find_table_file(profile.name, model, package.input_shape, target_machine_key(profile.backend))
    if path is None:
        return None, None, None, (f"no layer latency table for {profile.name}/{model} on this machine (lapp-edge profile-layers "
                                  f"--target {profile.argument} --model {model} --input {'x'.join(map(str, package.input_shape))})")
    table = load_table(path)
    reference = find_latency_file(table.dense_reference) if table.dense_reference else None
    if reference is None:
        return table, path, None, f"the dense reference {table.dense_reference or '(none named)'} of {path.name} is missing"
    check_external_data(read_file_bytes(reference, MAX_MODEL_BYTES), str(reference), {})
    return table, path, reference, ""


def compare_with_table(table: LatencyTable, table_path: Path, reference_onnx: Path, package: ModelPackage, profile: TargetProfile,
                       runners: dict[int, Runner], medians_ms: dict[int, float], work_dir: Path,
                       calibration: np.ndarray | None, route: str, compiles: int = COMPILES_PER_RATIO,
                       measured_against: DenseMeasurements | None = None) -> list[FitComparison]:
    """Predict the package's latency ratio to the dense network from its ONNX graph's convs with the
    target's layer table, and measure it against the table's dense reference compiled on the target,
    interleaved in this process (median over `compiles` compiles: `measure_against_dense`), at each batch both have."""
    layers = onnx_conv_layers(package.onnx_path)
    dense_model = OnnxModel(reference_onnx, "input", package.input_shape)
    dense_layers = onnx_conv_layers(reference_onnx)
    rng = np.random.default_rng(0)
    comparisons = []
    for batch in sorted(set(table.batches) & set(runners)):
        batch_table = table.batches[batch]
        predicted = float(batch_table.predict_ratio(layers) / batch_table.predict_ratio(dense_layers))
        data = rng.standard_normal((batch, *package.input_shape)).astype(np.float32)
        dense_ms, per_compile, flagged = measured_once(measured_against, package, dense_model, profile, runners[batch], data,
                                                       work_dir, calibration, route, compiles)
        measured = float(np.median(per_compile))
        comparisons.append(FitComparison(str(table_path), batch, {"table_ratio": float(batch_table.sum_ms(layers) / batch_table.sum_ms(dense_layers))},
                                         predicted, measured, dense_ms, predicted * dense_ms, medians_ms[batch],
                                         100.0 * (predicted / measured - 1.0), per_compile, flagged))
    return comparisons


def compare_with_baseline(baseline: ModelPackage, package: ModelPackage, profile: TargetProfile, test: TestSet,
                          runners: dict[int, Runner], latencies: list[LatencyStats], work_dir: Path,
                          calibration: np.ndarray | None, route: str) -> BaselineComparison:
    """Compile `baseline` like the package (same profile, route and calibration images) and measure it
    side by side with the package's runners: top-1 on the test images, latency ratio per batch."""
    accuracy_runner = compile_runner(baseline, profile, ACCURACY_BATCH, work_dir, calibration, route)
    top1 = float((run_batched(accuracy_runner, test.images, ACCURACY_BATCH).argmax(1) == test.labels).mean())
    ratios, medians = {}, {s.batch: s.median_ms for s in latencies}
    for batch, runner in runners.items():
        baseline_runner = accuracy_runner if batch == ACCURACY_BATCH else compile_runner(
            baseline, profile, batch, work_dir, calibration, route)
        ratios[batch] = interleaved_ratio(runner, baseline_runner, batch_of(test.images, batch))
        if baseline_runner is not accuracy_runner:
            baseline_runner.close()
    used = accuracy_runner.info.precision_used
    accuracy_runner.close()
    macs = float(package.manifest["flops"]["slim_macs"]) / float(baseline.manifest["flops"]["slim_macs"])
    return BaselineComparison(str(baseline.directory), top1, macs, ratios, {b: 1.0 / r for b, r in ratios.items()},
                              {b: medians[b] / r for b, r in ratios.items()}, used)


def bench_target(package: ModelPackage, profile: TargetProfile, test: TestSet, reference: Reference, work_dir: Path,
                 data_dir: str | None = None, baseline: ModelPackage | None = None, compiles: int = COMPILES_PER_RATIO) -> TargetResult:
    """Compile the package for one target (every int8 route the profile lists), then accuracy
    against the reference and latency at each profile batch. A missing runtime makes the
    result `unavailable` with its one-line message instead of raising. The profile's input shape is
    checked for every target by `run_bench` before the first (and again by the compile)."""
    result = TargetResult(profile.name, profile.path, profile.backend, profile.precision, profile.threads, "ok")
    try:
        folder = ((layout_from_manifest(package.manifest), list(package.manifest.get("class_names") or []))
                  if package.manifest.get("dataset") == "imagefolder" else None)
        drawn = int8_calibration(profile, package.manifest["input"]["mean"], package.manifest["input"]["std"], data_dir, folder)
        calibration = None if drawn is None else drawn.images
        if drawn is not None:
            definition = drawn.definition
            result.calibration = {"name": definition.name, "count": definition.count, "seed": definition.seed,
                                  "split": definition.split, "fingerprint": drawn.fingerprint}
        routes = list(profile.int8_routes) or [int8_route(profile)]
        for route in routes:
            accuracy_runner = compile_runner(package, profile, ACCURACY_BATCH, work_dir, calibration, route)
            logits = run_batched(accuracy_runner, test.images, ACCURACY_BATCH)
            predicted = logits.argmax(1)
            comparison = compare_logits(logits, reference.logits, RUNTIME_FP32)
            checked = accuracy_runner.info.precision_used == "fp32"
            accuracy = Accuracy(
                top1=float((predicted == test.labels).mean()), reference_top1=reference.top1,
                agreement=comparison.top1_agreement, max_abs_logit_diff=comparison.max_abs_diff, images=len(test.labels),
                max_rel_logit_diff=comparison.max_rel_diff,
                logit_check={**comparison.to_dict(), "checked": checked,
                             "note": "fp32 compute: must pass" if checked else
                             f"{accuracy_runner.info.precision_used} is lossy: reported, not checked (accuracy judges it)"},
            )
            if checked and not comparison.passed:
                result.status = "mismatch"
                result.message = (f"{route or profile.precision} computes in fp32 but its logits differ from the fp32 ONNX Runtime "
                                  f"reference by {comparison.max_rel_diff:.2g} of max|logit| ({comparison.worst_excess:.3g} x "
                                  f"the allowed {RUNTIME_FP32.atol} + {RUNTIME_FP32.rtol} * max|logit|), top-1 differs on "
                                  f"{comparison.top1_disagreements} image(s) that are not near ties")
            latencies, ratios, used, runners = [], {}, {}, {}
            for batch in profile.batch_sizes:
                runner: Runner = accuracy_runner if batch == ACCURACY_BATCH else compile_runner(
                    package, profile, batch, work_dir, calibration, route)
                stats = measure_latency(runner, batch_of(test.images, batch), profile.latency)
                latencies.append(stats)
                runners[batch] = runner
                used[batch] = runner.info.precision_used
                ratios[batch] = interleaved_ratio(runner, reference.runner, batch_of(test.images, batch))
            variant = VariantResult(accuracy_runner.info, accuracy, latencies, ratios, used)
            if baseline is not None:
                variant.baseline = compare_with_baseline(baseline, package, profile, test, runners, latencies,
                                                         work_dir / "baseline", calibration, route)
            if route == routes[0]:                                  # the fit describes the target's own route
                against_dense: DenseMeasurements = {}              # the fit and the table share their dense reference
                fit, fit_path, reference_onnx, note = fit_for(profile, package, accuracy_runner.info.precision_used)
                if fit is not None and fit_path is not None and reference_onnx is not None:
                    variant.predicted_from_flops = compare_with_fit(
                        fit, str(fit_path), reference_onnx, package, profile,
                        runners, {s.batch: s.median_ms for s in latencies}, work_dir, calibration, route, compiles, against_dense)
                variant.prediction_note = note
                table, table_path, table_reference, variant.table_note = table_for(profile, package)
                if table is not None and table_path is not None and table_reference is not None:
                    try:
                        variant.predicted_from_table = compare_with_table(
                            table, table_path, table_reference, package, profile, runners,
                            {s.batch: s.median_ms for s in latencies}, work_dir, calibration, route, compiles, against_dense)
                    except UserError as error:          # a layer shape the table lacks: said, not fatal
                        variant.table_note = str(error)
                variant.budgets = budget_checks(package.manifest, profile.name,
                                                variant.predicted_from_table + variant.predicted_from_flops)
            for runner in {id(r): r for r in runners.values()}.values():
                runner.close()
            result.variants[route or profile.precision] = variant
    except BackendUnavailable as error:
        result.status, result.message = "unavailable", str(error)
    return result


def check_baseline(baseline: ModelPackage, package: ModelPackage) -> None:
    """A baseline must take the same inputs, from the same data, normalised the same way (UserError otherwise)."""
    a, b = package.manifest, baseline.manifest
    for what, mine, theirs in (("input shape", package.input_shape, baseline.input_shape), ("dataset", a.get("dataset"), b.get("dataset")),
                               ("mean/std", (a["input"]["mean"], a["input"]["std"]), (b["input"]["mean"], b["input"]["std"])),
                               ("classes", a.get("class_names"), b.get("class_names"))):
        if mine != theirs:
            raise UserError(f"--baseline {baseline.directory} differs from {package.directory} in its {what} "
                            f"({theirs} vs {mine}): they cannot be compared on the same test images")


def run_bench(package_dir: str | Path, target_paths: list[str], out: str | None = None, data_dir: str | None = None,
              work_dir: str | None = None, reference_threads: int | None = None,
              baseline_dir: str | Path | None = None, compiles: int = COMPILES_PER_RATIO,
              test_images: int | None = None) -> BenchReport:
    """Bench a package on every target (profiles by name or path); optionally write the report
    as JSON to `out`. With `baseline_dir` (a package of the dense network), each target also
    compiles the baseline the same way and measures it side by side: its accuracy, and the
    package's speedup over it, interleaved in one process. The latency predicted by the target's fit
    or layer table is checked against the median over `compiles` fresh compiles (>= 1) of the package
    and the dense reference. Top-1 is measured on the first `test_images` images of the test split (all
    when None; the report records how many). Every profile, calibration set and the baseline are
    validated before any work (UserError)."""
    if compiles < 1:
        raise UserError(f"--compiles must be at least 1, got {compiles}")
    if out is not None:
        check_output_location(out, "--out", "file")
    if work_dir is not None:
        check_output_location(work_dir, "--work-dir", "dir")
    if test_images is not None and test_images < 1:
        raise UserError(f"--test-images must be at least 1 (or left out: the whole test split), got {test_images}")
    profiles = [load_target(path) for path in target_paths]          # validate every profile before any work
    for profile in profiles:                                          # and every calibration set they name
        if profile.precision == "int8":
            load_definition(profile.calibration)
    package = load_package(package_dir)
    for profile in profiles:                                          # every target takes the package's input
        check_input_shape(profile, package.input_shape, package.name)
    baseline = load_package(baseline_dir) if baseline_dir is not None else None
    if baseline is not None:
        check_baseline(baseline, package)
    data_dir = data_dir or recorded_data_dir(package.manifest)     # where the package says its data came from
    test = load_test_set(package, data_dir, test_images)
    threads = reference_threads or min(p.threads for p in profiles)
    with tempfile.TemporaryDirectory(prefix="lapp-bench-") as temporary:
        work = artifacts.work_directory(work_dir) if work_dir else Path(temporary)
        reference = Reference(package, test, threads, work)
        results = [bench_target(package, profile, test, reference, work, data_dir, baseline, compiles) for profile in profiles]
    report = BenchReport(
        package=str(package.directory), model=str(package.manifest.get("model", "")), dataset=str(package.manifest.get("dataset", "")),
        reference={"runtime": REFERENCE, "threads": threads, "top1": reference.top1, "images": len(test.labels),
                   "runner": asdict(reference.runner.info)},
        targets=results, baseline=str(baseline.directory) if baseline is not None else None,
    )
    if out:
        atomic_write_json(out, asdict(report))
    return report


def _compiles_note(comparison: FitComparison) -> str:
    ratios = comparison.measured_per_compile
    note = f", median of {len(ratios)} compiles {min(ratios):.3f}-{max(ratios):.3f}" if len(ratios) > 1 else ""
    return note + (", measured while the machine was loaded" if comparison.measured_flagged else "")


def padding_line(padding: dict[str, Any], batch: int) -> str:
    """One line on the ORT int8 channel padding a runner tried (`onnxruntime_cpu.choose_channel_padding`)."""
    counts = Counter(f"{width}->{padded}" for width, padded in padding["spaces"])
    spaces = ", ".join(f"{change}{f' x{count}' if count > 1 else ''}" for change, count in counts.items())
    verdict = "run padded" if padding["used"] else "run unpadded (not enough faster)"
    return (f"channel spaces zero-padded to multiples of {padding['multiple']} ({spaces}) measured "
            f"{padding['padded_over_plain']:.3f} of the unpadded int8 latency at batch {batch}: {verdict}")


def format_bench(report: BenchReport) -> str:
    """The bench report as a human table, then kernels and predictions per target."""
    lines = [f"bench {report.package} ({report.model}, {report.dataset}); reference {REFERENCE} "
             f"top-1 {report.reference['top1']:.4f} on {report.reference['images']} images, {report.reference['threads']} thread(s)"]
    header = f"{'target':20s} {'variant':9s} {'used':5s} {'top-1':>7s} {'d top-1':>8s} {'agree':>7s} {'batch':>5s} " \
             f"{'median ms':>10s} {'p90 ms':>8s} {'p99 ms':>8s} {'img/s':>9s} {'x ref':>6s}"
    lines.append(header)
    lines.append("-" * len(header))
    for target in report.targets:
        if target.status == "unavailable":
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
                         + (f" calibration {target.calibration['name']} #{target.calibration['fingerprint']}" if target.calibration else "")
                         + ("; 7-bit weights (no VNNI on this CPU)" if details.get("int8_weights_7bit") else ""))
            if details.get("channel_padding", {}).get("spaces"):
                lines.append(f"  {target.target}/{variant}: {padding_line(details['channel_padding'], result.runner.batch)}")
            if target.precision != result.runner.precision_used and target.precision != "int8":
                lines.append(f"  {target.target}/{variant}: asked {target.precision}, compiled {result.runner.precision_used}: "
                             f"this CPU has no {target.precision} kernels, so the runtime fell back (latency and accuracy are "
                             f"{result.runner.precision_used}'s)")
            if result.baseline is not None:
                b = result.baseline
                lines.append(f"  {target.target}/{variant}: vs baseline {Path(b.package).name} ({b.precision_used}), measured side by side: "
                             f"top-1 {b.top1:.4f} -> {result.accuracy.top1:.4f}, MACs x{b.macs_ratio:.3f}, speedup "
                             + ", ".join(f"{b.speedup[batch]:.2f}x at batch {batch}" for batch in sorted(b.speedup)))
            check = result.accuracy.logit_check
            if check:
                verdict = ("within" if check["passed"] else "OUTSIDE") + f" {check['tolerance']['atol']} + {check['tolerance']['rtol']} * max|logit|" \
                    if check["checked"] else f"not checked: {check['note']}"
                lines.append(f"  {target.target}/{variant}: logits vs reference max |diff| {result.accuracy.max_abs_logit_diff:.3g} "
                             f"({result.accuracy.max_rel_logit_diff:.2g} of max|logit|), {verdict}")
            if result.prediction_note:
                lines.append(f"  {target.target}/{variant}: {'' if result.predicted_from_flops else 'no latency prediction: '}"
                             f"{result.prediction_note}")
            for c in result.predicted_from_flops:
                lines.append(f"  {target.target}/{variant}: latency predicted from FLOPs by the target's fit ({Path(c.fit).name}), batch {c.batch}: "
                             f"{c.predicted_ms:.3f} ms (x{c.predicted_ratio:.3f} of the dense model's {c.dense_median_ms:.3f} ms here, "
                             f"MACs x{c.features['macs_ratio']:.3f}); measured {c.measured_ms:.3f} ms (x{c.measured_ratio:.3f} of dense, "
                             f"interleaved{_compiles_note(c)}): prediction error {c.error_pct:+.1f}%")
            if result.table_note:
                lines.append(f"  {target.target}/{variant}: no layer-table prediction: {result.table_note}")
            for c in result.predicted_from_table:
                lines.append(f"  {target.target}/{variant}: latency predicted by the layer table ({Path(c.fit).name}), batch {c.batch}: "
                             f"{c.predicted_ms:.3f} ms (x{c.predicted_ratio:.3f} of the dense model's {c.dense_median_ms:.3f} ms here); "
                             f"measured {c.measured_ms:.3f} ms (x{c.measured_ratio:.3f} of dense, interleaved{_compiles_note(c)}): prediction error "
                             f"{c.error_pct:+.1f}%")
            for check in result.budgets:
                lines.append(f"  {target.target}/{variant}: shaped for a latency {'ceiling' if check.ceiling else 'budget'} of "
                             f"x{check.budget_ratio:.3f} of dense at batch {check.batch}: "
                             + (check.note if check.measured_ratio is None else
                                f"measured x{check.measured_ratio:.3f} ({check.off_pct:+.1f}%, "
                                f"{budget_verdict(bool(check.within), check.ceiling)})"))
    return "\n".join(lines)
