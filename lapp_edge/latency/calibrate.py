"""Latency calibration: measure how a target's latency follows FLOPs, and fit it.

    lapp-edge calibrate-latency --target NAME [--model resnet20] [--configs 24]
        [--seed 0] [--batch B ...] [--out latency-data/]

For one model family and one target profile:
1. draw N seeded width configurations of the family's prunable sites (multiples of 8 between
   8 and full width): the dense model, uniform widths (x0.25, x0.5, x0.75), and random ones
   spread over the MAC range;
2. build each (`build_from_spec`, random weights: latency does not depend on them), fuse,
   export to ONNX (`export_onnx`) and compile it through `deploy.compile.compile_runner` (the
   profile's backend, precision, threads, int8 route and calibration set);
3. measure each configuration's latency as a RATIO to the dense model compiled the same way,
   interleaved in this process (`interleaved_block_ratios`: processes drift 5-8%, such ratios
   under 1%), while reading other processes' CPU share around the measurement; a measurement
   taken while others held more than `--max-other-cpu` of the machine is retried, and flagged
   if it never got a quieter moment;
4. fit latency_ratio = a + b * macs_ratio (+ a memory term only where it measurably helps,
   `costs.latency_fit.choose_fit`), report R^2 and held-out error, and write the fit as JSON
   (atomically), a measured-vs-predicted PNG and the dense reference ONNX (the model the
   ratios are relative to; `bench` measures packages against it) into `--out`.

This module builds PyTorch models and measures them, so it sits above both sides; the fit
reader, `lapp_edge/costs/latency_fit.py`, imports neither torch nor a runtime.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import io
import math
import platform
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lapp_edge.costs.latency_fit import FIT_FORMAT, BatchFit, LatencyFit, choose_fit, fit_file_name, write_fit_json
from lapp_edge.deploy.backends import Runner
from lapp_edge.deploy.compile import OnnxModel, compile_runner, dataset_calibration
from lapp_edge.deploy.measure import (
    RatioProtocol, cpu_model, cpu_snapshot, machine_key, measure_latency, other_cpu_share_since, quiet_block_ratios,
)
from lapp_edge.deploy.targets import TargetProfile, load_target
from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_bytes, check_output_location
from lapp_edge.lapp.flops import DeployedFigures, deployed_figures
from lapp_edge.lapp.widths import allowed_widths

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


def draw_configs(dense_widths: dict[str, int], count: int, seed: int, multiple: int = CHANNEL_MULTIPLE,
                 removable: Collection[str] = ()) -> list[WidthConfig]:
    """`count` distinct width configurations: dense, uniform fractions, then seeded random ones.

    A random configuration draws a level u ~ U(0.1, 1) and sets each site to
    round(u * full * U(0.6, 1.4)) in multiples of `multiple`, clipped to [multiple, full], so the
    set covers the MAC range evenly while stages still get different fractions.

    `removable` (site names that may keep zero channels: residual branches, `--block-removal`):
    every second random configuration then also removes each of those sites with a probability q
    drawn per configuration, q ~ U(0.1, 0.7), so the set holds plans that remove one branch and plans
    that remove half or more (what `--block-removal` runs end with: a table fitted without them
    under-predicted such plans by 10-24% on ORT fp32, docs/RESULTS.md). The removals come from
    their own generator, so the widths drawn are those of a draw without `removable`."""
    if count < MIN_CONFIGS:
        raise UserError(f"--configs must be at least {MIN_CONFIGS} (a line and a held-out point), not {count}")
    unknown = sorted(set(removable) - set(dense_widths))
    if unknown:
        raise ValueError(f"removable sites {unknown} are not sites of the model")
    configs = [WidthConfig(DENSE, dict(dense_widths))]
    for fraction in UNIFORM_FRACTIONS:
        if len(configs) >= count:
            break
        widths = {site: _round_width(fraction * full, full, multiple) for site, full in dense_widths.items()}
        configs.append(WidthConfig(f"uniform-x{fraction:g}", widths))
    seen = {tuple(c.widths.values()) for c in configs}
    rng = np.random.default_rng(seed)
    removals = np.random.default_rng([seed, 1])
    # math.prod: exact (numpy's int64 product wrapped for MobileNetV2's 25 groups and stopped the draw at 4 networks)
    space = math.prod(len(allowed_widths(full, multiple, 0 if site in removable else multiple))
                      for site, full in dense_widths.items())
    drawn = 0
    while len(configs) < min(count, space):
        level = rng.uniform(0.1, 1.0)
        widths = {site: _round_width(level * full * rng.uniform(0.6, 1.4), full, multiple) for site, full in dense_widths.items()}
        if removable and drawn % 2 == 1:
            chance = removals.uniform(0.1, 0.7)
            widths.update({site: 0 for site in removable if removals.uniform() < chance})
        drawn += 1
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
                num_classes: int = NUM_CLASSES, coupled: bool = False) -> nn.Module:
    """The fused (deployed) model of a family at these widths, random weights."""
    from lapp_edge.models.fuse import fuse_model
    from lapp_edge.models.spec import ArchitectureSpec, build_from_spec

    spec = ArchitectureSpec(model=model, in_channels=input_shape[0], num_classes=num_classes, input_size=input_shape[1],
                            bypass=False, widths=dict(widths), dense_widths=dict(dense_widths), coupled=coupled)
    return fuse_model(build_from_spec(spec).eval())


def write_reference_models(spec_path: Path, out: Path, seed: int = 0) -> Path:
    """The latency regression references (deploy/regression.py): the dense family member and the slim
    network of a run's architecture.json, random weights (latency does not depend on them), as ONNX
    files plus `reference-models.json` (files, widths, MACs) in `out`. Returns the JSON's path."""
    import json

    from lapp_edge.fileio import read_json
    from lapp_edge.models.spec import ArchitectureSpec

    spec = ArchitectureSpec.from_dict(read_json(spec_path))
    shape = (spec.in_channels, spec.input_size, spec.input_size)
    torch.manual_seed(seed)
    info: dict[str, Any] = {"input_shape": list(shape), "model": spec.model, "num_classes": spec.num_classes, "coupled": spec.coupled,
                            "description": f"{spec.model} dense and LAPP-slim (widths of {spec_path.parent.name}), random weights"}
    for role, widths in (("dense", spec.dense_widths), ("slim", spec.widths)):
        fused = build_fused(spec.model, widths, spec.dense_widths, shape, spec.num_classes, spec.coupled)
        name = dense_reference_name(spec.model, shape) if role == "dense" else f"slim-{spec.model}-{'x'.join(map(str, shape))}.onnx"
        export_config(fused, shape, out / name)
        info[role] = {"file": name, "widths": dict(widths), "macs": deployed_figures(fused, shape).macs}
    path = out / "reference-models.json"
    atomic_write_bytes(path, (json.dumps(info, indent=1) + "\n").encode("utf-8"))
    return path


