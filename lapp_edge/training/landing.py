"""Landing on the measured latency at freeze: measure the planned slim network on each target, and
where it misses its budget, plan again against the layer table scaled at that point.

Why: a layer table fitted to random width draws under-predicts the networks LAPP converges to.
Measured on the AVX2 box (ONNX Runtime fp32, ResNet-20, batch 32, docs/RESULTS.md): trained networks
landed +0.5% to +6.6% over their budget, with the shipped table and with a table re-measured on 48
networks drawn to cover LAPP's allocations alike (the optimiser's curse: LAPP goes where the fit's
error is in its favour). Near such a plan the table's marginal costs are right (one group changed at
a time: RMS error 0.010 of the dense latency); its level is what is off. So:

1. the freeze's plan (`LappController.plan_freeze`) is built as a fused network with random weights
   (latency does not depend on them: trained and random networks of the same widths measured 0.505 /
   0.506 and 0.523 / 0.520) and measured on each target as `bench` measures a package: interleaved
   with the dense network, median over fresh compiles (`Measure`, supplied by the caller: the
   training side imports no runtime);
2. where the measured ratio lies more than `aim` from the budget (for several targets: the tightest
   share max_t measured_t / budget_t from 1; with --max-flops the plan's exact FLOPs share counts as
   one more, so a plan on its FLOPs bound and within its latency budgets ends the search), each
   target's table cost is scaled (`ScaledCost`) so that it plans for the table ratio expected to
   measure on budget (`next_table_target`: measured / predicted at the first plan, then the secant
   through measured plans) and the width search runs again from the learned widths;
3. at most `rounds` plans (`LANDING_ROUNDS`, 4) are measured; the one whose measured share lies closest to 1 is
   applied. With three, one high first reading (ORT, +17% over the table, the next plans +3-4%) steered the
   last plan to 0.938 of the budget; a fourth plan has two honest readings behind it.

With --land-on-flops each latency budget is a ceiling, and the aim is one-sided: a plan ends the search
only where every measured ratio is at or under its ceiling, a re-plan aims `CEILING_MARGIN` under it,
and the plan applied is one under every ceiling where one was measured (else the lowest). Why: with
the two-sided aim a plan measured at 1.016 of its ceiling ended the search, and a package trained for
0.8 of its FLOPs cut as speed measured 0.799 (docs/RESULTS.md, "Block removal in the table's networks").

NetAdapt (Yang et al., ECCV 2018) measures candidate networks on the device in its loop for the
same reason; here only the freeze's plans are measured, a few, after training has shaped the network.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np

from lapp_edge.lapp.controller import FreezeResult, LappController
from lapp_edge.lapp.cost import CostModel
from lapp_edge.lapp.latency_cost import LatencyCost, combined_cost
from lapp_edge.models.spec import ArchitectureSpec

LANDING_AIM = 0.02       # measured share within +-2% of the budget ends the search (a ratio's spread over compiles is ~1-2%)
SECANT_SLOPES = (0.25, 4.0)  # measured change per table change trusted for the secant (else: scale the nearest plan)
LANDING_ROUNDS = 4       # plans measured at most (each: a few seconds per compile per target at batch 32; why 4: above)
CEILING_MARGIN = 0.01    # --land-on-flops: a re-plan aims this far under each ceiling (a compile moves a ratio by ~1%)
# The first plan measured this far (relative) from its table's prediction: the table no longer describes this machine.
# Where tables held, LAPP's plans measured -4% to +8% off them (AVX2 and AVX-512 EPYCs, AMX Xeon; docs/RESULTS.md); on
# the AVX-512 EPYC without AVX-VNNI two days after its ORT table was measured, +12% to +23% (the same 24 networks
# re-measured: narrow ones up to 28% slower relative to dense at batch 32, batch 1 unchanged).
STALE_TABLE_SHARE = 0.10
LOADED_SHARE = 0.2       # others' share of the machine above which a warning says the measurement itself is suspect


@dataclass
class MeasuredRatio:
    """One network's latency / the dense network's on one target, as `bench` measures it."""

    ratio: float                     # median over fresh compiles
    per_compile: list[float]
    other_cpu_share: float           # others' share of the machine while measuring (the largest over compiles)
    flagged: bool                    # some compile stayed above the allowed load


# (the slim network's spec at the planned widths, target profile name, batch) -> its measured ratio.
Measure = Callable[[ArchitectureSpec, str, int], MeasuredRatio]


@dataclass
class LandingRound:
    """One measured plan."""

    widths: dict[str, int]
    correction: dict[str, float]     # per target: the factor its table was scaled by for this plan (1: the table)
    predicted: dict[str, float]      # per target: the table's ratio (unscaled)
    measured: dict[str, float]       # per target: the measured ratio
    per_compile: dict[str, list[float]]
    other_cpu_share: dict[str, float]
    flagged: bool
    flops: float | None = None       # the plan's FLOPs ratio (exact), where --max-flops bounds it

    def share(self, budgets: dict[str, float], flops_budget: float | None = None) -> float:
        """The tightest budget's share (1: on budget), `budget_share` of this plan."""
        return budget_share(self.measured, budgets, self.flops, flops_budget)

    def under_ceilings(self, budgets: dict[str, float]) -> bool:
        """Every target's measured ratio is at or under its budget (the ceilings of --land-on-flops)."""
        return latency_share(self.measured, budgets) <= 1.0


