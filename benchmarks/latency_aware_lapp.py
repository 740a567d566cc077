"""Latency-aware LAPP vs FLOPs-constrained LAPP: accuracy against latency measured on each target.

For each seed, trains (one `lapp-edge train` process per run, one torch thread each, at most
`--jobs` at once; a killed benchmark resumes: finished runs are reused, unfinished ones resumed):
  - flops-<T>:               --flops-target T, for each T of --flops-targets;
  - latency-<target>-<R>:    --target <target> --latency-target R, for each target and R of --latency-targets;
then exports each run to a package (`lapp-edge export`, verified) and measures, on every target of
--targets at --batch, the package's latency as a ratio to the dense network (the layer table's dense
reference ONNX, compiled the same way), interleaved in one process with load checks, as the median
over --compiles fresh compiles of both (`compile.ratio_over_compiles`: one compile's ratio moves by
a few percent, docs/RESULTS.md), next to what the target's layer table predicts for it. Writes results.json, results.md (a table,
then accuracy at equal measured latency: each latency-aware run against the same seed's FLOPs runs interpolated
linearly to its measured latency on its own target, and the mean over seeds) and accuracy_vs_latency.png (both
methods, per target) into --out. `--summarize` rewrites results.md and the plot from results.json alone.

    python benchmarks/latency_aware_lapp.py --out bench-results/latency-aware
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lapp_edge.child_processes import ChildProcesses  # noqa: E402
from lapp_edge.costs.latency_table import find_table_file, load_table, onnx_conv_layers  # noqa: E402
from lapp_edge.deploy.package import load_package  # noqa: E402
from lapp_edge.deploy.compile import OnnxModel, ratio_over_compiles  # noqa: E402
from lapp_edge.deploy.measure import cpu_model, cpu_snapshot, machine_key, other_cpu_share_since  # noqa: E402
from lapp_edge.deploy.targets import load_target, runtime_version  # noqa: E402
from lapp_edge.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from lapp_edge.resources import find_latency_file  # noqa: E402

CHILDREN = ChildProcesses("latency_aware_lapp")   # the training processes, stopped with this one


@dataclass
class Run:
    name: str
    method: str                    # "flops" | "latency"
    seed: int
    flags: list[str]
    shaped_for: str = ""           # the target a latency run was trained for
    budget: float = 0.0            # its FLOPs or latency target


@dataclass
class Row:
    run: str
    method: str
    seed: int
    shaped_for: str
    budget: float
    top1: float
    flops_ratio: float
    measured: dict[str, float]     # target -> measured latency ratio to dense at --batch (median over compiles)
    per_compile: dict[str, list[float]]   # target -> each fresh compile's ratio (their spread is the compile noise)
    predicted: dict[str, float]    # target -> the layer table's predicted ratio
    widths: dict[str, int]
    at_freeze: dict[str, float] = field(default_factory=dict)   # latency runs: target -> the applied plan's ratio measured at freeze


def measured_at_freeze(report: dict) -> dict[str, float]:
    """The applied freeze plan's measured ratio per target (training/landing.py), {} where none was measured."""
    landing = report.get("landing") or {}
    if not landing.get("rounds"):
        return {}
    return dict(landing["rounds"][landing["chosen"]]["measured"])


def plan(args: argparse.Namespace) -> list[Run]:
    runs = []
    for seed in args.seeds:
        for profile in args.train_targets:
            for ratio in args.latency_targets:
                # a run name says what was trained: never reused across settings
                blocks = "-blocks" if args.block_removal else ""
                floor = f"-mpr{args.max_pruning_ratio:g}" if args.max_pruning_ratio < 1 else ""
                runs.append(Run(f"latency-{profile}-{ratio:g}{blocks}{floor}-s{seed}", "latency", seed,
                                ["--target", profile, "--latency-target", str(ratio), "--latency-batch", str(args.batch),
                                 *(["--block-removal"] if args.block_removal else []),
                                 *(["--max-pruning-ratio", str(args.max_pruning_ratio)] if floor else [])],
                                profile, ratio))
        for target in args.flops_targets:
            runs.append(Run(f"flops-{target:g}-s{seed}", "flops", seed, ["--flops-target", str(target)], "", target))
    return runs


def launch(run: Run, args: argparse.Namespace) -> subprocess.Popen[bytes] | None:
    out = Path(args.out) / run.name
    if (out / "report.json").is_file():
        return None
    if (out / "checkpoint.pt").is_file():
        command = ["--out", str(out), "--resume", "--quiet"]
    else:
        command = ["--out", str(out), "--model", args.model, "--epochs", str(args.epochs), "--prune-epochs", str(args.prune_epochs),
                   "--train-subset", str(args.train_subset), "--seed", str(run.seed), "--threads", "1", "--quiet", *run.flags,
                   *(["--channel-multiple", str(args.channel_multiple)] if args.channel_multiple else [])]
    log = open(Path(args.out) / f"{run.name}.log", "ab")  # noqa: SIM115 - closed when the process ends
    return CHILDREN.start([sys.executable, "-m", "lapp_edge.cli", "train", *command], stdout=log, stderr=subprocess.STDOUT)


