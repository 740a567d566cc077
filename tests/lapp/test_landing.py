"""Landing on the measured latency at freeze (training/landing.py): the correction loop on a table
that under-predicts, several targets, and a real ONNX Runtime measurement inside a training run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lapp_edge.deploy.measure import RatioProtocol
from lapp_edge.lapp.controller import LappConfig, LappController
from lapp_edge.lapp.freeze import freeze
from lapp_edge.lapp.latency_cost import LatencyCost, TightestBudgetCost
from lapp_edge.models.spec import ArchitectureSpec
from lapp_edge.training.landing import LANDING_AIM, LANDING_ROUNDS, MeasuredRatio, land_on_measured, landing_lines, next_table_target
from tests.lapp.test_latency_cost import _write, resnet20, synthetic_table


def _costs(layers: list, sites: list, step: float, targets: tuple[str, ...] = ("x86-ort-fp32",)) -> list[LatencyCost]:
    channels = [s.channels for s in sites]
    return [LatencyCost(layers, channels, synthetic_table(layers, sites, target=t, step=step).batch(32), t) for t in targets]


def _spec(sites: list) -> ArchitectureSpec:
    dense = {s.name: s.channels for s in sites}
    return ArchitectureSpec("resnet20", 1, 10, 28, False, dict(dense), dense, coupled=True)


def _true_measure(truth: dict[str, LatencyCost], sites: list, calls: list) -> object:
    """The 'hardware': each target's latency follows another table (off-block widths cost more, and a
    fixed per-call cost the table misses), so the table under-predicts slim networks."""
    def measure(spec: ArchitectureSpec, target: str, batch: int) -> MeasuredRatio:
        counts = np.array([spec.widths[s.name] for s in sites], dtype=np.float64)
        ratio = 0.04 + 0.96 * float(truth[target].ratio(counts))
        calls.append((target, batch))
        return MeasuredRatio(ratio, [ratio], 0.0, False)
    return measure


def _controller(sites: list, cost: object, target: float) -> LappController:
    controller = LappController(sites, cost, LappConfig(target=target, channel_multiple=8, min_channels=8))  # type: ignore[arg-type]
    controller.update_masks(with_grad=False)       # thresholds start below every score: all channels kept
    return controller


def test_a_table_that_under_predicts_is_corrected_until_the_measured_latency_lands() -> None:
    model, sites, layers = resnet20()
    table = _costs(layers, sites, step=0.3)[0]
    truth = {"x86-ort-fp32": _costs(layers, sites, step=0.8)[0]}
    controller = _controller(sites, table, 0.5)
    plain = controller.plan_freeze()
    calls: list = []
    plan, landing = land_on_measured(controller, [table], {"x86-ort-fp32": 0.5}, {"x86-ort-fp32": 32}, _spec(sites),
                                     _true_measure(truth, sites, calls))  # type: ignore[arg-type]
    assert controller.cost is table                                   # restored
    first, last = landing.rounds[0], landing.rounds[landing.chosen]
    assert first.widths == plain.widths and first.correction == {"x86-ort-fp32": 1.0}
    assert first.share(landing.budgets) > 1 + LANDING_AIM             # the table's plan misses: measured over budget
    assert abs(last.share(landing.budgets) - 1) < abs(first.share(landing.budgets) - 1)
    assert abs(last.share(landing.budgets) - 1) <= 0.03
    second = landing.rounds[1]                                        # the first re-plan scales the table by measured / predicted
    assert second.correction["x86-ort-fp32"] == pytest.approx(first.measured["x86-ort-fp32"] / first.predicted["x86-ort-fp32"])
    assert len(calls) == len(landing.rounds) <= 3 and all(batch == 32 for _, batch in calls)
    assert plan is not None and plan.widths == last.widths
    freeze(controller, None, plan)                                    # the scaled plan passes the freeze's own check
    lines = landing_lines(__import__("dataclasses").asdict(landing))
    assert len(lines) == len(landing.rounds) + len(landing.warnings) and "applied" in lines[landing.chosen]


def test_a_plan_already_on_budget_is_measured_once() -> None:
    _, sites, layers = resnet20()
    table = _costs(layers, sites, step=0.3)[0]
    controller = _controller(sites, table, 0.5)
    calls: list = []
    plan, landing = land_on_measured(controller, [table], {"x86-ort-fp32": 0.5}, {"x86-ort-fp32": 32}, _spec(sites),
                                     _true_measure({"x86-ort-fp32": table}, sites, calls))  # type: ignore[arg-type]
    # truth = 0.04 + 0.96 * table: at 0.5 that is 0.52, 4% over; at the first corrected plan close enough
    assert len(landing.rounds) >= 2
    calls.clear()
    exact = lambda spec, target, batch: MeasuredRatio(float(table.ratio(np.array([spec.widths[s.name] for s in sites], float))),
                                                      [0.5], 0.0, False)
    plan, landing = land_on_measured(controller, [table], {"x86-ort-fp32": 0.5}, {"x86-ort-fp32": 32}, _spec(sites), exact)
    assert len(landing.rounds) == 1 and landing.chosen == 0 and plan is not None


def test_with_two_targets_each_table_is_scaled_by_its_own_measurement_and_the_tightest_binds() -> None:
    _, sites, layers = resnet20()
    targets = ("x86-ort-fp32", "x86-openvino-f32")
    tables = _costs(layers, sites, step=0.3, targets=targets)
    truth = dict(zip(targets, _costs(layers, sites, step=0.8, targets=targets)))
    budgets = {"x86-ort-fp32": 0.6, "x86-openvino-f32": 0.5}
    controller = _controller(sites, TightestBudgetCost(tables, [0.6, 0.5]), 0.5)
    calls: list = []
    plan, landing = land_on_measured(controller, tables, budgets, {t: 32 for t in targets}, _spec(sites),
                                     _true_measure(truth, sites, calls))  # type: ignore[arg-type]
    assert {t for t, _ in calls} == set(targets)
    chosen = landing.rounds[landing.chosen]
    assert abs(chosen.share(budgets) - 1) < abs(landing.rounds[0].share(budgets) - 1)
    assert chosen.measured["x86-ort-fp32"] / 0.6 <= chosen.share(budgets) + 1e-12
    if len(landing.rounds) > 1:
        first, second = landing.rounds[:2]
        assert second.correction == {t: pytest.approx(first.measured[t] / first.predicted[t]) for t in targets}


@pytest.mark.parametrize("latency_budget,binds", [(0.75, "flops"), (0.45, "latency")])
def test_with_max_flops_every_plan_keeps_the_flops_bound_and_the_tighter_budget_ends_the_search(latency_budget: float, binds: str) -> None:
    """--max-flops: the FLOPs cost is one more budget of the landing. Where FLOPs binds (a loose latency
    budget), the table's plan sits on its FLOPs bound with the latency measured under budget: one plan,
    applied. Where latency binds, the re-plans scaled for the measurement keep the FLOPs within bound."""
    from lapp_edge.lapp.flops import build_flops_cost
    from tests.lapp.test_latency_cost import SHAPE

    model, sites, layers = resnet20()
    table = _costs(layers, sites, step=0.3)[0]
    truth = {"x86-ort-fp32": _costs(layers, sites, step=0.8)[0]}
    flops = (build_flops_cost(model, sites, SHAPE), 0.4)
    budgets = {"x86-ort-fp32": latency_budget}
    controller = _controller(sites, TightestBudgetCost([table, flops[0]], [latency_budget, 0.4]), min(latency_budget, 0.4))
    calls: list = []
    plan, landing = land_on_measured(controller, [table], budgets, {"x86-ort-fp32": 32}, _spec(sites),
                                     _true_measure(truth, sites, calls), flops_bound=flops)  # type: ignore[arg-type]
    assert plan is not None and landing.flops_budget == 0.4
    for item in landing.rounds:                       # every plan, re-plans included, within the FLOPs bound
        assert item.flops is not None and item.flops <= 0.4 + controller.config.tolerance
    chosen = landing.rounds[landing.chosen]
    if binds == "flops":
        assert len(landing.rounds) == 1 and chosen.flops == pytest.approx(0.4, abs=0.01)
        assert chosen.measured["x86-ort-fp32"] < latency_budget
        assert chosen.share(budgets, 0.4) == pytest.approx(chosen.flops / 0.4)
    else:
        assert chosen.flops < 0.4 - 0.01 and abs(chosen.measured["x86-ort-fp32"] / latency_budget - 1) <= 0.03
        assert chosen.share(budgets) == chosen.share(budgets, 0.4)     # latency is the tightest share
    lines = landing_lines(__import__("dataclasses").asdict(landing))
    assert all("FLOPs" in line and "at most 0.4" in line for line in lines[:len(landing.rounds)])


def test_the_next_table_target_scales_one_point_then_takes_the_secant_through_the_budget() -> None:
    assert next_table_target([(0.50, 0.525)], 0.5) == pytest.approx(0.50 * 0.5 / 0.525)
    # seed 3 of the ORT benchmark: scaling alone stepped from 0.524 to 0.470; the secant aims between
    bracket = [(0.5028, 0.5239), (0.4779, 0.4698)]
    aimed = next_table_target(bracket, 0.5)
    assert 0.4779 < aimed < 0.5028
    assert aimed == pytest.approx(0.4779 + (0.5 - 0.4698) * (0.5028 - 0.4779) / (0.5239 - 0.4698))
    # the two points nearest the budget from either side are used, whatever the order they were measured in
    assert next_table_target([(0.40, 0.30), (0.5028, 0.5239), (0.4779, 0.4698)], 0.5) == pytest.approx(aimed)
    # both on one side: the last two; a secant that does not rise (noise): the nearest point scaled
    assert next_table_target([(0.50, 0.53), (0.49, 0.52)], 0.5) == pytest.approx(0.49 + (0.5 - 0.52) * 0.01 / 0.01)
    assert next_table_target([(0.50, 0.52), (0.48, 0.53)], 0.5) == pytest.approx(0.50 * 0.5 / 0.52)
    # seed 3 of the second ORT benchmark: two plans measured alike (slope 0.05): no wild extrapolation
    flat = [(0.5028, 0.5194), (0.4864, 0.5186)]
    assert next_table_target(flat, 0.5) == pytest.approx(0.4864 * 0.5 / 0.5186)


def test_a_real_measurement_at_freeze_is_recorded_and_a_failing_one_leaves_the_table_plan(tmp_path: Path, fmnist, monkeypatch) -> None:
    """A tiny latency-constrained run on a synthetic table: at freeze the plan is built, exported and
    measured on ONNX Runtime (one compile, short blocks) and the applied widths are the report's;
    a measurement that fails leaves the table's plan with the reason recorded."""
    pytest.importorskip("onnxruntime")
    from lapp_edge.deploy.backends.base import BackendUnavailable
    from lapp_edge.latency.measure_plan import PlanMeasurer
    from lapp_edge.training.trainer import Trainer
    from tests.conftest import tiny_config

    _, sites, layers = resnet20()
    _write(tmp_path, synthetic_table(layers, sites))
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path / "run", target="x86-ort-fp32", latency_target="0.5", channel_multiple=8)
    quick = PlanMeasurer(compiles=1, protocol=RatioProtocol(blocks=4, calls_large_batch=2, warmup=3, retries=0))
    report = Trainer(config, fmnist, measure=quick).run()
    landing = report["landing"]
    assert 1 <= len(landing["rounds"]) <= LANDING_ROUNDS and landing["budgets"] == {"x86-ort-fp32": 0.5}
    applied = landing["rounds"][landing["chosen"]]
    assert 0.05 < applied["measured"]["x86-ort-fp32"] < 1.2 and len(applied["per_compile"]["x86-ort-fp32"]) == 1
    assert {layer["name"]: layer["kept"] for layer in report["layers"]} == applied["widths"]
    assert "freeze plan 1" in (tmp_path / "run" / "report.txt").read_text()

    def broken(spec: ArchitectureSpec, target: str, batch: int) -> MeasuredRatio:
        raise BackendUnavailable("onnxruntime is not installed")

    report = Trainer(replace(config, out=str(tmp_path / "run2")), fmnist, measure=broken).run()
    assert report["landing"]["rounds"] == [] and "could not be measured" in report["landing"]["note"]
    assert report["latency_predicted_ratio"]["x86-ort-fp32"] == pytest.approx(0.5, abs=0.01)   # the table's plan
    off = Trainer(replace(config, out=str(tmp_path / "run3"), measure_at_freeze=False), fmnist, measure=quick)
    assert off.measured_landing() is None                        # --no-measure-at-freeze: the table's plan, nothing measured


