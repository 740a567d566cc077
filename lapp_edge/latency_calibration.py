"""`lapp-edge calibrate-latency`: measure how a target's latency follows FLOPs, and fit it.

    lapp-edge calibrate-latency --target targets/PROFILE.yaml [--model resnet20] [--configs 24]
        [--seed 0] [--batch 1 ...] [--out calibration/]

For one model family and one target profile:
1. draw N seeded width configurations of the family's prunable sites (multiples of 8 between
   8 and full width): the dense model, uniform widths (x0.25, x0.5, x0.75), and random ones
   spread over the MAC range;
2. build each (`build_from_spec`, random weights: latency does not depend on them), fuse,
   export to ONNX (`export_onnx`) and compile it with the profile's backend, precision and
   threads (int8 with the profile's calibration set, through the backend's own int8 path);
3. measure each configuration's latency as a RATIO to the dense model compiled the same way,
   interleaved in this process (`interleaved_block_ratios`: processes drift 5-8%, such ratios
   under 1%), while reading other processes' CPU share around the measurement; a measurement
   taken while others held more than `--max-other-cpu` of the machine is retried, and flagged
   if it never got a quieter moment;
4. fit latency_ratio = a + b * macs_ratio (+ a memory term only where it measurably helps,
   `latency_model.choose_fit`), report R^2 and held-out error, and write the fit as JSON
   (atomically) and a measured-vs-predicted PNG into `--out`.

This module measures, so it may import runtimes (through the backends); the fit reader,
`lapp_edge/latency_model.py`, imports none.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import io
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lapp_edge.backends import LoadRequest, Runner, get_backend
from lapp_edge.backends.measure import (
    cpu_model, cpu_snapshot, interleaved_block_ratios, measure_latency, other_cpu_share_since, quiet_block_ratios,
    RatioProtocol,
)
from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_bytes
from lapp_edge.lapp.widths import allowed_widths
from lapp_edge.latency_model import (
    FIT_FORMAT, BatchFit, LatencyFit, choose_fit, fit_file_name, write_fit_json,
)
from lapp_edge.targets import TargetProfile, load_target

CHANNEL_MULTIPLE = 8
UNIFORM_FRACTIONS = (0.25, 0.5, 0.75)
NUM_CLASSES = 10                 # the classifier's size barely moves latency; Fashion-MNIST/CIFAR-10 have 10
MIN_CONFIGS = 3
INPUT_NAME = "input"
DENSE = "dense"


@dataclass(frozen=True)
class WidthConfig:
    name: str
    widths: dict[str, int]


@dataclass(frozen=True)
class ModelFigures:
    """Deployed (fused) cost figures at batch 1: MACs, parameters, output elements of every conv/linear."""

    macs: float
    params: float
    activations: float


MeasurementOptions = RatioProtocol  # blocks, calls, warm-up and load retries of each ratio


@dataclass
class Measurement:
    name: str
    widths: dict[str, int]
    macs: float
    params: float
    activations: float
    macs_ratio: float
    params_ratio: float
    activations_ratio: float
    precision_used: str
    latency_ratio: dict[int, float] = field(default_factory=dict)        # median of block ratios, per batch
    block_ratio_iqr: dict[int, list[float]] = field(default_factory=dict)  # 25th/75th percentile of block ratios
    other_cpu_share: dict[int, float] = field(default_factory=dict)     # others' share while measuring (kept attempt)
    attempts: dict[int, int] = field(default_factory=dict)
    flagged: dict[int, bool] = field(default_factory=dict)              # measured under load above the limit

    def features(self) -> dict[str, float]:
        return {"macs_ratio": self.macs_ratio, "params_ratio": self.params_ratio, "activations_ratio": self.activations_ratio}


@dataclass
class CalibrationResult:
    fit: LatencyFit
    json_path: Path
    png_path: Path


# --- configurations ------------------------------------------------------------------------

def _round_width(value: float, full: int, multiple: int = CHANNEL_MULTIPLE) -> int:
    return int(min(full, max(multiple, multiple * round(value / multiple))))


def draw_configs(dense_widths: dict[str, int], count: int, seed: int, multiple: int = CHANNEL_MULTIPLE) -> list[WidthConfig]:
    """`count` distinct width configurations: dense, uniform fractions, then seeded random ones.

    A random configuration draws a level u ~ U(0.1, 1) and sets each site to
    round(u * full * U(0.6, 1.4)) in multiples of `multiple`, clipped to [multiple, full], so the
    set covers the MAC range evenly while stages still get different fractions."""
    if count < MIN_CONFIGS:
        raise UserError(f"--configs must be at least {MIN_CONFIGS} (a line and a held-out point), not {count}")
    configs = [WidthConfig(DENSE, dict(dense_widths))]
    for fraction in UNIFORM_FRACTIONS:
        if len(configs) >= count:
            break
        widths = {site: _round_width(fraction * full, full, multiple) for site, full in dense_widths.items()}
        configs.append(WidthConfig(f"uniform-x{fraction:g}", widths))
    seen = {tuple(c.widths.values()) for c in configs}
    rng = np.random.default_rng(seed)
    space = int(np.prod([len(allowed_widths(full, multiple, multiple)) for full in dense_widths.values()]))
    while len(configs) < min(count, space):
        level = rng.uniform(0.1, 1.0)
        widths = {site: _round_width(level * full * rng.uniform(0.6, 1.4), full, multiple) for site, full in dense_widths.items()}
        key = tuple(widths.values())
        if key in seen:
            continue
        seen.add(key)
        configs.append(WidthConfig(f"random-{len(configs):02d}", widths))
    return configs


# --- building and compiling ---------------------------------------------------------------------

def dense_widths_of(model: str, in_channels: int) -> dict[str, int]:
    from lapp_edge.models import build_model, prunable_sites

    sites = prunable_sites(build_model(model, in_channels, NUM_CLASSES, False))
    if not sites:
        raise UserError(f"model {model} has no prunable sites to vary")
    return {site.name: site.channels for site in sites}


def build_fused(model: str, widths: dict[str, int], dense_widths: dict[str, int], input_shape: tuple[int, int, int],
                num_classes: int = NUM_CLASSES) -> nn.Module:
    """The fused (deployed) model of a family at these widths, random weights."""
    from lapp_edge.fuse import fuse_model
    from lapp_edge.spec import ArchitectureSpec, build_from_spec

    spec = ArchitectureSpec(model=model, in_channels=input_shape[0], num_classes=num_classes, input_size=input_shape[1],
                            bypass=False, widths=dict(widths), dense_widths=dict(dense_widths))
    return fuse_model(build_from_spec(spec).eval())


def model_figures(fused: nn.Module, input_shape: tuple[int, int, int]) -> ModelFigures:
    from lapp_edge.lapp.flops import count_deployed_macs

    layers = [m for m in fused.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    elements: list[int] = []
    handles = [layer.register_forward_hook(lambda m, i, o: elements.append(o[0].numel())) for layer in layers]
    try:
        with torch.no_grad():
            fused(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    params = sum(p.numel() for p in fused.parameters())
    return ModelFigures(float(count_deployed_macs(fused, input_shape)), float(params), float(sum(elements)))


def export_config(fused: nn.Module, input_shape: tuple[int, int, int], path: Path) -> Path:
    from lapp_edge.export import export_onnx

    atomic_write_bytes(path, export_onnx(fused, input_shape))
    return path


def calibration_images(profile: TargetProfile, in_channels: int) -> np.ndarray | None:
    """The profile's int8 calibration images (normalised with the dataset's statistics), or None."""
    if profile.precision != "int8":
        return None
    from lapp_edge.calibration import draw_calibration, load_definition
    from lapp_edge.data import load_dataset

    definition = load_definition(profile.calibration, (Path(profile.path).resolve().parent.parent / "calibration",))
    dataset = load_dataset(definition.dataset)
    return draw_calibration(definition, dataset.info.mean, dataset.info.std, dataset=dataset).images


def compile_model(profile: TargetProfile, onnx_path: Path, batch: int, work_dir: Path, calibration: np.ndarray | None) -> Runner:
    backend = get_backend(profile.backend)
    route = profile.int8_routes[0] if profile.int8_routes else ""
    request = LoadRequest(onnx_path, INPUT_NAME, profile.input_shape, profile.precision, profile.threads, batch, work_dir,
                          calibration=calibration, int8_route=route)
    return backend.load(request)


# --- measuring ------------------------------------------------------------------------------

def measure_ratio(runner: Runner, reference: Runner, data: np.ndarray, options: MeasurementOptions) -> tuple[list[float], float, int, bool]:
    """Block ratios of `runner` / `reference` with others' CPU share; retried while the machine is loaded.
    Returns (block ratios of the quietest attempt, its others' share, attempts, flagged)."""
    quiet = quiet_block_ratios(runner, reference, data, options)
    return quiet.block_ratios, quiet.other_cpu_share, quiet.attempts, quiet.flagged


# --- the whole calibration ---------------------------------------------------------------------

def _versions(runtime: str, runtime_version: str) -> dict[str, str]:
    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__, runtime: runtime_version}
    for package in ("onnx", "onnxruntime", "openvino", "lapp-edge"):
        try:
            versions.setdefault(package, importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def calibrate(target_path: str | Path, model: str = "resnet20", configs: int = 24, seed: int = 0, out: str | Path = "calibration",
              batches: list[int] | None = None, options: MeasurementOptions | None = None, command: str = "",
              progress: bool = True) -> CalibrationResult:
    options = options or MeasurementOptions()
    profile = load_target(target_path)
    if configs < MIN_CONFIGS:
        raise UserError(f"--configs must be at least {MIN_CONFIGS} (a line and a held-out point), not {configs}")
    batch_sizes = sorted(set(batches or [1]))
    if any(b <= 0 for b in batch_sizes):
        raise UserError("--batch must be positive")
    input_shape = profile.input_shape
    dense_widths = dense_widths_of(model, input_shape[0])       # unknown model -> UserError here, before any work
    width_configs = draw_configs(dense_widths, configs, seed)
    calibration = calibration_images(profile, input_shape[0])
    rng = np.random.default_rng(seed)
    data = {b: rng.standard_normal((b, *input_shape)).astype(np.float32) for b in batch_sizes}

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="lapp-calibrate-") as temporary:
        work = Path(temporary)
        figures: dict[str, ModelFigures] = {}
        runners: dict[str, dict[int, Runner]] = {}
        started = time.perf_counter()
        for index, config in enumerate(width_configs):
            fused = build_fused(model, config.widths, dense_widths, input_shape)
            figures[config.name] = model_figures(fused, input_shape)
            onnx_path = export_config(fused, input_shape, work / f"{config.name}.onnx")
            runners[config.name] = {b: compile_model(profile, onnx_path, b, work, calibration) for b in batch_sizes}
            say(f"[{index + 1}/{len(width_configs)}] built {config.name}: {figures[config.name].macs / 1e6:.2f} M MACs "
                f"({time.perf_counter() - started:.0f} s)")
        # The reference: the dense model compiled once more (its own session), measured against every configuration.
        reference = {b: compile_model(profile, work / f"{DENSE}.onnx", b, work, calibration) for b in batch_sizes}
        reference_stats = {b: measure_latency(reference[b], data[b], profile.latency) for b in batch_sizes}
        dense = figures[DENSE]
        measurements: list[Measurement] = []
        load_start = cpu_snapshot()
        for config in width_configs:
            fig = figures[config.name]
            used = {runners[config.name][b].info.precision_used for b in batch_sizes}
            row = Measurement(config.name, config.widths, fig.macs, fig.params, fig.activations, fig.macs / dense.macs,
                              fig.params / dense.params, fig.activations / dense.activations, "/".join(sorted(used)))
            for b in batch_sizes:
                ratios, share, attempts, flagged = measure_ratio(runners[config.name][b], reference[b], data[b], options)
                row.latency_ratio[b] = float(np.median(ratios))
                row.block_ratio_iqr[b] = [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))]
                row.other_cpu_share[b], row.attempts[b], row.flagged[b] = share, attempts, flagged
            measurements.append(row)
            say(f"  {config.name:12s} MACs x{row.macs_ratio:.3f}  latency x"
                + " ".join(f"{row.latency_ratio[b]:.3f}(b{b}, others' CPU {row.other_cpu_share[b]:.2f})" for b in batch_sizes))
        overall_share = other_cpu_share_since(load_start)
        reference_info = reference[batch_sizes[0]].info
    return finish(profile, model, seed, Path(out), batch_sizes, measurements, dense, dense_widths, reference_info,
                  {b: s.median_ms for b, s in reference_stats.items()}, options, overall_share, command)


