"""What a run shaped for target profiles constrains: the channel multiple, and the latency cost.

`lapp-edge train --target PROFILE [--target ...] --latency-target R | --latency-budget-ms X`:
each target's layer latency table (`costs.latency_table`, measured on this machine by
`lapp-edge profile-layers`) becomes a `LatencyCost` at `--latency-batch`; one target constrains
its latency ratio to R (or X / the table's dense latency), several are combined by
`TightestBudgetCost` (the tightest budget binds). `--max-flops F` adds the FLOPs cost as one more
member of that combination with budget F: FLOPs and latency are both kept within their budgets, so a
user can ask for a FLOPs target and a floor on how much of the FLOPs cut becomes measured speed at once
(--max-flops 0.4 --latency-target 0.5: at least 0.8 of it). The tightest budget binds, so the FLOPs may
end below F; `--land-on-flops` lands them on F with each latency as a ceiling
(`lapp.latency_cost.FlopsUnderLatencyCeilings`): LAPP's target is then F. Widths round to the targets' channel multiple
(`deploy.targets.channel_multiple_for`; the least common multiple for several targets).

Which tables are accepted (the issue asked to say which and why):
- another target, model, input shape or CPU (machine key: model name + kernel-picking ISA flags):
  refused in one line. Latency on another CPU follows other kernels (AVX2 vs AVX-512 vs AMX blocks:
  DEPLOY_NOTES measured steps at different widths), so such a table would steer widths wrongly.
- another runtime version: used, with a printed warning. Patch releases rarely change the conv
  kernels, re-profiling takes minutes, and `bench` shows the table's prediction next to the
  measured latency, so drift is visible where it matters.
- with --block-removal, a table whose fit never saw a network that removes a branch: used, with a
  printed warning (its predictions for such networks are extrapolations; the freeze measures plans).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lapp_edge.costs.latency_table import LatencyTable, find_table_file, load_table
from lapp_edge.deploy.targets import TargetProfile, channel_multiple_for, load_target, runtime_version, target_machine_key
from lapp_edge.errors import UserError
from lapp_edge.lapp.cost import CostModel
from lapp_edge.lapp.flops import build_flops_cost, deployed_layers
from lapp_edge.lapp.latency_cost import LatencyCost, combined_cost
from lapp_edge.models.units import PrunableSite
from lapp_edge.training.config import DEFAULT_CHANNEL_MULTIPLE, TrainConfig, split_values


@dataclass
class LatencyConstraint:
    """The latency cost a run trains against and what it was built from (recorded in the report)."""

    cost: CostModel
    per_target: list[LatencyCost]           # one cost per target, in --target order
    target_ratio: float                     # LAPP's cost target (the tightest budget as a ratio of dense latency)
    batch: int
    shaped_for: list[dict[str, Any]] = field(default_factory=list)   # per target: table, budget, dense ms
    warnings: list[str] = field(default_factory=list)
    flops_bound: tuple[CostModel, float] | None = None   # --max-flops: the FLOPs cost and its budget ratio, else None
    land_on_flops: bool = False             # --land-on-flops: FLOPs landed on flops_bound, latencies are ceilings


def resolve_channel_multiple(config: TrainConfig) -> int:
    """--channel-multiple, or (0) the targets' multiple on this CPU (their LCM), or 8 without a target."""
    if config.channel_multiple:
        return config.channel_multiple
    targets = split_values(config.target)
    if not targets:
        return DEFAULT_CHANNEL_MULTIPLE
    return math.lcm(*(channel_multiple_for(load_target(name)) for name in targets))