def test_land_on_flops_keeps_every_plan_on_the_flops_target_and_under_the_measured_ceiling() -> None:
    """--land-on-flops: every measured plan sits on the FLOPs target; where the measured latency is over
    its ceiling the table is scaled and the plan re-allocated at the same FLOPs, so the applied plan is
    on target and under the ceiling."""
    from lapp_edge.lapp.flops import build_flops_cost
    from lapp_edge.lapp.latency_cost import FlopsUnderLatencyCeilings
    from tests.lapp.test_latency_cost import SHAPE

    model, sites, layers = resnet20()
    table = _costs(layers, sites, step=0.3)[0]
    truth = {"x86-ort-fp32": _costs(layers, sites, step=0.8)[0]}
    flops = (build_flops_cost(model, sites, SHAPE), 0.4)
    budget = 0.65     # the 'hardware' (step 0.8) fits FLOPs 0.4 under it; the table's first plan measures over it
    controller = _controller(sites, FlopsUnderLatencyCeilings(flops[0], [table], [budget]), 0.4)
    plan, landing = land_on_measured(controller, [table], {"x86-ort-fp32": budget}, {"x86-ort-fp32": 32}, _spec(sites),
                                     _true_measure(truth, sites, []), flops_bound=flops, land_on_flops=True)  # type: ignore[arg-type]
    assert plan is not None and landing.flops_landed
    for item in landing.rounds:
        assert item.flops == pytest.approx(0.4, abs=controller.config.tolerance)
    chosen = landing.rounds[landing.chosen]
    assert chosen.measured["x86-ort-fp32"] <= budget                                 # a ceiling: one-sided
    assert landing.rounds[0].measured["x86-ort-fp32"] > budget * (1 + LANDING_AIM)   # the table's own plan was over
    lines = landing_lines(__import__("dataclasses").asdict(landing))
    assert all("FLOPs" in line and "target 0.4" in line for line in lines[:len(landing.rounds)])