def export_config(fused: nn.Module, input_shape: tuple[int, int, int], path: Path) -> Path:
    from lapp_edge.export.onnx import export_onnx

    atomic_write_bytes(path, export_onnx(fused, input_shape))
    return path


def dense_reference_name(model: str, input_shape: tuple[int, int, int]) -> str:
    """File name of a family's dense reference ONNX (random weights, NUM_CLASSES outputs) in the latency data."""
    return f"dense-{model}-{'x'.join(map(str, input_shape))}.onnx"


# --- the whole calibration ---------------------------------------------------------------------

def _versions(runtime: str, runtime_version: str) -> dict[str, str]:
    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__, runtime: runtime_version}
    for package in ("onnx", "onnxruntime", "openvino", "lapp-edge"):
        try:
            versions.setdefault(package, importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def calibrate(target_path: str | Path, model: str = "resnet20", configs: int = 24, seed: int = 0, out: str | Path = "latency-data",
              batches: list[int] | None = None, options: RatioProtocol | None = None, command: str = "",
              progress: bool = True) -> CalibrationResult:
    """Measure `configs` width configurations of `model` on the target (profile name or path) as
    latency ratios to the dense model, fit them, and write fit JSON, PNG and dense reference ONNX
    into `out`. `batches` defaults to the profile's batch sizes (those bench measures). Raises
    UserError for a bad target, model, batch or count before any measuring."""
    options = options or RatioProtocol()
    profile = load_target(target_path)
    check_output_location(out, "--out", "dir")
    if configs < MIN_CONFIGS:
        raise UserError(f"--configs must be at least {MIN_CONFIGS} (a line and a held-out point), not {configs}")
    batch_sizes = sorted(set(batches or profile.batch_sizes))
    if any(b <= 0 for b in batch_sizes):
        raise UserError("--batch must be positive")
    input_shape = profile.input_shape
    dense_widths = dense_widths_of(model, input_shape[0])       # unknown model -> UserError here, before any work
    width_configs = draw_configs(dense_widths, configs, seed)
    calibration = dataset_calibration(profile)
    rng = np.random.default_rng(seed)
    data = {b: rng.standard_normal((b, *input_shape)).astype(np.float32) for b in batch_sizes}

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="lapp-calibrate-") as temporary:
        work = Path(temporary)
        figures: dict[str, DeployedFigures] = {}
        runners: dict[str, dict[int, Runner]] = {}
        started = time.perf_counter()
        for index, config in enumerate(width_configs):
            fused = build_fused(model, config.widths, dense_widths, input_shape)
            figures[config.name] = deployed_figures(fused, input_shape)
            onnx_model = OnnxModel(export_config(fused, input_shape, work / f"{config.name}.onnx"), INPUT_NAME, input_shape)
            runners[config.name] = {b: compile_runner(onnx_model, profile, b, work, calibration) for b in batch_sizes}
            say(f"[{index + 1}/{len(width_configs)}] built {config.name}: {figures[config.name].macs / 1e6:.2f} M MACs "
                f"({time.perf_counter() - started:.0f} s)")
        # The reference: the dense model compiled once more (its own session), measured against every configuration.
        dense_onnx = OnnxModel(work / f"{DENSE}.onnx", INPUT_NAME, input_shape)
        reference = {b: compile_runner(dense_onnx, profile, b, work, calibration) for b in batch_sizes}
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
                quiet = quiet_block_ratios(runners[config.name][b], reference[b], data[b], options)
                ratios = quiet.block_ratios
                row.latency_ratio[b] = float(np.median(ratios))
                row.block_ratio_iqr[b] = [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))]
                row.other_cpu_share[b], row.attempts[b], row.flagged[b] = quiet.other_cpu_share, quiet.attempts, quiet.flagged
            measurements.append(row)
            say(f"  {config.name:12s} MACs x{row.macs_ratio:.3f}  latency x"
                + " ".join(f"{row.latency_ratio[b]:.3f}(b{b}, others' CPU {row.other_cpu_share[b]:.2f})" for b in batch_sizes))
        overall_share = other_cpu_share_since(load_start)
        reference_info = reference[batch_sizes[0]].info
        for runner in [*reference.values(), *(r for per_batch in runners.values() for r in per_batch.values())]:
            runner.close()
        dense_onnx_bytes = dense_onnx.onnx_path.read_bytes()
    result = finish(profile, model, seed, Path(out), batch_sizes, measurements, dense, dense_widths, reference_info,
                    {b: s.median_ms for b, s in reference_stats.items()}, options, overall_share, command)
    atomic_write_bytes(Path(out) / result.fit.dense_reference, dense_onnx_bytes)
    return result


def finish(profile: TargetProfile, model: str, seed: int, out: Path, batch_sizes: list[int], measurements: list[Measurement],
           dense: DeployedFigures, dense_widths: dict[str, int], reference_info: Any, reference_ms: dict[int, float],
           options: RatioProtocol, overall_share: float, command: str) -> CalibrationResult:
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
              "cpu": cpu_model(), "machine": machine_key(), "cpu_count": cpu_count()},
        versions=_versions(reference_info.backend, reference_info.runtime_version),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), command=command,
        dense_reference=dense_reference_name(model, profile.input_shape),
    )
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / fit_file_name(profile.name, model, fit.load["machine"])
    png_path = json_path.with_suffix(".png")
    atomic_write_bytes(json_path, write_fit_json(fit))
    atomic_write_bytes(png_path, plot_fit(fit, measurements))
    return CalibrationResult(fit, json_path, png_path)


def cpu_count() -> int:
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