def finish(profile: TargetProfile, model: str, seed: int, out: Path, batch_sizes: list[int], measurements: list[Measurement],
           dense: ModelFigures, dense_widths: dict[str, int], reference_info: Any, reference_ms: dict[int, float],
           options: MeasurementOptions, overall_share: float, command: str) -> CalibrationResult:
    """Fit every batch, write the JSON and the PNG."""
    batch_fits: dict[int, BatchFit] = {}
    for b in batch_sizes:
        rows = [m.features() for m in measurements]
        y = np.array([m.latency_ratio[b] for m in measurements])
        chosen, candidates = choose_fit(rows, y, seed)
        batch_fits[b] = BatchFit(b, chosen, candidates, reference_ms[b])
    used = sorted({m.precision_used for m in measurements})
    shares = [m.other_cpu_share[b] for m in measurements for b in batch_sizes]
    fit = LatencyFit(
        format=FIT_FORMAT, target=profile.name, model=model, backend=profile.backend, precision_requested=profile.precision,
        precision_used=used[0] if len(used) == 1 else "mixed: " + ", ".join(used), threads=profile.threads,
        input_shape=list(profile.input_shape), dense_widths=dense_widths,
        dense={"macs": dense.macs, "params": dense.params, "activations": dense.activations},
        batches=batch_fits, measurements=[asdict(m) for m in measurements],
        profile={"path": profile.path, "name": profile.name, "backend": profile.backend, "precision": profile.precision,
                 "threads": profile.threads, "batch_sizes": list(profile.batch_sizes), "int8_route": reference_info.int8_route},
        protocol={**asdict(options), "reference": "dense model, its own compiled session, same process",
                  "ratio": "median over blocks of median(config) / median(reference), A/B order reversed each block",
                  "held_out": "median over 500 random 2/3-fit / 1/3-held-out splits", "seed": seed},
        load={"other_cpu_share_median": float(np.median(shares)), "other_cpu_share_max": float(np.max(shares)),
              "other_cpu_share_over_all_measuring": overall_share,
              "flagged_measurements": sum(1 for m in measurements for b in batch_sizes if m.flagged[b]),
              "cpu": cpu_model(), "cpu_count": _cpu_count()},
        versions=_versions(reference_info.backend, reference_info.runtime_version),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), command=command,
    )
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / fit_file_name(profile.name, model)
    png_path = json_path.with_suffix(".png")
    atomic_write_bytes(json_path, write_fit_json(fit))
    atomic_write_bytes(png_path, plot_fit(fit, measurements))
    return CalibrationResult(fit, json_path, png_path)


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def plot_fit(fit: LatencyFit, measurements: list[Measurement]) -> bytes:
    """Measured vs predicted latency ratio, one panel per batch, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted(fit.batches)
    figure, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4.8), squeeze=False)
    for axis, b in zip(axes[0], batches):
        batch_fit = fit.batches[b]
        measured = np.array([m.latency_ratio[b] for m in measurements])
        predicted = np.array([batch_fit.predict_ratio(m.features()) for m in measurements])
        flagged = np.array([m.flagged[b] for m in measurements])
        if (~flagged).any():
            axis.scatter(predicted[~flagged], measured[~flagged], s=22, label="configuration")
        if flagged.any():
            axis.scatter(predicted[flagged], measured[flagged], s=30, marker="x", color="red", label="measured under load")
        low, high = float(min(measured.min(), predicted.min())) * 0.95, float(max(measured.max(), predicted.max())) * 1.05
        axis.plot([low, high], [low, high], color="gray", linewidth=1, label="measured = predicted")
        chosen = batch_fit.chosen
        terms = " + ".join(f"{c:.3f}*{name.replace('_ratio', '')}" for c, name in zip(chosen.coefficients[1:], chosen.features))
        axis.set_title(f"{fit.target}, {fit.model}, batch {b} ({fit.precision_used})\n"
                       f"ratio = {chosen.coefficients[0]:.3f} + {terms}\n"
                       f"R^2 {chosen.r2:.3f}, held-out median |err| {chosen.held_out.median_abs_pct:.1f}%", fontsize=9)
        axis.set_xlabel("predicted latency / dense latency")
        axis.set_ylabel("measured latency / dense latency (interleaved)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def format_result(result: CalibrationResult) -> str:
    fit = result.fit
    lines = [f"latency fit {fit.target} / {fit.model}: backend {fit.backend}, precision used {fit.precision_used}, "
             f"{fit.threads} thread(s), {len(fit.measurements)} configurations"]
    for b, batch_fit in sorted(fit.batches.items()):
        lines.append(f"batch {b}: dense reference {batch_fit.reference_median_ms:.3f} ms (median, this process)")
        for candidate in batch_fit.candidates:
            mark = "*" if candidate is batch_fit.chosen or candidate.features == batch_fit.chosen.features else " "
            held = candidate.held_out
            lines.append(f" {mark} {' + '.join(candidate.features):32s} coef {', '.join(f'{c:+.4f}' for c in candidate.coefficients):30s} "
                         f"R^2 {candidate.r2:.3f}  held-out median {held.median_abs_pct:5.2f}%  max {held.max_abs_pct:5.2f}%")
        held = batch_fit.chosen.held_out
        lines.append(f"   training mean (no model): held-out median {held.mean_predictor_median_abs_pct:5.2f}%  "
                     f"max {held.mean_predictor_max_abs_pct:5.2f}%  ({held.splits} splits, {held.fit_points} fit / {held.held_out_points} held out)")
    load = fit.load
    lines.append(f"others' CPU share while measuring: median {load['other_cpu_share_median']:.2f}, max {load['other_cpu_share_max']:.2f} "
                 f"of {load['cpu_count']} cores; {load['flagged_measurements']} measurement(s) flagged (over the limit after retries)")
    lines.append(f"wrote {result.json_path} and {result.png_path}")
    return "\n".join(lines)


def add_calibrate_latency_command(subparsers: argparse._SubParsersAction) -> None:
    defaults = MeasurementOptions()
    p = subparsers.add_parser("calibrate-latency", help="fit a target's latency against FLOPs over random width configurations")
    p.add_argument("--target", required=True, help="target profile YAML")
    p.add_argument("--model", default="resnet20", help="model family (default resnet20)")
    p.add_argument("--configs", type=int, default=24, help="width configurations to measure (>= 3; default 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, action="append", default=None, help="batch size to measure (repeat; default 1)")
    p.add_argument("--out", default="calibration", help="directory for the fit JSON and PNG (default calibration/)")
    p.add_argument("--blocks", type=int, default=defaults.blocks, help="interleaved A/B blocks per measurement")
    p.add_argument("--max-other-cpu", type=float, default=defaults.max_other_cpu,
                   help="retry a measurement while other processes use more than this share of the machine")
    p.add_argument("--retries", type=int, default=defaults.retries)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=_run_calibrate_latency)


def _run_calibrate_latency(args: argparse.Namespace) -> int:
    if args.blocks < 1 or args.retries < 0 or not 0 < args.max_other_cpu <= 1:
        raise UserError("--blocks must be >= 1, --retries >= 0 and --max-other-cpu in (0, 1]")
    options = MeasurementOptions(blocks=args.blocks, max_other_cpu=args.max_other_cpu, retries=args.retries)
    command = " ".join(["lapp-edge calibrate-latency", "--target", shlex.quote(args.target), "--model", shlex.quote(args.model),
                        "--configs", str(args.configs), "--seed", str(args.seed),
                        *[f"--batch {b}" for b in (args.batch or [])], "--out", shlex.quote(args.out)])
    result = calibrate(args.target, args.model, args.configs, args.seed, args.out, args.batch, options, command,
                       progress=not args.quiet)
    print(format_result(result))
    return 0


# --- the bench's "predicted from FLOPs" figure --------------------------------------------------

@dataclass
class FitComparison:
    """A package's latency on a target as the target's fit predicts it and as measured, at one batch."""

    fit: str                       # the fit file used
    batch: int
    features: dict[str, float]     # the package's ratios to the dense model of its family
    predicted_ratio: float         # the fit: predicted latency / dense latency on this target
    measured_ratio: float          # package latency / dense latency, measured interleaved in this process
    dense_median_ms: float         # the dense model (random weights) on this target, in this process
    predicted_ms: float            # predicted_ratio * dense_median_ms
    measured_ms: float             # the package's median latency from the bench
    error_pct: float               # 100 * (predicted_ratio / measured_ratio - 1)


def compare_with_fit(fit_path: Path, package_dir: Path, profile: TargetProfile,
                     runners: dict[int, Runner], medians_ms: dict[int, float], work_dir: Path,
                     calibration: np.ndarray | None) -> list[FitComparison]:
    """Predict the package's latency from its FLOPs with the target's fit and check it against a dense
    model of the same family compiled on the target and measured interleaved with the package."""
    from lapp_edge.fileio import read_json
    from lapp_edge.latency_model import load_fit
    from lapp_edge.spec import SLIM_SPEC, ArchitectureSpec

    fit = load_fit(fit_path)
    spec = ArchitectureSpec.from_dict(read_json(package_dir / SLIM_SPEC))
    input_shape = profile.input_shape
    slim = model_figures(build_fused(spec.model, spec.widths, spec.dense_widths, input_shape, spec.num_classes), input_shape)
    dense_model = build_fused(spec.model, spec.dense_widths, spec.dense_widths, input_shape, spec.num_classes)
    dense = model_figures(dense_model, input_shape)
    features = {"macs_ratio": slim.macs / dense.macs, "params_ratio": slim.params / dense.params,
                "activations_ratio": slim.activations / dense.activations}
    dense_onnx = export_config(dense_model, input_shape, work_dir / f"dense-{spec.model}.latency-reference.onnx")
    rng = np.random.default_rng(0)
    comparisons = []
    for batch in sorted(set(fit.batches) & set(runners)):
        data = rng.standard_normal((batch, *input_shape)).astype(np.float32)
        dense_runner = compile_model(profile, dense_onnx, batch, work_dir, calibration)
        dense_ms = measure_latency(dense_runner, data, profile.latency).median_ms
        measured = float(np.median(interleaved_block_ratios(runners[batch], dense_runner, data, calls=25 if batch == 1 else 8)))
        predicted = fit.predict_ratio(batch, features)
        comparisons.append(FitComparison(str(fit_path), batch, features, predicted, measured, dense_ms, predicted * dense_ms,
                                         medians_ms[batch], 100.0 * (predicted / measured - 1.0)))
    return comparisons
