"""The bench's layer-table prediction: a package's convs read from its ONNX graph, predicted with this
machine's table, next to its latency measured against the table's dense reference on a real runtime."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lapp_edge.costs.latency_table import (
    TABLE_FORMAT, BatchTable, LatencyTable, LayerTable, onnx_conv_layers, table_file_name, write_table_json,
)
from lapp_edge.deploy.bench import compare_with_table, table_for
from lapp_edge.deploy.compile import compile_runner
from lapp_edge.deploy.measure import machine_key, measure_latency
from lapp_edge.deploy.package import ModelPackage
from lapp_edge.deploy.targets import load_target, runtime_version
from lapp_edge.resources import LATENCY_DIR

DENSE_REFERENCE = "dense-resnet20-1x28x28.onnx"


def table_covering(layers: list[tuple[str, int, int]], batch: int) -> LatencyTable:
    """A table holding every layer shape of `layers` at its widths (latency proportional to MACs-ish)."""
    grids: dict[str, tuple[set[int], set[int]]] = {}
    for signature, c_in, c_out in layers:
        entry = grids.setdefault(signature, (set(), set()))
        entry[0].add(c_in)
        entry[1].add(c_out)
    tables = {}
    for signature, (c_in, c_out) in grids.items():
        ins, outs = sorted(c_in), sorted(c_out)
        tables[signature] = LayerTable(signature, ins, outs, [[0.001 * (i * o + 1) for o in outs] for i in ins])
    total = float(BatchTable(batch, tables, 0.0, 1.0, 1.0, 1.0, 0.0).sum_ms(layers))
    return LatencyTable(TABLE_FORMAT, "x86-ort-fp32", "onnxruntime-cpu", "fp32", "fp32", 1, runtime_version("onnxruntime-cpu"),
                        machine_key(), "test", "resnet20", True, [1, 28, 28], 8,
                        {batch: BatchTable(batch, tables, 0.05, 0.95, total, 1.0, 0.0)}, DENSE_REFERENCE)


def test_no_table_on_this_machine_is_said_not_guessed(package: ModelPackage, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("lapp_edge.deploy.bench.target_machine_key", lambda _backend: "A CPU nobody profiled; avx2")
    table, path, reference, note = table_for(load_target("x86-ort-fp32"), package)
    assert table is None and path is None and reference is None
    assert "no layer latency table for x86-ort-fp32/resnet20" in note and "profile-layers" in note


def test_table_prediction_sits_next_to_the_measured_ratio(package: ModelPackage, tmp_path: Path, monkeypatch) -> None:
    layers = onnx_conv_layers(package.onnx_path)
    dense_layers = onnx_conv_layers(LATENCY_DIR / DENSE_REFERENCE)
    assert sorted(layers) == sorted(dense_layers)      # the fixture package is a dense ResNet-20
    data_dir = tmp_path / "latency-data"
    data_dir.mkdir()
    table = table_covering(layers, 32)
    (data_dir / table_file_name("x86-ort-fp32", "resnet20", (1, 28, 28), machine_key())).write_bytes(write_table_json(table))
    shutil.copy(LATENCY_DIR / DENSE_REFERENCE, data_dir / DENSE_REFERENCE)
    monkeypatch.chdir(tmp_path)
    profile = load_target("x86-ort-fp32")
    found, path, reference, note = table_for(profile, package)
    assert found is not None and path is not None and reference == data_dir / DENSE_REFERENCE and note == ""
    data = np.zeros((32, 1, 28, 28), dtype=np.float32)
    with compile_runner(package, profile, 32, tmp_path / "work") as runner:
        median = measure_latency(runner, data, profile.latency).median_ms
        [comparison] = compare_with_table(found, path, reference, package, profile, {32: runner}, {32: median},
                                          tmp_path / "work", None, "", compiles=2)
    assert comparison.batch == 32 and comparison.predicted_ratio == pytest.approx(1.0)
    assert len(comparison.measured_per_compile) == 2        # the bench's runner, then one fresh compile of both
    assert comparison.measured_ratio == pytest.approx(float(np.median(comparison.measured_per_compile)))
    assert all(0.8 < r < 1.25 for r in comparison.measured_per_compile)   # the same network twice, measured interleaved
    assert comparison.error_pct == pytest.approx(100 * (1 / comparison.measured_ratio - 1))


def test_bench_says_how_far_off_its_latency_budget_a_package_measures() -> None:
    """A package shaped for a latency budget (manifest `latency_budgets`, written by export from the run's
    report) is judged against it with the ratio bench measured at the budget's batch, on that target only."""
    from lapp_edge.deploy.bench import BudgetCheck, FitComparison, budget_checks
    from lapp_edge.export.package_writer import latency_budgets_from_report

    report = {"shaped_for": [{"target": "x86-ort-fp32", "budget_ratio": 0.5, "batch": 32, "table": "t.json"},
                             {"target": "x86-openvino-bf16", "budget_ratio": 0.6, "batch": 1},
                             {"target": "bad", "budget_ratio": "0.5", "batch": 32}]}
    manifest = {"latency_budgets": latency_budgets_from_report(report)}
    assert manifest["latency_budgets"] == [{"target": "x86-ort-fp32", "budget_ratio": 0.5, "batch": 32},
                                           {"target": "x86-openvino-bf16", "budget_ratio": 0.6, "batch": 1}]
    assert latency_budgets_from_report({}) == []                      # FLOPs and dense runs: none

    def measured(batch: int, ratio: float) -> FitComparison:
        return FitComparison("fit.json", batch, {}, 0.5, ratio, 10.0, 5.0, 10.0 * ratio, 0.0)

    [check] = budget_checks(manifest, "x86-ort-fp32", [measured(1, 0.7), measured(32, 0.509)])
    assert check.batch == 32 and check.measured_ratio == 0.509 and check.within
    assert check.off_pct == pytest.approx(1.8)
    [over] = budget_checks(manifest, "x86-ort-fp32", [measured(32, 0.533)])
    assert not over.within and over.off_pct == pytest.approx(6.6)
    [missing] = budget_checks(manifest, "x86-openvino-bf16", [measured(32, 0.5)])
    assert missing.measured_ratio is None and missing.within is None and "no dense reference" in missing.note
    assert budget_checks(manifest, "x86-openvino-f32", [measured(32, 0.5)]) == []
    assert isinstance(check, BudgetCheck)
    # a --land-on-flops run: its budgets are ceilings, so far under lands and only more than 5% over misses
    ceilings = {"latency_budgets": latency_budgets_from_report({**report, "land_on_flops": True})}
    assert all(entry["ceiling"] is True for entry in ceilings["latency_budgets"])
    [under] = budget_checks(ceilings, "x86-ort-fp32", [measured(32, 0.40)])
    assert under.ceiling and under.within and under.off_pct == pytest.approx(-20.0)
    [over_ceiling] = budget_checks(ceilings, "x86-ort-fp32", [measured(32, 0.533)])
    assert over_ceiling.ceiling and not over_ceiling.within


def test_a_latency_ceiling_reads_as_one_in_the_summary() -> None:
    from lapp_edge.deploy.summary import budget_line

    line = budget_line("x86-ort-fp32", {"batch": 32, "budget_ratio": 0.47, "ceiling": True, "measured_ratio": 0.43,
                                        "off_pct": 100 * (0.43 / 0.47 - 1), "measured_vs_dense_package": None})
    assert "latency ceiling of x0.470" in line and line.endswith("under the ceiling (+5% allowed)")
    line = budget_line("x86-ort-fp32", {"batch": 32, "budget_ratio": 0.47, "measured_ratio": 0.43,
                                        "off_pct": 100 * (0.43 / 0.47 - 1), "measured_vs_dense_package": None})
    assert "latency budget of x0.470" in line and line.endswith("OUTSIDE +-5%")
