"""Dense vs slim (LAPP) latency per CPU target at batch 1 and 32, and int8 (bf16) vs fp32 per runtime.

For every target profile (default: the five shipped x86 profiles) the dense package and each slim
package are compiled the way `lapp-edge bench` compiles them (`get_backend(profile.backend)
.load(LoadRequest(...))`, int8 with the profile's calibration set drawn with the package's
mean/std and the profile's first int8 route), at batch 1 and 32, at the profile's threads.
Then, all in this one process:

- dense/slim latency ratio, measured interleaved (`interleaved_block_ratios`: blocks of calls
  alternating dense/slim, order reversed every block; the figure is the median of the block
  ratios) = the measured speedup; divided by the FLOPs speedup (dense MACs / slim MACs from
  the packages' manifests) it says how much of the FLOPs cut turns into speed (1.0 = all);
- low-precision speedup per runtime: the fp32 profile of the same backend vs each int8/bf16
  profile, for each model and batch, interleaved the same way;
- absolute medians (`measure_latency`, the profile's protocol; fewer iterations at batch 32)
  for reference only: they drift between processes, the ratios do not.

Every ratio is taken over --compiles fresh compiles of every network (default 3; each round
compiles everything again in its own folder): the figure is the median of the rounds' medians and
`per_compile` keeps each round's. Why: one compile of the same ONNX moves a slim/dense ratio by a few
percent (0.502-0.518 on ORT, 0.463-0.506 on OpenVINO over four compiles; docs/RESULTS.md), more than
the interleaving's own noise. Absolute medians are the first round's.

Other processes' CPU share is read from /proc/stat around every measurement
(`cpu_snapshot` / `other_cpu_share_since`); a ratio measured while it was above
--max-other-cpu is measured again (--retries), the quietest attempt is kept and flagged if it
never got below the limit.

    .venv/bin/python benchmarks/dense_vs_slim_latency.py --dense models/dense-r20 \
        --slim models/lapp40-m8 --slim models/lapp40-m1 [--out bench-results/dense_vs_slim]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lapp_edge.deploy.backends import BackendUnavailable, Runner  # noqa: E402
from lapp_edge.deploy.compile import compile_runner, int8_calibration, int8_route  # noqa: E402
from lapp_edge.deploy.measure import (  # noqa: E402
    LatencyStats, cpu_model, cpu_snapshot, measure_latency, other_cpu_share_since, quiet_block_ratios,
    RatioProtocol,
)
from lapp_edge.deploy.bench import load_test_set  # noqa: E402
from lapp_edge.deploy.calibration_set import load_definition  # noqa: E402
from lapp_edge.errors import UserError  # noqa: E402
from lapp_edge.fileio import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from lapp_edge.deploy.package import ModelPackage, load_package  # noqa: E402
from lapp_edge.deploy.targets import TargetProfile, load_target  # noqa: E402

DEFAULT_TARGETS = ["x86-ort-fp32", "x86-ort-int8", "x86-openvino-f32", "x86-openvino-bf16", "x86-openvino-int8"]
BATCHES = (1, 32)
EFFICIENCY_GOAL = 0.8          # measured speedup / FLOPs speedup, fp32, batch 32, widths multiples of 8
INT8_GOAL = 2.0                # OpenVINO int8 vs OpenVINO f32


@dataclass(frozen=True)
class Options(RatioProtocol):
    calls_large_batch: int = 6
    compiles: int = 3                  # rounds of fresh compiles; each ratio is the median of the rounds'
    large_batch_iterations: int = 50   # absolute medians at batch > 1: min iterations (the profile's min_seconds still holds)


@dataclass
class ModelInfo:
    name: str
    role: str                          # dense | slim
    package: str
    source_run: str
    channel_multiple: int | None       # from the source run's config.json; None where unreadable
    widths: dict[str, int]
    widths_all_multiple_of_8: bool
    macs: float
    macs_ratio: float                  # slim MACs / dense MACs (manifest)
    flops_speedup: float               # dense MACs / these MACs
    test_top1: float | None


@dataclass
class Ratio:
    """A latency ratio A/B measured interleaved; > 1 means B is faster. Over several compile rounds:
    `median` is the median of the rounds' medians (`per_compile`), the blocks and attempts are pooled."""

    median: float
    block_ratios: list[float]
    iqr: tuple[float, float]           # of the pooled block ratios
    other_cpu_share: float             # others' share of the machine while the kept attempt ran (the largest round's)
    attempts: int
    flagged: bool                      # never got below --max-other-cpu (in some round)
    per_compile: list[float] = field(default_factory=list)


