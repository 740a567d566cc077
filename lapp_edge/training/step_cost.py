"""Training step cost of several trainers, measured against each other in one process.

A shared 2-core machine makes epoch times of separate processes scatter: the same widths trained
twice, each beside another run, took 10.5 and 9.0 CPU seconds an epoch (docs/RESULTS.md, the
30-epoch peer table). So costs are measured interleaved: blocks of one epoch per trainer, the
trainers in a rotated order every block, per-step CPU time of this process (`process_time`,
what `EpochRecord.cpu_seconds` holds) and wall time kept per block; the figure is the median
over blocks. Used by `benchmarks/training_cost.py` and `benchmarks/bypass_modes.py`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lapp_edge.training.trainer import Trainer


@dataclass
class StepCost:
    """One trainer's cost per training step (milliseconds; medians over blocks, each block one epoch)."""

    cpu_ms_per_step: float
    wall_ms_per_step: float
    cpu_blocks: list[float]          # per block, in the order measured


def interleaved_step_costs(trainers: dict[str, Trainer], blocks: int) -> dict[str, StepCost]:
    """Train one epoch of every trainer per block, the order rotated by one each block (so no trainer
    always follows the same one), `blocks` times; per trainer, the median per-step CPU and wall time.
    Each trainer's state advances (its epoch counter does not: callers time, they do not train to an end).
    Raises ValueError for no trainers or blocks < 1."""
    if not trainers or blocks < 1:
        raise ValueError("interleaved_step_costs needs at least one trainer and one block")
    names = list(trainers)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    for block in range(blocks):
        shift = block % len(names)
        for name in names[shift:] + names[:shift]:
            trainer = trainers[name]
            record = trainer.train_epoch()
            cpu[name].append(record.cpu_seconds / trainer.steps_per_epoch * 1e3)
            wall[name].append(record.seconds / trainer.steps_per_epoch * 1e3)
    return {name: StepCost(statistics.median(cpu[name]), statistics.median(wall[name]), cpu[name]) for name in names}