def train_all(runs: list[Run], args: argparse.Namespace) -> list[str]:
    """Train every run, `args.jobs` at a time; returns the names that failed."""
    pending, active, failed = list(runs), {}, []
    started = time.perf_counter()
    finished = 0
    while pending or active:
        while pending and len(active) < args.jobs:
            run = pending.pop(0)
            process = launch(run, args)
            if process is None:
                finished += 1
                continue
            active[run.name] = process
            print(f"[{time.perf_counter() - started:6.0f} s] training {run.name}", flush=True)
        for name, process in list(active.items()):
            if process.poll() is not None:
                CHILDREN.forget(process)
                del active[name]
                finished += 1
                if process.returncode != 0:
                    failed.append(name)
                elapsed = time.perf_counter() - started
                print(f"[{elapsed:6.0f} s] {name} {'failed' if process.returncode else 'done'} ({finished}/{len(runs)})", flush=True)
        time.sleep(2)
    return failed


def export(run: Run, args: argparse.Namespace) -> Path:
    package = Path(args.out) / "packages" / run.name
    if not (package / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "lapp_edge.cli", "export", str(Path(args.out) / run.name), "--out", str(package)],
                       check=True, stdout=subprocess.DEVNULL)
    return package


def measure(package: Path, targets: list[str], batch: int, work: Path,
            compiles: int) -> tuple[dict[str, float], dict[str, list[float]], dict[str, float]]:
    """Per target: the package's latency / the table's dense reference latency (interleaved; the median
    over `compiles` fresh compiles of both, and each compile's ratio), and the table's prediction."""
    measured, per_compile, predicted = {}, {}, {}
    loaded = load_package(package)
    manifest, shape, onnx_path = loaded.manifest, loaded.input_shape, loaded.onnx_path
    rng = np.random.default_rng(0)
    data = rng.standard_normal((batch, *shape)).astype(np.float32)
    for name in targets:
        profile = load_target(name)
        table_path = find_table_file(profile.name, manifest["model"], shape, machine_key())
        table = load_table(table_path) if table_path is not None else None
        reference = find_latency_file(table.dense_reference if table else f"dense-{manifest['model']}-{'x'.join(map(str, shape))}.onnx")
        if reference is None:
            raise SystemExit(f"latency_aware_lapp: error: no dense reference ONNX for {manifest['model']} in the latency data")
        ratio = ratio_over_compiles(OnnxModel(onnx_path, "input", shape), OnnxModel(reference, "input", shape), profile,
                                    batch, work / package.name / name, data, compiles)
        measured[name], per_compile[name] = ratio.median, ratio.per_compile
        if table is None or batch not in table.batches:
            predicted[name] = float("nan")      # no layer table for this target on this machine (profile-layers)
            continue
        bt = table.batch(batch)
        predicted[name] = float(bt.predict_ratio(onnx_conv_layers(onnx_path)) / bt.predict_ratio(onnx_conv_layers(reference)))
    return measured, per_compile, predicted


@dataclass
class EqualLatency:
    """One latency-aware run against FLOPs-constrained LAPP of the same seed at the same measured latency."""

    run: str
    shaped_for: str
    budget: float                  # its latency target (ratio of dense)
    seed: int
    measured: float                # the latency-aware run's measured latency ratio on its own target
    top1: float
    flops_top1_at_equal_latency: float   # the same seed's FLOPs runs' top-1, linear in measured latency
    extrapolated: bool             # the measured latency lies outside the FLOPs runs' range
    difference_points: float       # latency-aware minus FLOPs, top-1 points


def equal_latency(rows: list[Row]) -> list[EqualLatency]:
    """Accuracy at equal measured latency: for each latency-aware run, the top-1 of the FLOPs-constrained
    runs of the same seed interpolated linearly (in their measured latency on the run's own target) to
    the run's measured latency; outside their range, extrapolated from the nearest two (flagged).
    Runs whose own target was not measured, and seeds without two FLOPs runs, are left out."""
    out = []
    for run in rows:
        target = run.shaped_for
        if run.method != "latency" or target not in run.measured:
            continue
        points = sorted((r.measured[target], r.top1) for r in rows
                        if r.method == "flops" and r.seed == run.seed and target in r.measured)
        if len(points) < 2:
            continue
        x = run.measured[target]
        inside = points[0][0] <= x <= points[-1][0]
        if inside:
            index = next(i for i in range(1, len(points)) if points[i][0] >= x)
            (x0, y0), (x1, y1) = points[index - 1], points[index]
        else:
            (x0, y0), (x1, y1) = points[:2] if x < points[0][0] else points[-2:]
        flops_top1 = y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else (y0 + y1) / 2
        out.append(EqualLatency(run.run, target, run.budget, run.seed, x, run.top1, flops_top1, not inside,
                                100 * (run.top1 - flops_top1)))
    return out