@dataclass
class Absolute:
    model: str
    batch: int
    stats: LatencyStats
    other_cpu_share: float


@dataclass
class TargetInfo:
    name: str
    backend: str
    precision: str
    int8_route: str
    threads: int
    status: str                        # ok | unavailable
    message: str = ""
    runtime_version: str = ""
    precision_used: dict[str, str] = field(default_factory=dict)    # "model/batch" -> what the runtime compiled
    calibration: dict[str, Any] = field(default_factory=dict)
    absolute: list[Absolute] = field(default_factory=list)


@dataclass
class SlimRow:
    target: str
    batch: int
    slim: str
    channel_multiple: int | None
    macs_ratio: float
    flops_speedup: float
    dense_ms: float                    # absolute medians, for reference
    slim_ms: float
    speedup: Ratio                     # dense latency / slim latency, interleaved
    efficiency: float                  # measured speedup / FLOPs speedup


@dataclass
class PrecisionRow:
    backend: str
    target: str                        # the low-precision profile
    reference: str                     # the fp32 profile of the same backend
    model: str
    batch: int
    reference_ms: float
    target_ms: float
    speedup: Ratio                     # fp32 latency / low-precision latency, interleaved


@dataclass
class Goal:
    goal: str
    case: str
    value: float
    met: bool


@dataclass
class Report:
    date: str
    command: str
    models: list[ModelInfo]
    targets: list[TargetInfo]
    slim_rows: list[SlimRow]
    precision_rows: list[PrecisionRow]
    goals: list[Goal]
    load: dict[str, float]
    options: dict[str, Any]
    machine: dict[str, Any]


# --- models ------------------------------------------------------------------------------------

def _channel_multiple(package: ModelPackage) -> int | None:
    config = Path(str(package.manifest.get("source_run", ""))) / "config.json"
    if not config.is_file():
        return None
    value = read_json(config).get("channel_multiple")
    return int(value) if isinstance(value, int) else None


def model_info(package: ModelPackage, role: str, dense_macs: float) -> ModelInfo:
    flops = package.manifest["flops"]
    widths = {k: int(v) for k, v in package.manifest.get("widths", {}).items()}
    macs = float(flops["slim_macs"])
    return ModelInfo(
        name=package.name, role=role, package=str(package.directory), source_run=str(package.manifest.get("source_run", "")),
        channel_multiple=_channel_multiple(package), widths=widths, widths_all_multiple_of_8=all(w % 8 == 0 for w in widths.values()),
        macs=macs, macs_ratio=macs / dense_macs, flops_speedup=dense_macs / macs,
        test_top1=package.manifest.get("accuracy", {}).get("test_top1"),
    )


def check_packages(dense: ModelPackage, slims: list[ModelPackage]) -> None:
    names = [dense.name, *(p.name for p in slims)]
    if len(set(names)) != len(names):
        raise UserError(f"package directory names must differ (they label the table): {', '.join(names)}")
    for package in slims:
        if package.input_shape != dense.input_shape or package.manifest.get("model") != dense.manifest.get("model"):
            raise UserError(f"{package.directory} is not the same model family/input as the dense package {dense.directory}")
        if float(package.manifest["flops"]["dense_macs"]) != float(dense.manifest["flops"]["slim_macs"]):
            raise UserError(f"{package.directory}: its dense MACs differ from the dense package's MACs")


# --- compiling ---------------------------------------------------------------------------------

# --- measuring ---------------------------------------------------------------------------------