@pytest.mark.parametrize("over", [1.003, 1.015])
def test_land_on_flops_does_not_accept_a_plan_measured_over_its_ceiling_by_less_than_the_aim(over: float) -> None:
    """Bug (seed 0 of issue 9's keep1 run): a plan measured 1.016 of its latency ceiling ended the search
    (the two-sided +-2% aim) and the package came out at 0.799 of the 0.8 efficiency it was trained for.
    A ceiling is one-sided: a plan over it by any margin is planned again, aimed under it, and the plan
    applied is the one under it; the report line says how far under its ceiling it measured."""
    from lapp_edge.lapp.flops import build_flops_cost
    from lapp_edge.lapp.latency_cost import FlopsUnderLatencyCeilings
    from tests.lapp.test_latency_cost import SHAPE

    model, sites, layers = resnet20()
    table = _costs(layers, sites, step=0.3)[0]
    flops = (build_flops_cost(model, sites, SHAPE), 0.4)
    budget = 0.6

    def run(scale: float, rounds: int) -> tuple:
        def measure(spec: ArchitectureSpec, target: str, batch: int) -> MeasuredRatio:
            ratio = scale * float(table.ratio(np.array([spec.widths[s.name] for s in sites], dtype=np.float64)))
            return MeasuredRatio(ratio, [ratio], 0.0, False)
        controller = _controller(sites, FlopsUnderLatencyCeilings(flops[0], [table], [budget]), 0.4)
        return land_on_measured(controller, [table], {"x86-ort-fp32": budget}, {"x86-ort-fp32": 32}, _spec(sites),
                                measure, flops_bound=flops, land_on_flops=True, rounds=rounds)  # type: ignore[arg-type]

    _, first = run(1.0, rounds=1)
    scale = over * budget / first.rounds[0].predicted["x86-ort-fp32"]     # the table's own plan measures `over` its ceiling
    plan, landing = run(scale, rounds=3)
    assert landing.rounds[0].measured["x86-ort-fp32"] == pytest.approx(over * budget)
    assert over - 1.0 < LANDING_AIM                                    # the old two-sided aim would have stopped here
    assert plan is not None and len(landing.rounds) >= 2
    chosen = landing.rounds[landing.chosen]
    assert landing.chosen > 0 and chosen.measured["x86-ort-fp32"] <= budget
    assert chosen.flops == pytest.approx(0.4, abs=0.01)
    line = landing_lines(__import__("dataclasses").asdict(landing))[landing.chosen]
    assert "applied" in line and "of its latency ceiling" in line


