"""LAPP's training cost against dense's, per phase, measured side by side in one process.

Issue 12's time goal (LAPP's whole training <= 0.7 of the dense run's) compares runs that trained
in separate processes; on a shared 2-core machine a run's epoch time moves by 15% with what runs
beside it (docs/RESULTS.md), more than the differences asked about. This benchmark measures the
cost instead, interleaved (`training.step_cost.interleaved_step_costs`), for finished LAPP runs:

- dense: the runs' model trained dense (no bypass, full width);
- per run, its pruning phase: a fresh LAPP trainer with the run's settings (full width, masks,
  bypass as the run had it), whose per-step cost does not depend on how far pruning has got;
- per run, its slim phase: the run's learned widths (report.json `layers`), with the bypass where
  the run kept it and without where it was merged at freeze (`--merge-bypass-at-freeze`).

Each trainer trains --images seeded images per block, one thread; the figure per trainer is the
median per-step CPU time over --blocks blocks. The run's whole training, in dense epochs, is then

    (prune_epochs x pruning step + (epochs - prune_epochs) x slim step) / (epochs x dense step)

with the freeze's own CPU time (report.json `freeze_seconds`, about 1% of a run) left out. Next to it
the runs' own figure, from their epoch records, against the --dense-run of the same seed (the runs
of a peer benchmark, trained in separate processes). JSON to --out and a table on stdout.

    .venv/bin/python benchmarks/training_cost.py --runs bench-results/compare-30ep-quiet/runs/lapp/t0.5/s0 \\
        --runs bench-results/compare-30ep-quiet/runs/lapp-merge-bypass/t0.5/s0 \\
        --dense-run bench-results/compare-30ep-quiet/runs/dense/s0 --out bench-results/training_cost.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lapp_edge.fileio import atomic_write_json  # noqa: E402

# settings of a run that the timing trainers replace (where they write, how long, how much data, output, and the
# device: this benchmark measures CPU time per step, so a run trained on a GPU is timed on the CPU like any other)
REPLACED = ("out", "epochs", "prune_epochs", "train_subset", "threads", "progress", "bn_recalibration_batches", "resume",
            "device")


@dataclass
class RunCost:
    """One LAPP run's training cost in dense steps (CPU time per step, ratios to the dense step)."""

    run: str
    epochs: int
    prune_epochs: int
    bypass_merged: bool
    pruning_step_ratio: float
    slim_step_ratio: float
    whole_training_ratio: float             # the formula in the module docstring
    recorded_ratio: float | None            # the run's epoch records over the dense run's (separate processes)


def read_report(run: Path) -> dict[str, Any]:
    path = run / "report.json"
    if not path.is_file():
        raise SystemExit(f"training_cost: error: {run} has no report.json (not a finished run)")
    return json.loads(path.read_text())


def recorded_cpu_seconds(report: dict[str, Any]) -> float:
    return sum(epoch["cpu_seconds"] for epoch in report["epochs"])