def measure_ratio(runner_a: Runner, runner_b: Runner, data: np.ndarray, options: Options) -> Ratio:
    """A/B latency ratio, interleaved; retried while other processes load the machine, quietest attempt kept."""
    quiet = quiet_block_ratios(runner_a, runner_b, data, options)
    ratios = quiet.block_ratios
    return Ratio(float(np.median(ratios)), ratios, (float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))),
                 quiet.other_cpu_share, quiet.attempts, quiet.flagged, [float(np.median(ratios))])


def combine_rounds(rounds: list[Ratio]) -> Ratio:
    """One ratio from the same A/B measured after each of several fresh compiles: the median of the
    rounds' medians, blocks and attempts pooled, the largest load, flagged if any round was.
    Raises ValueError for no rounds."""
    if not rounds:
        raise ValueError("no compile rounds to combine")
    blocks = [b for r in rounds for b in r.block_ratios]
    per_compile = [r.median for r in rounds]
    return Ratio(float(np.median(per_compile)), blocks, (float(np.percentile(blocks, 25)), float(np.percentile(blocks, 75))),
                 max(r.other_cpu_share for r in rounds), sum(r.attempts for r in rounds), any(r.flagged for r in rounds),
                 per_compile)


def measure_absolute(runner: Runner, model: str, data: np.ndarray, profile: TargetProfile, options: Options) -> Absolute:
    protocol = profile.latency if len(data) == 1 else replace(
        profile.latency, min_iterations=min(profile.latency.min_iterations, options.large_batch_iterations))
    start = cpu_snapshot()
    stats = measure_latency(runner, data, protocol)
    return Absolute(model, len(data), stats, other_cpu_share_since(start))


# --- the benchmark -----------------------------------------------------------------------------

Runners = dict[tuple[str, str, int], Runner]      # (target, model, batch) -> runner


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def bench_targets(profiles: list[TargetProfile], packages: list[ModelPackage], images: np.ndarray, work_dir: Path,
                  options: Options, data_dir: str | None, time_absolute: bool = True) -> tuple[list[TargetInfo], Runners]:
    """Compile every (target, model, batch) and (with `time_absolute`) measure absolute medians; a missing
    runtime marks its target unavailable."""
    infos: list[TargetInfo] = []
    runners: Runners = {}
    for profile in profiles:
        info = TargetInfo(profile.name, profile.backend, profile.precision, "", profile.threads, "ok")
        infos.append(info)
        try:
            info.int8_route = int8_route(profile)
            for package in packages:
                drawn = int8_calibration(profile, package.manifest["input"]["mean"], package.manifest["input"]["std"], data_dir)
                calibration = None if drawn is None else drawn.images
                if drawn is not None:
                    definition = drawn.definition
                    info.calibration = {"name": definition.name, "count": definition.count, "fingerprint": drawn.fingerprint}
                for batch in BATCHES:
                    runner = compile_runner(package, profile, batch, work_dir, calibration)
                    runners[(profile.name, package.name, batch)] = runner
                    info.runtime_version = runner.info.runtime_version
                    info.precision_used[f"{package.name}/{batch}"] = runner.info.precision_used
                    if time_absolute:
                        info.absolute.append(measure_absolute(runner, package.name, images[:batch], profile, options))
            say(f"{profile.name}: compiled and timed " + ", ".join(
                f"{a.model}/b{a.batch} {a.stats.median_ms:.3f} ms" for a in info.absolute) if time_absolute
                else f"{profile.name}: compiled again")
        except BackendUnavailable as error:
            info.status, info.message = "unavailable", str(error)
            say(f"{profile.name}: {error}")
    return infos, runners


def absolute_ms(info: TargetInfo, model: str, batch: int) -> float:
    return next(a.stats.median_ms for a in info.absolute if a.model == model and a.batch == batch)


