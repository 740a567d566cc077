"""Dense vs LAPP on Fashion-MNIST with ResNet-20: accuracy and epoch time per phase.

Runs each configuration as its own `lapp-edge train` process, side by side (one torch
thread each), then compares the reports. Epoch times are reported as wall clock and as
process CPU time; the ratios are paired per epoch (epoch k of LAPP over epoch k of dense,
which ran at the same time under the same load), the figure to trust on a shared machine. Re-running resumes unfinished runs and reuses finished ones.

    python benchmarks/lapp_vs_dense.py --out bench-results/lapp_vs_dense
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lapp_edge.child_processes import ChildProcesses  # noqa: E402
from lapp_edge.fileio import atomic_write_json, atomic_write_text  # noqa: E402

CHILDREN = ChildProcesses("lapp_vs_dense")   # the training processes, stopped with this one

CONFIGURATIONS: dict[str, list[str]] = {
    "dense": ["--dense"],
    "lapp": [],                                        # coupled groups (stage widths pruned), group score = sum
    "lapp-inner": ["--no-groups"],                     # inner convs only (the layout before coupled groups)
    "lapp-groups-max": ["--group-reduce", "max"],      # coupled groups, group score = max of the producers'
    "lapp-no-bypass": ["--no-bypass"],
    # shaped for the target's latency (its layer table on this CPU, `lapp-edge profile-layers`) instead of FLOPs, at
    # --latency-target of the dense latency on --latency-on; with --block-removal residual branches may go too
    "lapp-latency": ["--channel-multiple", "8"],
    "lapp-latency-blocks": ["--channel-multiple", "8", "--block-removal"],
    # FLOPs at most --flops-target AND latency at most --flops-target / --min-efficiency on each --latency-on target
    # (both budgets hold, the tightest binds): a FLOPs target whose cut must turn into measured speed
    "lapp-efficiency-blocks": ["--channel-multiple", "8", "--block-removal"],
    # the same budgets, the FLOPs landed on --flops-target and each latency a ceiling (--land-on-flops)
    "lapp-efficiency-landed": ["--channel-multiple", "8", "--block-removal", "--land-on-flops"],
    "lapp-efficiency-landed-keep1": ["--channel-multiple", "8", "--block-removal", "--keep-blocks", "1", "--land-on-flops"],
    "lapp-efficiency-landed-keep2": ["--channel-multiple", "8", "--block-removal", "--keep-blocks", "2", "--land-on-flops"],
}
# shaped for a latency budget of --flops-target / --min-efficiency beside a FLOPs bound (--max-flops)
EFFICIENCY_SHAPED = ("lapp-efficiency-blocks", "lapp-efficiency-landed", "lapp-efficiency-landed-keep1", "lapp-efficiency-landed-keep2")
LATENCY_SHAPED = ("lapp-latency", "lapp-latency-blocks", *EFFICIENCY_SHAPED)


@dataclass
class Row:
    name: str
    test_top1: float
    flops_ratio: float
    params_ratio: float
    pruning_cpu_s: float | None
    slim_cpu_s: float | None
    dense_cpu_s: float | None
    pruning_wall_s: float | None
    slim_wall_s: float | None
    dense_wall_s: float | None


def train_command(out: Path, settings: list[str]) -> list[str]:
    """The `lapp-edge train` command of one run: a new run with `settings`, or `--resume` where the run
    directory holds a checkpoint (a resumed run keeps its saved settings). A directory that holds
    neither a checkpoint nor a config (killed before it wrote one) has trained nothing and is cleared."""
    if (out / "checkpoint.pt").is_file():
        return [sys.executable, "-m", "lapp_edge.cli", "train", "--out", str(out), "--resume"]
    if (out / "config.json").is_file():    # killed before its first checkpoint: resume takes the settings again
        return [sys.executable, "-m", "lapp_edge.cli", "train", "--out", str(out), "--resume", *settings]
    if out.is_dir():
        shutil.rmtree(out)
    return [sys.executable, "-m", "lapp_edge.cli", "train", "--out", str(out), *settings]


def launch(name: str, args: argparse.Namespace) -> subprocess.Popen[bytes] | None:
    out = Path(args.out) / name
    if (out / "report.json").is_file():
        return None
    common = [
        "--model", args.model, "--dataset", "fashion-mnist", "--epochs", str(args.epochs),
        "--train-subset", str(args.train_subset), "--seed", str(args.seed), "--threads", str(args.threads),
        "--device", args.device,       # not --quiet: each run's log (OUT/NAME.log) shows its steps, epochs and freeze
    ]
    if name in LATENCY_SHAPED:
        common += ["--prune-epochs", str(args.prune_epochs)]
        for target in args.latency_on.split(","):
            common += ["--target", target]
        if name in EFFICIENCY_SHAPED:
            common += ["--max-flops", str(args.flops_target), "--latency-target", f"{args.flops_target / args.min_efficiency:.4f}"]
        else:
            common += ["--latency-target", str(args.latency_target)]
    elif name != "dense":  # a dense run refuses LAPP-only options
        common += ["--prune-epochs", str(args.prune_epochs), "--flops-target", str(args.flops_target)]
    log = open(Path(args.out) / f"{name}.log", "ab")  # noqa: SIM115 - closed when the process ends
    return CHILDREN.start(train_command(out, [*common, *CONFIGURATIONS[name]]), stdout=log, stderr=subprocess.STDOUT)


def row_from_report(name: str, report: dict) -> Row:
    wall, cpu = report["epoch_seconds_median"], report.get("epoch_cpu_seconds_median", {})
    return Row(
        name, report["accuracy"]["test_top1"], report["flops"]["ratio"],
        report["params"]["slim"] / report["params"]["dense"],
        cpu.get("pruning"), cpu.get("slim"), cpu.get("dense"), wall.get("pruning"), wall.get("slim"), wall.get("dense"),
    )


def paired_epoch_ratio(epochs: list[dict], dense_epochs: list[dict], phase: str) -> float | None:
    """Median over the epochs of `phase` of (CPU time of epoch k) / (dense CPU time of epoch k).
    The runs go side by side, so epoch k of each saw about the same load on the machine."""
    dense_by_epoch = {e["epoch"]: e["cpu_seconds"] for e in dense_epochs}
    ratios = [e["cpu_seconds"] / dense_by_epoch[e["epoch"]] for e in epochs
              if e["phase"] == phase and dense_by_epoch.get(e["epoch"])]
    return statistics.median(ratios) if ratios else None


def format_table(rows: list[Row], summary: dict) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [f"{'run':20s} {'top-1':>7s} {'FLOPs':>6s} {'params':>6s} {'cpu s/epoch: dense':>19s} {'pruning':>8s} {'slim':>6s}"]
    for r in rows:
        lines.append(f"{r.name:20s} {r.test_top1:7.4f} {r.flops_ratio:6.3f} {r.params_ratio:6.3f} "
                     f"{fmt(r.dense_cpu_s):>19s} {fmt(r.pruning_cpu_s):>8s} {fmt(r.slim_cpu_s):>6s}")
    lines.append("")
    for key, value in summary.items():
        lines.append(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results/lapp_vs_dense")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--prune-epochs", type=int, default=3)
    parser.add_argument("--flops-target", type=float, default=0.4)
    parser.add_argument("--latency-target", type=float, default=0.45, help="the latency-shaped configurations' budget (ratio to dense)")
    parser.add_argument("--latency-on", default="x86-ort-fp32",
                        help="the target profile(s) the latency-shaped configurations are shaped for (comma-separated: each gets the budget)")
    parser.add_argument("--min-efficiency", type=float, default=0.85,
                        help="lapp-efficiency-blocks: the latency budget is --flops-target / this (measured speedup >= this x the FLOPs speedup)")
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--configs", default="dense,lapp,lapp-no-bypass", help="comma-separated subset of: " + ", ".join(CONFIGURATIONS))
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if unknown or not names:
        print(f"lapp_vs_dense: error: configs must come from {list(CONFIGURATIONS)}", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with CHILDREN.stop_on_signal():
        processes = {name: launch(name, args) for name in names}
        failed = [name for name, process in processes.items() if process is not None and process.wait() != 0]
    if failed:
        print(f"lapp_vs_dense: error: runs failed: {failed}; see their logs in {args.out}", file=sys.stderr)
        return 1
    rows = [row_from_report(n, json.loads((Path(args.out) / n / "report.json").read_text())) for n in names]
    dense = next((r for r in rows if r.name == "dense"), None)
    summary: dict[str, float | str] = {"schedule": f"{args.epochs} epochs ({args.prune_epochs} pruning), "
                                       f"{args.train_subset or 60000} training images, {args.threads} thread(s) per run"}
    reports = {n: json.loads((Path(args.out) / n / "report.json").read_text()) for n in names}
    for r in rows:
        if r.name == "dense" or dense is None:
            continue
        summary[f"{r.name}: accuracy drop vs dense (points)"] = 100 * (dense.test_top1 - r.test_top1)
        for phase in ("pruning", "slim"):
            ratio = paired_epoch_ratio(reports[r.name]["epochs"], reports["dense"]["epochs"], phase)
            if ratio is not None:
                summary[f"{r.name}: {phase} epoch / dense epoch (cpu, paired)"] = ratio
    result = {"settings": vars(args), "rows": [asdict(r) for r in rows], "summary": summary}
    atomic_write_json(Path(args.out) / "results.json", result)
    table = format_table(rows, summary)
    atomic_write_text(Path(args.out) / "results.txt", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