def format_equal_latency(comparisons: list[EqualLatency]) -> str:
    lines = ["| shaped for | budget | seed | measured latency | latency-aware top-1 | FLOPs LAPP top-1 at that latency | difference (points) |",
             "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c.shaped_for} | {c.budget:g} | {c.seed} | {c.measured:.3f} | {c.top1:.4f} | {c.flops_top1_at_equal_latency:.4f}"
                     f"{' (extrapolated)' if c.extrapolated else ''} | {c.difference_points:+.2f} |")
    for target, budget in sorted({(c.shaped_for, c.budget) for c in comparisons}):
        group = [c for c in comparisons if (c.shaped_for, c.budget) == (target, budget)]
        diffs = [c.difference_points for c in group]
        spread = f", sd {np.std(diffs, ddof=1):.2f}" if len(diffs) > 1 else ""
        extrapolated = sum(c.extrapolated for c in group)
        note = f" ({extrapolated} extrapolated)" if extrapolated else ""
        lines.append(f"| {target} | {budget:g} | mean of {len(diffs)}{note} | | | | **{np.mean(diffs):+.2f}**{spread} |")
    return "\n".join(lines)


def format_markdown(rows: list[Row], targets: list[str], header: dict[str, str]) -> str:
    lines = [f"- {key}: {value}" for key, value in header.items()] + [""]
    columns = " | ".join(f"{t} measured (predicted)" for t in targets)
    lines += [f"| run | method | shaped for | budget | top-1 | FLOPs | {columns} | off budget (own target) | measured at freeze |",
              "|---" * (8 + len(targets)) + "|"]
    for r in rows:
        cells = " | ".join(f"{r.measured[t]:.3f} [{min(r.per_compile[t]):.3f}-{max(r.per_compile[t]):.3f}] ({r.predicted[t]:.3f})"
                           for t in targets)
        own = r.shaped_for if r.method == "latency" and r.shaped_for in r.measured else ""
        off = f"{100 * (r.measured[own] / r.budget - 1):+.1f}%" if own else ""
        freeze = f"{r.at_freeze[own]:.3f}" if own and own in r.at_freeze else ""
        lines.append(f"| {r.run} | {r.method} | {r.shaped_for or '-'} | {r.budget:g} | {r.top1:.4f} | {r.flops_ratio:.3f} | {cells} "
                     f"| {off} | {freeze} |")
    return "\n".join(lines)