def run(dense_dir: str, slim_dirs: list[str], target_paths: list[str], options: Options, data_dir: str | None,
        command: str) -> Report:
    profiles = [load_target(path) for path in target_paths]       # every problem is one line before any work
    for profile in profiles:
        if profile.precision == "int8":
            load_definition(profile.calibration)
    dense = load_package(dense_dir)
    slims = [load_package(path) for path in slim_dirs]
    check_packages(dense, slims)
    for profile in profiles:
        if profile.input_shape != dense.input_shape:
            raise UserError(f"target {profile.name} is for inputs {list(profile.input_shape)}; {dense.name} takes {list(dense.input_shape)}")
    dense_macs = float(dense.manifest["flops"]["slim_macs"])
    models = [model_info(dense, "dense", dense_macs), *(model_info(p, "slim", dense_macs) for p in slims)]
    images = load_test_set(dense, data_dir).images[: max(BATCHES)]
    load_start = cpu_snapshot()

    slim_rounds: dict[tuple[str, int, str], list[Ratio]] = {}          # (target, batch, slim) -> one Ratio per round
    precision_rounds: dict[tuple[str, str, str, int], list[Ratio]] = {}  # (reference, target, model, batch) -> per round
    infos: list[TargetInfo] = []
    with tempfile.TemporaryDirectory(prefix="lapp-dense-vs-slim-") as temporary:
        for round_index in range(options.compiles):
            say(f"compile round {round_index + 1} of {options.compiles}")
            round_infos, runners = bench_targets(profiles, [dense, *slims], images, Path(temporary) / f"round-{round_index}",
                                                 options, data_dir, time_absolute=round_index == 0)
            if round_index == 0:
                infos = round_infos          # absolute medians and availability: the first round's
            ok = {info.name for info in infos if info.status == "ok"} & {i.name for i in round_infos if i.status == "ok"}
            for info in infos:
                if info.name not in ok:
                    continue
                for batch in BATCHES:
                    for slim in models[1:]:
                        speedup = measure_ratio(runners[(info.name, dense.name, batch)], runners[(info.name, slim.name, batch)],
                                                images[:batch], options)
                        slim_rounds.setdefault((info.name, batch, slim.name), []).append(speedup)
                        say(f"{info.name} b{batch} dense/{slim.name}: {speedup.median:.3f}x (FLOPs {slim.flops_speedup:.3f}x), "
                            f"others' CPU {speedup.other_cpu_share:.2f}{' FLAGGED' if speedup.flagged else ''}")
            for info in infos:
                if info.name not in ok or info.precision == "fp32":
                    continue
                reference = next((r for r in infos if r.backend == info.backend and r.precision == "fp32" and r.name in ok), None)
                if reference is None:
                    continue
                for model in models:
                    for batch in BATCHES:
                        speedup = measure_ratio(runners[(reference.name, model.name, batch)], runners[(info.name, model.name, batch)],
                                                images[:batch], options)
                        precision_rounds.setdefault((reference.name, info.name, model.name, batch), []).append(speedup)
                        say(f"{reference.name}/{info.name} {model.name} b{batch}: {speedup.median:.3f}x, "
                            f"others' CPU {speedup.other_cpu_share:.2f}{' FLAGGED' if speedup.flagged else ''}")
            for runner in runners.values():
                runner.close()
    by_name = {info.name: info for info in infos}
    slim_rows: list[SlimRow] = []
    for (target, batch, slim_name), rounds in slim_rounds.items():
        slim = next(m for m in models if m.name == slim_name)
        speedup = combine_rounds(rounds)
        slim_rows.append(SlimRow(target, batch, slim.name, slim.channel_multiple, slim.macs_ratio, slim.flops_speedup,
                                 absolute_ms(by_name[target], dense.name, batch), absolute_ms(by_name[target], slim.name, batch),
                                 speedup, speedup.median / slim.flops_speedup))
    precision_rows: list[PrecisionRow] = []
    for (reference_name, target, model_name, batch), rounds in precision_rounds.items():
        precision_rows.append(PrecisionRow(by_name[target].backend, target, reference_name, model_name, batch,
                                           absolute_ms(by_name[reference_name], model_name, batch),
                                           absolute_ms(by_name[target], model_name, batch), combine_rounds(rounds)))

    shares = [r.speedup.other_cpu_share for r in slim_rows] + [r.speedup.other_cpu_share for r in precision_rows]
    load = {
        "other_cpu_share_median": float(np.median(shares)) if shares else 0.0,
        "other_cpu_share_max": float(np.max(shares)) if shares else 0.0,
        "other_cpu_share_over_whole_run": other_cpu_share_since(load_start),
        "flagged_ratios": float(sum(1 for r in slim_rows if r.speedup.flagged) + sum(1 for r in precision_rows if r.speedup.flagged)),
        "ratios": float(len(shares)),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    versions = {info.backend: info.runtime_version for info in infos if info.runtime_version}
    return Report(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), command=command, models=models,
        targets=infos, slim_rows=slim_rows, precision_rows=precision_rows, goals=evaluate_goals(infos, models, slim_rows, precision_rows),
        load=load, options=asdict(options),
        machine={"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__, **versions},
    )


def evaluate_goals(infos: list[TargetInfo], models: list[ModelInfo], slim_rows: list[SlimRow],
                   precision_rows: list[PrecisionRow]) -> list[Goal]:
    precision_of = {info.name: info.precision for info in infos}
    multiple_of = {m.name: m.channel_multiple for m in models}
    goals = [
        Goal(f"measured/FLOPs speedup >= {EFFICIENCY_GOAL} (fp32, batch 32, channel multiple 8)", f"{r.target} {r.slim}", r.efficiency,
             r.efficiency >= EFFICIENCY_GOAL)
        for r in slim_rows if precision_of[r.target] == "fp32" and r.batch == 32 and multiple_of[r.slim] == 8
    ]
    goals += [
        Goal(f"OpenVINO int8 >= {INT8_GOAL}x faster than OpenVINO f32", f"{r.model} b{r.batch}", r.speedup.median, r.speedup.median >= INT8_GOAL)
        for r in precision_rows if r.backend == "openvino-cpu" and precision_of[r.target] == "int8"
    ]
    return goals


# --- output ------------------------------------------------------------------------------------

def _ratio_cell(ratio: Ratio) -> str:
    if len(ratio.per_compile) > 1:
        return f"{ratio.median:.3f} ({min(ratio.per_compile):.2f}-{max(ratio.per_compile):.2f})"
    return f"{ratio.median:.3f} ({ratio.iqr[0]:.2f}-{ratio.iqr[1]:.2f})"


def format_report(report: Report) -> str:
    used = {info.name: info.precision_used for info in report.targets}
    route = {info.name: info.int8_route for info in report.targets}
    lines = [f"Dense vs slim latency, {report.date}, {report.machine['cpu']}, {report.machine['cores']} cores; "
             f"{report.options['blocks']} interleaved blocks x {report.options['calls_batch1']} calls (batch 1) / "
             f"{report.options['calls_large_batch']} calls (batch 32); "
             + (f"median over {report.options['compiles']} fresh compiles of each compile's median block ratio (range over compiles)"
                if report.options.get("compiles", 1) > 1 else "medians of block ratios (inter-quartile range of blocks)"), "",
             "| model | channel multiple | widths | MACs | MACs ratio | FLOPs speedup | test top-1 |", "|---|---|---|---|---|---|---|"]
    for m in report.models:
        multiple = "(dense)" if m.role == "dense" else (m.channel_multiple if m.channel_multiple is not None else "?")
        lines.append(f"| {m.name} | {multiple} | {'/'.join(str(w) for w in m.widths.values())} | "
                     f"{m.macs / 1e6:.2f} M | {m.macs_ratio:.3f} | {m.flops_speedup:.3f} | {m.test_top1 if m.test_top1 is not None else '?'} |")
    lines += ["", "Dense vs slim (speedup = dense latency / slim latency, interleaved; efficiency = speedup / FLOPs speedup):", "",
              "| target | batch | slim | multiple | used (dense/slim) | dense ms | slim ms | FLOPs speedup | measured speedup | measured / FLOPs | others' CPU |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    dense_name = report.models[0].name
    for r in report.slim_rows:
        target = r.target + (f" ({route[r.target]})" if route[r.target] else "")
        lines.append(f"| {target} | {r.batch} | {r.slim} | {r.channel_multiple} | {used[r.target][f'{dense_name}/{r.batch}']}/"
                     f"{used[r.target][f'{r.slim}/{r.batch}']} | {r.dense_ms:.3f} | {r.slim_ms:.3f} | {r.flops_speedup:.2f} | "
                     f"{_ratio_cell(r.speedup)} | **{r.efficiency:.2f}** | {r.speedup.other_cpu_share:.2f}{' (flagged)' if r.speedup.flagged else ''} |")
    lines += ["", "Low precision vs fp32 per runtime (speedup = fp32 latency / low-precision latency, interleaved):", "",
              "| runtime | comparison | model | batch | fp32 ms | low-precision ms | speedup | others' CPU |", "|---|---|---|---|---|---|---|---|"]
    for p in report.precision_rows:
        target = p.target + (f" ({route[p.target]})" if route[p.target] else "")
        lines.append(f"| {p.backend} | {target} vs {p.reference} | {p.model} | {p.batch} | {p.reference_ms:.3f} | {p.target_ms:.3f} | "
                     f"**{_ratio_cell(p.speedup)}** | {p.speedup.other_cpu_share:.2f}{' (flagged)' if p.speedup.flagged else ''} |")
    lines += ["", "Goals:"]
    for g in report.goals:
        lines.append(f"- {g.goal}: {g.case}: {g.value:.2f} -> {'met' if g.met else 'NOT met'}")
    for info in report.targets:
        if info.status != "ok":
            lines.append(f"- {info.name}: {info.message}")
    load = report.load
    lines.append(f"Others' CPU share of the machine while measuring ratios: median {load['other_cpu_share_median']:.2f}, "
                 f"max {load['other_cpu_share_max']:.2f}; {int(load['flagged_ratios'])} of {int(load['ratios'])} ratios flagged "
                 f"(> {report.options['max_other_cpu']} after {report.options['retries']} retries); "
                 f"whole run {load['other_cpu_share_over_whole_run']:.2f}; load average at end {load['load_average_1min_at_end']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dense", required=True, help="model package of the dense network (lapp-edge export RUN --out models/NAME)")
    parser.add_argument("--slim", action="append", required=True, help="model package of a slim network (repeat for several)")
    parser.add_argument("--target", action="append", default=None, help="target profile name or YAML (repeat; default: the five shipped x86 profiles)")
    parser.add_argument("--out", default="bench-results/dense_vs_slim")
    parser.add_argument("--data-dir", default=None, help="dataset directory (default: the dataset's standard place)")
    defaults = Options()
    parser.add_argument("--blocks", type=int, default=defaults.blocks)
    parser.add_argument("--calls-large-batch", type=int, default=defaults.calls_large_batch)
    parser.add_argument("--max-other-cpu", type=float, default=defaults.max_other_cpu,
                        help="re-measure a ratio when other processes used more of the machine (2 cores: 0.5 = one full core)")
    parser.add_argument("--retries", type=int, default=defaults.retries)
    parser.add_argument("--compiles", type=int, default=defaults.compiles,
                        help="rounds of fresh compiles of every network; each ratio is the median of the rounds'")
    args = parser.parse_args(argv)
    try:
        if (args.blocks < 1 or args.calls_large_batch < 1 or args.compiles < 1 or args.retries < 0
                or not 0 < args.max_other_cpu <= 1):
            raise UserError("--blocks, --calls-large-batch and --compiles must be >= 1, --retries >= 0, --max-other-cpu in (0, 1]")
        options = replace(defaults, blocks=args.blocks, calls_large_batch=args.calls_large_batch,
                          max_other_cpu=args.max_other_cpu, retries=args.retries, compiles=args.compiles)
        command = " ".join([".venv/bin/python", "benchmarks/dense_vs_slim_latency.py", *(argv if argv is not None else sys.argv[1:])])
        report = run(args.dense, args.slim, args.target or DEFAULT_TARGETS, options, args.data_dir, command)
    except UserError as error:
        print(f"dense_vs_slim_latency: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    table = format_report(report)
    atomic_write_json(out / "dense_vs_slim.json", asdict(report))
    atomic_write_text(out / "dense_vs_slim.md", table + "\n")
    print(table)
    print(f"written to {out / 'dense_vs_slim.json'} and {out / 'dense_vs_slim.md'}")
    return 2 if any(info.status != "ok" for info in report.targets) else 0


if __name__ == "__main__":
    sys.exit(main())