@pytest.mark.parametrize(("scale", "loaded", "warned"), [(1.04, 0.0, False), (1.15, 0.0, True), (0.85, 0.5, True)])
def test_a_table_far_from_the_first_measured_plan_is_reported_stale(scale: float, loaded: float, warned: bool) -> None:
    """On the AVX-512 EPYC without AVX-VNNI, two days after its ORT table was measured, LAPP's plans measured 12-23%
    over the table (docs/RESULTS.md): the landing corrects the run, and says the table needs measuring again, with the
    command; within STALE_TABLE_SHARE it says nothing. A loaded measurement says so (it may be the reason)."""
    from dataclasses import asdict

    from lapp_edge.training.landing import STALE_TABLE_SHARE

    _, sites, layers = resnet20()
    table = _costs(layers, sites, step=0.3)[0]
    controller = _controller(sites, table, 0.5)

    def measure(spec: ArchitectureSpec, target: str, batch: int) -> MeasuredRatio:
        ratio = scale * float(table.ratio(np.array([spec.widths[s.name] for s in sites], dtype=np.float64)))
        return MeasuredRatio(ratio, [ratio], loaded, False)

    _, landing = land_on_measured(controller, [table], {"x86-ort-fp32": 0.5}, {"x86-ort-fp32": 32}, _spec(sites), measure)
    assert abs(scale - 1) > STALE_TABLE_SHARE or not warned
    if not warned:
        assert landing.warnings == []
        return
    [warning] = landing.warnings
    assert f"({100 * (scale - 1):+.0f}%)" in warning and "at batch 32" in warning
    assert "lapp-edge profile-layers --target x86-ort-fp32 --model resnet20" in warning
    assert ("quiet machine" in warning) == (loaded > 0.2)
    assert landing_lines(asdict(landing))[-1] == f"freeze: warning: {warning}"