def latency_share(measured: dict[str, float], budgets: dict[str, float]) -> float:
    """The tightest latency budget's share (1: on budget): the largest measured ratio over its budget."""
    return max(measured[target] / budget for target, budget in budgets.items())


def budget_share(measured: dict[str, float], budgets: dict[str, float], flops: float | None,
                 flops_budget: float | None) -> float:
    """The tightest budget's share (1: on budget): `latency_share`, and with `flops_budget` the plan's
    FLOPs ratio over it where that is larger."""
    share = latency_share(measured, budgets)
    if flops_budget and flops is not None:
        share = max(share, flops / flops_budget)
    return share


@dataclass
class Landing:
    """What was measured at freeze and which plan was applied (recorded in the run's state and report)."""

    budgets: dict[str, float]        # per target: the budget as a ratio of the dense latency
    batches: dict[str, int]
    aim: float
    rounds: list[LandingRound] = field(default_factory=list)
    chosen: int = 0                  # index into rounds of the applied plan
    seconds: float = 0.0
    note: str = ""                   # why fewer rounds were measured, or why none were
    flops_budget: float | None = None   # --max-flops, where given
    flops_landed: bool = False          # --land-on-flops: the FLOPs are landed on flops_budget, latencies are ceilings
    warnings: list[str] = field(default_factory=list)   # a table the first measurement says is stale (`stale_tables`)

    def lines(self) -> list[str]:
        return landing_lines(asdict(self))


def landing_lines(landing: dict[str, Any]) -> list[str]:
    """A `Landing` (as recorded: a dict) as text: one line per measured plan, marking the applied one."""
    budgets = landing["budgets"]
    out = []
    for index, item in enumerate(landing["rounds"]):
        parts = [f"{t} {item['measured'][t]:.4f} (table {item['predicted'][t]:.4f}"
                 + (f", scaled x{item['correction'][t]:.3f}" if item["correction"][t] != 1.0 else "") + ")" for t in budgets]
        flops_budget, flops = landing.get("flops_budget"), item.get("flops")
        share = budget_share(item["measured"], budgets, flops, flops_budget)
        if flops_budget and flops is not None:
            parts.append(f"FLOPs {flops:.4f} ({'target' if landing.get('flops_landed') else 'at most'} {flops_budget})")
        mark = "applied" if index == landing["chosen"] else "       "
        if landing.get("flops_landed"):      # ceilings: the FLOPs share is ~1 by construction, the latency's is what counts
            share_text = f"{latency_share(item['measured'], budgets):.3f} of its latency ceiling"
        else:
            share_text = f"{share:.3f} of budget"
        out.append(f"freeze plan {index + 1} {mark}: measured {', '.join(parts)}; {share_text}"
                   + ("  (machine loaded)" if item["flagged"] else ""))
    if landing["note"]:
        out.append(f"freeze: {landing['note']}")
    out += [f"freeze: warning: {warning}" for warning in landing.get("warnings", [])]
    return out