def plot(rows: list[Row], targets: list[str], path: Path, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for axis, target in zip(axes[0], targets):
        for method, marker in (("flops", "o"), ("latency", "s")):
            chosen = [r for r in rows if r.method == method and (method == "flops" or r.shaped_for == target)]
            axis.scatter([r.measured[target] for r in chosen], [100 * r.top1 for r in chosen], marker=marker,
                         label="FLOPs-constrained LAPP" if method == "flops" else f"latency-aware LAPP (for {target})")
            for r in chosen:
                axis.annotate(f"{r.budget:g}", (r.measured[target], 100 * r.top1), fontsize=7)
        axis.set_xlabel(f"measured latency / dense, {target}, batch {batch}")
        axis.set_ylabel("Fashion-MNIST top-1 (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results/latency-aware")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--prune-epochs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--flops-targets", default="0.3,0.45")
    parser.add_argument("--latency-targets", default="0.5")
    parser.add_argument("--train-targets", default="x86-ort-fp32,x86-openvino-bf16", help="targets latency-aware runs are shaped for")
    parser.add_argument("--targets", default="x86-ort-fp32,x86-openvino-bf16", help="targets every package is measured on")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channel-multiple", type=int, default=0,
                        help="widths of every run in multiples of this (0: the train default, the targets' multiple on this CPU "
                             "for latency-aware runs; 8 lets them reach budgets a coarser block cannot)")
    parser.add_argument("--block-removal", action="store_true",
                        help="latency-aware runs may remove whole residual branches (train --block-removal); FLOPs runs "
                             "stay as `lapp-edge train` trains by default, width only")
    parser.add_argument("--max-pruning-ratio", type=float, default=1.0,
                        help="latency-aware runs keep at least 1 - R of every group's channels (train --max-pruning-ratio); "
                             "FLOPs runs stay as `lapp-edge train` trains by default")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at once (one thread each)")
    parser.add_argument("--compiles", type=int, default=3, help="fresh compiles of both networks per latency ratio (median taken)")
    parser.add_argument("--summarize", action="store_true",
                        help="no training or measuring: rewrite results.md, the equal-latency table and the plot from --out's results.json")
    args = parser.parse_args()
    if args.summarize:
        return summarize(Path(args.out))
    if not 0 < args.max_pruning_ratio <= 1:
        print(f"latency_aware_lapp: error: --max-pruning-ratio must lie in (0, 1], got {args.max_pruning_ratio}", file=sys.stderr)
        return 2
    if args.compiles < 1:
        print(f"latency_aware_lapp: error: --compiles must be at least 1, got {args.compiles}", file=sys.stderr)
        return 2
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.flops_targets = [float(t) for t in args.flops_targets.split(",") if t]
    args.latency_targets = [float(t) for t in args.latency_targets.split(",") if t]
    args.train_targets = [t for t in args.train_targets.split(",") if t]
    targets = [t for t in args.targets.split(",") if t]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runs = plan(args)
    with CHILDREN.stop_on_signal():
        failed = train_all(runs, args)
    if failed:
        print(f"latency_aware_lapp: error: runs failed: {failed}; see their logs in {args.out}", file=sys.stderr)
        return 1
    rows = []
    start = cpu_snapshot()
    with tempfile.TemporaryDirectory(prefix="lapp-latency-aware-") as temporary:
        for run in runs:
            report = json.loads((Path(args.out) / run.name / "report.json").read_text())
            measured, per_compile, predicted = measure(export(run, args), targets, args.batch, Path(temporary), args.compiles)
            rows.append(Row(run.name, run.method, run.seed, run.shaped_for, run.budget, report["accuracy"]["test_top1"],
                            report["flops"]["ratio"], measured, per_compile, predicted, {l["name"]: l["kept"] for l in report["layers"]},
                            measured_at_freeze(report)))
            print(f"{run.name}: top-1 {rows[-1].top1:.4f}, measured " + ", ".join(f"{t} {v:.3f}" for t, v in measured.items()), flush=True)
    header = {"machine": f"{cpu_model()} ({machine_key()})", "runtimes": ", ".join(runtime_version(load_target(t).backend) for t in targets),
              "others' CPU share while measuring": f"{other_cpu_share_since(start):.2f}",
              "schedule": f"{args.model}, {args.epochs} epochs ({args.prune_epochs} pruning), {args.train_subset or 60000} "
                          f"training images, seeds {args.seeds}, one thread per run"
                          + (f", channel multiple {args.channel_multiple}" if args.channel_multiple else "")
                          + (", latency-aware runs with --block-removal" if args.block_removal else "")
                          + (f", latency-aware runs with --max-pruning-ratio {args.max_pruning_ratio:g}"
                             if args.max_pruning_ratio < 1 else ""),
              "latency": f"batch {args.batch}, ratio to the dense network measured interleaved in one process, median over "
                         f"{args.compiles} fresh compiles of both [their range]; (predicted) = the target's layer table"}
    atomic_write_json(Path(args.out) / "results.json", {"settings": vars(args), "header": header, "rows": [asdict(r) for r in rows]})
    return summarize(Path(args.out))


def summarize(out: Path) -> int:
    """From results.json: add (or refresh) its accuracy-at-equal-latency comparisons, write results.md (the
    runs, then those comparisons) and the plot."""
    path = out / "results.json"
    if not path.is_file():
        print(f"latency_aware_lapp: error: {path} does not exist (run the benchmark first)", file=sys.stderr)
        return 2
    results = json.loads(path.read_text())
    rows = [Row(**row) for row in results["rows"]]
    for row in rows:               # results written before the freeze was measured: read it from the run's report
        report = out / row.run / "report.json"
        if row.method == "latency" and not row.at_freeze and report.is_file():
            row.at_freeze = measured_at_freeze(json.loads(report.read_text()))
    stored = results["settings"]["targets"]        # main() stores the --targets string; a list is read as it is
    targets = list(stored) if isinstance(stored, list) else [t for t in str(stored).split(",") if t]
    comparisons = equal_latency(rows)
    atomic_write_json(path, {**results, "rows": [asdict(r) for r in rows], "equal_latency": [asdict(c) for c in comparisons]})
    table = format_markdown(rows, targets, results["header"]) + "\n\nAccuracy at equal measured latency (own target):\n\n" \
        + format_equal_latency(comparisons)
    atomic_write_text(out / "results.md", table + "\n")
    plot(rows, targets, out / "accuracy_vs_latency.png", int(results["settings"]["batch"]))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
