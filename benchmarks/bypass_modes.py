"""Training step time per bypass mode (branch, reparam, none), interleaved in one process.

A shared CPU makes absolute epoch times scatter, so the modes are timed against each other:
one Trainer per mode on the same images, then blocks of one epoch each (over --images images),
the modes in a rotated order each block; the per-step CPU time (process_time, this process
only) and wall time of every block are kept and the median over blocks is reported, with each
mode's ratio to "branch". Done for the pruning phase, then for the slim phase (every mode slimmed
to the same widths: the branch trainer's freeze plan).

    PYTHONPATH=. .venv/bin/python benchmarks/bypass_modes.py [--model resnet20] [--images 1024]
        [--batch-size 128] [--blocks 6] [--threads 1] [--out bench-results/bypass_modes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = {"branch": {"bypass_mode": "branch"}, "reparam": {"bypass_mode": "reparam"}, "none": {"bypass": False}}


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]] if Path("/proc/loadavg").exists() else []


def time_blocks(trainers: dict[str, Any], blocks: int) -> dict[str, dict[str, float]]:
    """Per-step cost of every mode, interleaved (`training.step_cost`), with its ratio to "branch"."""
    from lapp_edge.training.step_cost import interleaved_step_costs

    costs = interleaved_step_costs(trainers, blocks)
    branch = costs["branch"]
    return {name: {"cpu_ms_per_step": c.cpu_ms_per_step, "wall_ms_per_step": c.wall_ms_per_step,
                   "cpu_ratio_to_branch": c.cpu_ms_per_step / branch.cpu_ms_per_step,
                   "wall_ratio_to_branch": c.wall_ms_per_step / branch.wall_ms_per_step, "cpu_blocks": c.cpu_blocks}
            for name, c in costs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from lapp_edge.data.torch_data import load_dataset
    from lapp_edge.lapp.freeze import freeze
    from lapp_edge.training.config import TrainConfig
    from lapp_edge.training.task import DenseTask
    from lapp_edge.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist")
    load_before = load_average()
    with tempfile.TemporaryDirectory() as scratch:
        trainers = {
            name: Trainer(TrainConfig(out=os.path.join(scratch, name), model=args.model, epochs=100, prune_epochs=50,
                                      batch_size=args.batch_size, train_subset=args.images, threads=args.threads,
                                      progress=False, bn_recalibration_batches=2, **overrides), data)
            for name, overrides in MODES.items()
        }
        for trainer in trainers.values():        # warm-up (allocator, first mask initialisation)
            trainer.train_epoch()
        pruning = time_blocks(trainers, args.blocks)
        # the same widths for every mode (the branch trainer's plan), so the slim phase compares like with like
        plan = trainers["branch"].controller.plan_freeze()
        for trainer in trainers.values():
            freeze(trainer.controller, trainer.optimizer, plan)
            trainer.task, trainer.state.phase, trainer.state.widths = DenseTask(), "slim", dict(plan.widths)
            trainer.train_epoch()
        slim = time_blocks(trainers, args.blocks)
        widths = {name: trainer.state.widths for name, trainer in trainers.items()}
    result = {"command": " ".join(sys.argv), "model": args.model, "images": args.images, "batch_size": args.batch_size,
              "threads": args.threads, "blocks": args.blocks, "torch": torch.__version__, "cpu_count": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": load_average(),
              "pruning": pruning, "slim": slim, "slim_widths": widths, "date": time.strftime("%Y-%m-%d %H:%M")}
    for phase in ("pruning", "slim"):
        print(f"{phase}: " + ", ".join(f"{n} {v['cpu_ms_per_step']:.1f} ms/step CPU (x{v['cpu_ratio_to_branch']:.2f}), "
                                       f"{v['wall_ms_per_step']:.1f} wall (x{v['wall_ratio_to_branch']:.2f})"
                                       for n, v in result[phase].items()))
    print(f"load average before {load_before}, after {result['load_average_after']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