def trainer_for(settings: dict[str, Any], out: Path, images: int, threads: int, data: Any) -> Any:
    from lapp_edge.training.config import TrainConfig
    from lapp_edge.training.trainer import Trainer

    kept = {key: value for key, value in settings.items() if key not in REPLACED}
    config = TrainConfig(out=str(out), epochs=100, prune_epochs=50, train_subset=images, threads=threads, progress=False,
                         bn_recalibration_batches=2, device="cpu", **kept)
    return Trainer(config, data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", action="append", required=True, help="a finished LAPP run directory (repeat)")
    parser.add_argument("--dense-run", action="append", default=[],
                        help="a dense run they were compared with (repeat; paired by seed, for the recorded ratio)")
    parser.add_argument("--images", type=int, default=1280, help="training images per block (default 1280: 10 steps of 128)")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench-results/training_cost.json")
    args = parser.parse_args()

    import torch

    from lapp_edge.data.torch_data import load_dataset
    from lapp_edge.deploy.measure import cpu_model, machine_key
    from lapp_edge.training.config import LAPP_ONLY
    from lapp_edge.training.step_cost import interleaved_step_costs

    runs = [Path(run) for run in args.runs]
    reports = {run: read_report(run) for run in runs}
    if any(report["mode"] != "lapp" for report in reports.values()):
        raise SystemExit("training_cost: error: --runs takes LAPP runs (report mode 'lapp'); name the dense one with --dense-run")
    first = reports[runs[0]]["config"]
    torch.set_num_threads(args.threads)
    data = load_dataset(first["dataset"], first.get("data_dir"))
    trainers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        dense_settings = {k: v for k, v in first.items() if k not in LAPP_ONLY and k not in ("bypass", "coupled_groups")}
        trainers["dense"] = trainer_for({**dense_settings, "dense": True}, Path(scratch) / "dense", args.images, args.threads, data)
        for index, (run, report) in enumerate(reports.items()):
            settings = report["config"]
            trainers[f"{index}:pruning"] = trainer_for(settings, Path(scratch) / f"{index}-pruning", args.images, args.threads, data)
            merged = bool(report.get("bypass_merged_at_freeze"))
            slim = trainer_for({**settings, "bypass": settings["bypass"] and not merged, "merge_bypass_at_freeze": False},
                               Path(scratch) / f"{index}-slim", args.images, args.threads, data)
            slim.start_slim({layer["name"]: layer["kept"] for layer in report["layers"]})
            trainers[f"{index}:slim"] = slim
        for trainer in trainers.values():       # warm-up: allocator, first mask initialisation, kernels
            trainer.train_epoch()
        print(f"training_cost: {len(trainers)} trainers, {args.blocks} blocks of {args.images} images each", flush=True)
        costs = interleaved_step_costs(trainers, args.blocks)

    dense_step = costs["dense"].cpu_ms_per_step
    dense_reports = [read_report(Path(run)) for run in args.dense_run]
    dense_recorded = {int(r["config"]["seed"]): recorded_cpu_seconds(r) for r in dense_reports}
    results = []
    for index, (run, report) in enumerate(reports.items()):
        epochs, prune_epochs = int(report["config"]["epochs"]), int(report["config"]["prune_epochs"])
        pruning = costs[f"{index}:pruning"].cpu_ms_per_step / dense_step
        slim = costs[f"{index}:slim"].cpu_ms_per_step / dense_step
        whole = (prune_epochs * pruning + (epochs - prune_epochs) * slim) / epochs
        dense_seconds = dense_recorded.get(int(report["config"]["seed"]))
        recorded = recorded_cpu_seconds(report) / dense_seconds if dense_seconds else None
        results.append(RunCost(str(run), epochs, prune_epochs, bool(report.get("bypass_merged_at_freeze")), pruning, slim,
                               whole, recorded))
    payload = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "cpu": cpu_model(), "machine": machine_key(),
               "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
               "load_average": os.getloadavg(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "images": args.images, "blocks": args.blocks, "threads": args.threads,
               "step_costs": {name: asdict(cost) for name, cost in costs.items()}, "runs": [asdict(r) for r in results]}
    atomic_write_json(Path(args.out), payload)
    print(f"dense step: {dense_step:.1f} ms CPU (median of {args.blocks} blocks); {cpu_model()}, load average {os.getloadavg()[0]:.2f}")
    print("| run | epochs (pruning) | bypass merged | pruning step / dense | slim step / dense | whole training / dense | recorded (separate processes) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        recorded = "-" if r.recorded_ratio is None else f"{r.recorded_ratio:.2f}"
        print(f"| {r.run} | {r.epochs} ({r.prune_epochs}) | {'yes' if r.bypass_merged else 'no'} | {r.pruning_step_ratio:.2f} "
              f"| {r.slim_step_ratio:.2f} | **{r.whole_training_ratio:.2f}** | {recorded} |")
    print(f"training_cost: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
