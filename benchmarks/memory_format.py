"""Training speed by memory format: channels_last (NHWC) vs contiguous (NCHW), per model family and phase.

For each model, dense (one epoch) and LAPP (one pruning epoch, then one slim epoch) are trained with
`lapp-edge train --memory-format contiguous` and `--memory-format channels_last`, one process at a time,
the two formats alternating (A B, then B A, ...) so that drift on the machine falls on both. Each epoch's
process CPU time comes from the run's report; the figure is the ratio channels_last / contiguous per
(model, phase), the median over the repeats (< 1: channels_last is faster). Others' share of the machine
during the benchmark is read from /proc/stat and recorded. Finished runs are reused on a re-run.

    python benchmarks/memory_format.py --out bench-results/memory-format
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lapp_edge.child_processes import ChildProcesses  # noqa: E402
from lapp_edge.deploy.measure import cpu_model, cpu_snapshot, other_cpu_share_since  # noqa: E402
from lapp_edge.fileio import atomic_write_json, atomic_write_text  # noqa: E402

CHILDREN = ChildProcesses("memory_format")   # the training process, stopped with this one

FORMATS = ("contiguous", "channels_last")
PHASES = {"dense": ("dense",), "lapp": ("pruning", "slim")}


@dataclass
class Row:
    """One (model, phase): epoch CPU seconds per format (median over repeats) and their paired ratio."""
    model: str
    phase: str
    contiguous_cpu_s: float
    channels_last_cpu_s: float
    ratio: float                 # median over repeats of channels_last / contiguous (paired within a repeat)
    ratios: list[float]


def run_train(out: Path, model: str, mode: str, memory_format: str, args: argparse.Namespace) -> dict:
    """Train one run (or reuse a finished one) and return its report. Raises RuntimeError if training fails."""
    report = out / "report.json"
    if report.is_file():
        return json.loads(report.read_text())
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "lapp_edge.cli", "train", "--out", str(out), "--model", model,
               "--train-subset", str(args.train_subset), "--test-subset", str(args.test_subset), "--seed", str(args.seed),
               "--threads", str(args.threads), "--device", "cpu", "--memory-format", memory_format, "--quiet"]
    command += ["--dense", "--epochs", "1"] if mode == "dense" else [
        "--epochs", "2", "--prune-epochs", "1", "--flops-target", str(args.flops_target)]
    done = CHILDREN.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {(done.stderr or done.stdout).strip()[-400:]}")
    return json.loads(report.read_text())


def measure(args: argparse.Namespace) -> tuple[list[Row], float]:
    """Every run of the grid; the rows and others' largest CPU share over the benchmark."""
    out = Path(args.out)
    cpu_s: dict[tuple[str, str, str, int], float] = {}
    models = [m for m in args.models.split(",") if m]
    total, done = len(models) * 2 * len(FORMATS) * args.repeats, 0
    began, snapshot = time.monotonic(), cpu_snapshot(with_children=True)     # the training runs are ours
    for model in models:
        for repeat in range(args.repeats):
            order = FORMATS if repeat % 2 == 0 else FORMATS[::-1]
            for mode in PHASES:
                for memory_format in order:
                    report = run_train(out / "runs" / model / f"{mode}-{memory_format}-r{repeat}", model, mode, memory_format, args)
                    for phase in PHASES[mode]:
                        cpu_s[(model, phase, memory_format, repeat)] = report["epoch_cpu_seconds_median"][phase]
                    done += 1
                    elapsed = time.monotonic() - began
                    print(f"[{done}/{total}] {model} {mode} {memory_format} repeat {repeat}: "
                          f"{elapsed:.0f} s, ETA {elapsed / done * (total - done):.0f} s", flush=True)
    rows = []
    for model in models:
        for phase in (p for phases in PHASES.values() for p in phases):
            ratios = [cpu_s[(model, phase, "channels_last", r)] / cpu_s[(model, phase, "contiguous", r)] for r in range(args.repeats)]
            rows.append(Row(model, phase,
                            statistics.median(cpu_s[(model, phase, "contiguous", r)] for r in range(args.repeats)),
                            statistics.median(cpu_s[(model, phase, "channels_last", r)] for r in range(args.repeats)),
                            statistics.median(ratios), ratios))
    return rows, other_cpu_share_since(snapshot)


def format_table(rows: list[Row]) -> str:
    lines = ["| model | phase | epoch CPU s, contiguous | epoch CPU s, channels_last | channels_last / contiguous (per repeat) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.phase} | {r.contiguous_cpu_s:.1f} | {r.channels_last_cpu_s:.1f} | "
                     f"**{r.ratio:.2f}** ({', '.join(f'{x:.2f}' for x in r.ratios)}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results/memory-format")
    parser.add_argument("--models", default="resnet20,mobilenetv2,resnet18,vgg16_bn", help="comma-separated registry names")
    parser.add_argument("--train-subset", type=int, default=1000, help="training images per epoch")
    parser.add_argument("--test-subset", type=int, default=500, help="test images (evaluation is not timed)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats per format (the order alternates)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flops-target", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1 or args.train_subset < 1 or args.test_subset < 1:
        print("memory_format: error: --repeats, --threads, --train-subset and --test-subset must be positive", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        with CHILDREN.stop_on_signal():
            rows, others = measure(args)
    except RuntimeError as error:
        print(f"memory_format: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    import torch

    machine = {"cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
               "threads": args.threads, "others_cpu_share_mean": round(others, 3)}
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    atomic_write_json(Path(args.out) / "results.json", {"machine": machine, "settings": settings,
                                                         "rows": [asdict(r) for r in rows]})
    table = format_table(rows)
    header = (f"Machine: {machine['cpu']}, torch {machine['torch']}, {args.threads} thread(s); others' CPU share "
              f"over the whole benchmark (mean): {machine['others_cpu_share_mean']}\n\n")
    atomic_write_text(Path(args.out) / "results.md", header + table + "\n")
    print(header + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