def find_table(profile: TargetProfile, model: str, input_shape: tuple[int, int, int], explicit: str = "") -> Path:
    """The layer table for (target, model, input shape, this machine): `explicit`, else looked up in
    ./latency-data and the shipped latency data. UserError naming the command that makes one."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise UserError(f"latency table {explicit} does not exist")
        return path
    machine = target_machine_key(profile.backend)
    found = find_table_file(profile.name, model, input_shape, machine)
    if found is None:
        raise UserError(f"no layer latency table for {profile.name} / {model} / {'x'.join(map(str, input_shape))} on this "
                        f"machine ({machine}): measure one with lapp-edge profile-layers --target {profile.argument} "
                        f"--model {model} --input {'x'.join(map(str, input_shape))}")
    return found


def targets_without_table(config: TrainConfig, input_shape: tuple[int, int, int]) -> list[str]:
    """The budget's --target names (as given) for which neither ./latency-data nor the shipped latency data
    holds a layer table for this model, input shape and machine; none where --latency-table names the files."""
    if split_values(config.latency_table):
        return []
    return [name for name in split_values(config.target)
            if find_table_file((p := load_target(name)).name, config.model, input_shape, target_machine_key(p.backend)) is None]


def fitted_on_removed_branches(table: LatencyTable, batch: int) -> bool | None:
    """Whether any whole network the table's fit was checked on removes a residual branch (a site at 0
    channels: `profile-layers --block-removal`); None where the table stores no such networks."""
    configurations = table.batch(batch).validation.get("configurations")
    widths = [c.get("widths") for c in configurations if isinstance(c, dict)] if isinstance(configurations, list) else []
    widths = [w for w in widths if isinstance(w, list)]
    if not widths:
        return None
    return any(0 in w for w in widths)


def check_table(table: LatencyTable, path: Path, profile: TargetProfile, model: str,
                input_shape: tuple[int, int, int], batch: int, block_removal: bool = False) -> list[str]:
    """Refuse (UserError) a table for another target, model, input or CPU; return warnings for
    another runtime version (module docstring says why) and, with `block_removal`, for a table whose
    fit never saw a network that removes a branch: its predictions for such networks are extrapolations
    (measured on the AMX Xeon: the ORT fp32 table fitted without them under-predicted such networks by a
    median 10.7%; docs/RESULTS.md, "Block removal in the table's networks")."""
    where = path.name
    if table.target != profile.name:
        raise UserError(f"{where} is a table for target {table.target}, not {profile.name}")
    if table.model != model or list(table.input_shape) != list(input_shape):
        raise UserError(f"{where} is for {table.model} at {'x'.join(map(str, table.input_shape))}; this run trains "
                        f"{model} at {'x'.join(map(str, input_shape))}")
    if table.machine != (here := target_machine_key(profile.backend)):
        raise UserError(f"{where} was measured on {table.machine}; this machine is {here}: latency does not "
                        f"transfer between CPUs, run lapp-edge profile-layers --target {profile.argument} --model {model} here")
    if batch not in table.batches:
        raise UserError(f"{where} holds batches {sorted(table.batches)}, not --latency-batch {batch}")
    warnings = []
    here = runtime_version(profile.backend)
    if table.runtime != here:
        warnings.append(f"warning: {where} was measured with {table.runtime}, this machine has {here}: its predictions may be "
                        "off (bench shows predicted next to measured; re-run profile-layers to refresh it)")
    removed = fitted_on_removed_branches(table, batch) if block_removal else True
    if not removed:
        fitted_on = ("was fitted on networks that keep every residual branch" if removed is False
                     else "records no networks its fit was checked on")
        warnings.append(f"warning: {where} {fitted_on}: with --block-removal its predictions for networks that remove "
                        "branches are extrapolations (the freeze measures its plan unless --no-measure-at-freeze; "
                        f"lapp-edge profile-layers --target {profile.argument} --model {model} --block-removal fits on such networks)")
    return warnings


def latency_constraint(config: TrainConfig, model: nn.Module, sites: list[PrunableSite],
                       input_shape: tuple[int, int, int], flops_cost: CostModel | None = None) -> LatencyConstraint:
    """The cost LAPP trains against for a latency-constrained run (see the module docstring);
    `flops_cost`: the run's FLOPs cost, bounded by --max-flops where given (built here when None).
    Raises UserError for a missing or mismatched table, a layer the table lacks, or a budget above
    the dense latency or below what the table can reach (checked by the trainer)."""
    targets = [load_target(name) for name in split_values(config.target)]
    tables = split_values(config.latency_table) or [""] * len(targets)
    values = [float(v) for v in split_values(config.latency_target or config.latency_budget_ms)]
    values = values * len(targets) if len(values) == 1 else values
    layers = deployed_layers(model, sites, input_shape)
    channels = [site.channels for site in sites]
    costs, budgets, shaped_for, warnings = [], [], [], []
    for profile, explicit, value in zip(targets, tables, values):
        batch = config.latency_batch or max(profile.batch_sizes)
        path = find_table(profile, config.model, input_shape, explicit)
        table = load_table(path)
        warnings += check_table(table, path, profile, config.model, input_shape, batch, config.block_removal)
        cost = LatencyCost(layers, channels, table.batch(batch), profile.name)
        dense_ms = cost.dense_cost
        budget = value if config.latency_target else value / dense_ms
        if budget > 1.0:
            raise UserError(f"--latency-budget-ms {value:g} on {profile.name} is above the dense network's predicted "
                            f"{dense_ms:.3f} ms at batch {batch}: there is nothing to prune for")
        costs.append(cost)
        budgets.append(budget)
        validation = table.batch(batch).validation.get("table_fit", {})
        shaped_for.append({"target": profile.name, "table": str(path), "batch": batch, "budget_ratio": budget,
                           "budget_ms": budget * dense_ms, "dense_predicted_ms": dense_ms, "runtime": table.runtime,
                           "machine": table.machine, "table_held_out_median_abs_pct": validation.get("median_abs_pct")})
    batches = {entry["batch"] for entry in shaped_for}
    flops_bound = None
    if config.max_flops:
        flops_bound = (flops_cost or build_flops_cost(model, sites, input_shape), config.max_flops)
    cost = combined_cost(costs, budgets, flops_bound, config.land_on_flops)
    target_ratio = config.max_flops if config.land_on_flops else min(budgets + ([flops_bound[1]] if flops_bound else []))
    for line in warnings:
        print(line, file=sys.stderr)
    return LatencyConstraint(cost, costs, target_ratio, min(batches), shaped_for, warnings, flops_bound, config.land_on_flops)


def predicted_ratios(constraint: LatencyConstraint, counts: Any) -> dict[str, float]:
    """Per target: the latency ratio its table predicts for kept counts `counts`."""
    return {cost.target: float(cost.ratio(counts)) for cost in constraint.per_target}