def stale_tables(first: LandingRound, batches: dict[str, int], model: str) -> list[str]:
    """One line per target whose table predicted the first measured plan more than STALE_TABLE_SHARE off: the
    landing corrects this run, but every later run planned against that table starts as far off, and bench's
    predictions are off too. Says how to re-measure it, and where others loaded the machine while measuring, that
    the measurement itself is suspect (two runs side by side read 10% low on the AVX-512 EPYC; docs/RESULTS.md)."""
    warnings = []
    for target, predicted in first.predicted.items():
        measured = first.measured[target]
        off = measured / predicted - 1.0
        if abs(off) <= STALE_TABLE_SHARE:
            continue
        loaded = first.other_cpu_share.get(target, 0.0)
        warnings.append(
            f"{target}'s layer table predicted the first plan at {predicted:.3f} of dense latency, it measured {measured:.3f} "
            f"({100 * off:+.0f}%): the table no longer describes this machine at batch {batches[target]}; re-measure it "
            f"(lapp-edge profile-layers --target {target} --model {model})"
            + (f"; others used {loaded:.0%} of the machine while measuring: check on a quiet machine first"
               if loaded > LOADED_SHARE else ""))
    return warnings


class ScaledCost:
    """A target's latency cost times a factor (measured / predicted at a plan): the table, corrected at that point."""

    name = "latency"
    unit = "ms"

    def __init__(self, cost: LatencyCost, factor: float) -> None:
        self.inner, self.factor, self.target = cost, factor, cost.target
        self.site_channels = cost.site_channels
        self.dense_cost = cost.dense_cost

    def ratio(self, counts: Any) -> Any:
        return self.factor * self.inner.ratio(counts)

    def cost(self, counts: Any) -> Any:
        return self.dense_cost * self.ratio(counts)


def corrected_cost(costs: list[LatencyCost], budgets: dict[str, float], factors: dict[str, float],
                   flops_bound: tuple[CostModel, float] | None = None, land_on_flops: bool = False) -> CostModel:
    """The constraint's cost with each target's table scaled by its factor (several budgets, the FLOPs
    bound among them: the tightest binds; `land_on_flops`: the FLOPs landed under the scaled ceilings)."""
    scaled = [ScaledCost(cost, factors[cost.target]) for cost in costs]
    return combined_cost(scaled, [budgets[cost.target] for cost in costs], flops_bound, land_on_flops)


def next_table_target(points: list[tuple[float, float]], budget: float) -> float:
    """The table ratio to plan for next so that the measured ratio lands on `budget`, from the plans
    measured so far, `points` = [(table ratio, measured ratio)]. One point: scale it (measured /
    predicted is the table's error there). More: the secant through the two points nearest the
    budget from either side where they bracket it (else the last two), because one scaling can step
    over the budget where the table's error changes along the way (measured: seed 3 of the ORT
    benchmark went 0.524 -> 0.470 -> 0.522 by scaling alone, docs/RESULTS.md). Where the secant's slope
    (measured change per predicted change) lies outside [0.25, 4], the nearest point is scaled instead:
    two plans 0.017 apart in the table measured the same 0.519 once (a compile moves a ratio by ~1%),
    and that slope of 0.05 extrapolated to a table ratio of 0.11."""
    def scaled(point: tuple[float, float]) -> float:
        return point[0] * budget / point[1]

    if len(points) == 1:
        return scaled(points[0])
    below = [p for p in points if p[1] <= budget]
    above = [p for p in points if p[1] > budget]
    if below and above:
        a, b = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
    else:
        a, b = points[-2], points[-1]
    if b[0] == a[0] or not SECANT_SLOPES[0] <= (b[1] - a[1]) / (b[0] - a[0]) <= SECANT_SLOPES[1]:
        return scaled(min(points, key=lambda p: abs(p[1] - budget)))
    return a[0] + (budget - a[1]) * (b[0] - a[0]) / (b[1] - a[1])