def test_after_one_high_first_reading_a_fourth_plan_lands_within_five_percent() -> None:
    """ORT seed 1 on the AVX-512 EPYC without AVX-VNNI (docs/RESULTS.md): the first plan read 17% over the table, the
    plans re-planned from that reading measured 3-4% over theirs, and the third, the last of three, was applied at
    0.938 of the budget. Here the 'hardware' reads the first plan +17% and every other plan +3%: a fourth plan, with
    two honest readings behind it, comes within the +-5% band issue 10 asks of a landing (not within the 2% aim:
    the high reading still brackets the budget)."""
    _, sites, layers = resnet20()
    table = _costs(layers, sites, step=0.3)[0]
    calls: list = []

    def measure(spec: ArchitectureSpec, target: str, batch: int) -> MeasuredRatio:
        ratio = (1.17 if not calls else 1.03) * float(table.ratio(np.array([spec.widths[s.name] for s in sites], dtype=np.float64)))
        calls.append(ratio)
        return MeasuredRatio(ratio, [ratio], 0.0, False)

    def land(rounds: int) -> float:
        calls.clear()
        _, landing = land_on_measured(_controller(sites, table, 0.5), [table], {"x86-ort-fp32": 0.5}, {"x86-ort-fp32": 32},
                                      _spec(sites), measure, rounds=rounds)  # type: ignore[arg-type]
        return landing.rounds[landing.chosen].share(landing.budgets)

    three, four = land(3), land(LANDING_ROUNDS)
    assert abs(three - 1) > 0.05                   # three plans: the high reading steers the last one
    assert abs(four - 1) < abs(three - 1) and abs(four - 1) <= 0.05