def land_on_measured(controller: LappController, costs: list[LatencyCost], budgets: dict[str, float],
                     batches: dict[str, int], spec: ArchitectureSpec, measure: Measure,
                     aim: float = LANDING_AIM, rounds: int = LANDING_ROUNDS,
                     flops_bound: tuple[CostModel, float] | None = None,
                     land_on_flops: bool = False) -> tuple[FreezeResult | None, Landing]:
    """The freeze plan to apply and what was measured (module docstring). `costs`: one table cost per
    target; `budgets` / `batches`: per target name; `flops_bound`: the FLOPs cost and its budget ratio
    (--max-flops), kept in every re-plan; `land_on_flops`: the FLOPs are landed on that budget and each
    latency is a ceiling (a plan on its FLOPs target under every budget ends the search: its share is the
    FLOPs share, ~1); `spec`: the run's architecture (its widths are
    replaced by each plan's). Returns (None, landing) when the table's own plan misses the cost
    target (the freeze then refuses it as it always did). The controller's cost is restored on return.
    Errors of `measure` propagate (the caller decides whether a run goes on without a measurement)."""
    started = time.perf_counter()
    landing = Landing(dict(budgets), dict(batches), aim, flops_budget=flops_bound[1] if flops_bound else None,
                      flops_landed=land_on_flops)
    original = controller.cost
    factors = {target: 1.0 for target in budgets}
    aimed = {target: budget * (1.0 - CEILING_MARGIN) if land_on_flops else budget for target, budget in budgets.items()}
    plans: list[FreezeResult] = []
    try:
        for _ in range(max(1, rounds)):
            if any(f != 1.0 for f in factors.values()):
                controller.cost = corrected_cost(costs, budgets, factors, flops_bound, land_on_flops)
            plan = controller.plan_freeze()
            if abs(plan.cost_ratio - controller.config.target) > controller.config.tolerance:
                landing.note = ("the table scaled by the measurement cannot land on the budget with these channel multiples; "
                                f"{_applied_words(land_on_flops)} is applied") if plans else ""
                break
            if any(plan.widths == earlier.widths for earlier in plans):
                landing.note = f"the corrected table plans widths already measured; {_applied_words(land_on_flops)} is applied"
                break
            counts = np.array([plan.widths[site.name] for site in controller.sites], dtype=np.float64)
            predicted = {cost.target: float(cost.ratio(counts)) for cost in costs}
            slim_spec = replace(spec, widths=dict(plan.widths))
            measured = {target: measure(slim_spec, target, batches[target]) for target in budgets}
            plans.append(plan)
            landing.rounds.append(LandingRound(
                dict(plan.widths), dict(factors), predicted, {t: m.ratio for t, m in measured.items()},
                {t: list(m.per_compile) for t, m in measured.items()}, {t: m.other_cpu_share for t, m in measured.items()},
                any(m.flagged for m in measured.values()), float(flops_bound[0].ratio(counts)) if flops_bound else None))
            if _ends_search(landing.rounds[-1], landing):
                break
            factors = {target: budgets[target] / next_table_target(
                [(item.predicted[target], item.measured[target]) for item in landing.rounds], aimed[target])
                for target in budgets}
    finally:
        controller.cost = original
    landing.seconds = time.perf_counter() - started
    if not plans:
        return None, landing
    landing.warnings = stale_tables(landing.rounds[0], batches, spec.model)
    landing.chosen = min(range(len(landing.rounds)), key=lambda index: _preference(landing.rounds[index], landing))
    return plans[landing.chosen], landing


def _applied_words(land_on_flops: bool) -> str:
    return "the measured plan lowest against its ceilings" if land_on_flops else "the closest measured plan"


def _ends_search(item: LandingRound, landing: Landing) -> bool:
    """A measured plan good enough to apply: on budget within the aim; with --land-on-flops (latency
    ceilings, the plan already on its FLOPs target) under every ceiling."""
    if landing.flops_landed:
        return item.under_ceilings(landing.budgets)
    return abs(item.share(landing.budgets, landing.flops_budget) - 1.0) <= landing.aim


def _preference(item: LandingRound, landing: Landing) -> tuple[float, float]:
    """Sort key of the plan to apply (lowest first): the share closest to 1; with --land-on-flops a plan
    under every ceiling before any over one, then the FLOPs closest to the target among those under,
    the lowest latency share among those over."""
    share = item.share(landing.budgets, landing.flops_budget)
    if not landing.flops_landed:
        return (0.0, abs(share - 1.0))
    if item.under_ceilings(landing.budgets):
        flops_off = abs(item.flops / landing.flops_budget - 1.0) if item.flops is not None and landing.flops_budget else 0.0
        return (0.0, flops_off)
    return (1.0, latency_share(item.measured, landing.budgets))
