"""The bench's honesty about what ran (bf16 asked, fp32 compiled: predicted with an fp32 fit, said so),
latency batches from a small test split, and the mission table and plot from a bench report.
Torch-free and fast: no training, no runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lapp_edge.deploy.bench import batch_of, fit_for, fit_machine_note
from lapp_edge.deploy.package import ModelPackage
from lapp_edge.deploy.summary import format_mission, mission_rows, plot_mission, table_batch
from lapp_edge.deploy.targets import load_target
from lapp_edge.resources import find_profile

PACKAGE = ModelPackage(Path("pkg"), {"model": "resnet20", "input": {"shape": [1, 28, 28]}})


AVX2_EPYC = "AMD EPYC; avx2"            # a machine the shipped fits are keyed to
UNFITTED_CPU = "Test CPU; avx9"         # one they are not


def test_a_bf16_fit_is_not_used_where_the_cpu_compiled_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lapp_edge.deploy.bench.target_machine_key", lambda _backend: UNFITTED_CPU)
    profile = load_target(find_profile("x86-openvino-bf16"))
    fit, path, reference, note = fit_for(profile, PACKAGE, "fp32")
    assert fit is not None and fit.precision_used == "fp32" and path is not None and path.name.startswith("latency-fit-x86-openvino-f32")
    assert reference is not None and "measured with bf16 kernels, this CPU compiled fp32" in note
    fit, path, _, note = fit_for(profile, PACKAGE, "bf16")            # where bf16 ran, its own fit
    assert fit is not None and fit.precision_used == "bf16" and "kernels" not in note
    assert note == fit_machine_note(fit, UNFITTED_CPU)        # only the machine warning, where there is one
    assert fit_for(load_target(find_profile("x86-ort-int8")), PACKAGE, "int8")[0] is None   # no int8 fit for this CPU: said
    monkeypatch.setattr("lapp_edge.deploy.bench.target_machine_key", lambda _backend: AVX2_EPYC)
    fit, path, _, note = fit_for(profile, PACKAGE, "fp32")        # no bf16 kernels there: its own f32 fit, no machine warning
    assert fit is not None and path is not None and path.name == "latency-fit-x86-openvino-f32-resnet20-amd-epyc-avx2.json"
    assert "this CPU compiled fp32" in note and "was measured on" not in note
    fit, path, _, note = fit_for(load_target(find_profile("x86-ort-int8")), PACKAGE, "int8")
    assert fit is not None and fit.precision_used == "int8" and fit.load["machine"] == AVX2_EPYC and note == ""


def test_a_fit_from_another_cpu_is_used_with_a_warning_naming_both_machines() -> None:
    fit, _, _, _ = fit_for(load_target(find_profile("x86-ort-fp32")), PACKAGE, "fp32")
    assert fit is not None
    here = "AMD EPYC; avx2"
    for recorded in ("Intel Xeon; amx_tile avx2 avx512f", "AMD EPYC; avx2 avx512_bf16 avx512f"):
        fit.load = {"cpu": recorded.split(";")[0], "machine": recorded}
        note = fit_machine_note(fit, here)
        assert recorded in note and here in note and "calibrate-latency --target x86-ort-fp32" in note
    fit.load = {"cpu": "AMD EPYC", "machine": here}
    assert fit_machine_note(fit, here) == ""
    fit.load = {"cpu": "AMD EPYC"}                      # a fit from before the ISA flags were recorded
    assert "without its ISA flags recorded" in fit_machine_note(fit, here)
    # a profile given by path: the hint carries the path, so it runs as printed
    assert "calibrate-latency --target my/edge.yaml --model" in fit_machine_note(fit, here, "my/edge.yaml")


def test_the_bench_note_carries_the_machine_warning_of_a_shipped_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    # a machine without its own fit gets the unkeyed one shipped before fits were keyed (it predates recording
    # load.machine), with a warning and the command to fix it; a machine with its own fit gets that one, unwarned
    monkeypatch.setattr("lapp_edge.deploy.bench.target_machine_key", lambda _backend: UNFITTED_CPU)
    fit, path, _, note = fit_for(load_target(find_profile("x86-ort-fp32")), PACKAGE, "fp32")
    assert fit is not None and path is not None and path.name == "latency-fit-x86-ort-fp32-resnet20.json" and "machine" not in fit.load
    assert "without its ISA flags recorded" in note and UNFITTED_CPU in note
    monkeypatch.setattr("lapp_edge.deploy.bench.target_machine_key", lambda _backend: AVX2_EPYC)
    fit, path, _, note = fit_for(load_target(find_profile("x86-ort-fp32")), PACKAGE, "fp32")
    assert fit is not None and fit.load["machine"] == AVX2_EPYC and note == "" and sorted(fit.batches) == [1, 32]


def test_latency_batches_repeat_a_small_test_split() -> None:
    images = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1)
    assert batch_of(images, 2).ravel().tolist() == [0, 1]
    assert batch_of(images, 7).ravel().tolist() == [0, 1, 2, 0, 1, 2, 0]


def bench_report() -> dict:
    def variant(top1: float, used: str, ms: float, speedup: float, predicted: bool) -> dict:
        return {
            "runner": {"precision_used": used}, "accuracy": {"top1": top1},
            "latency": [{"batch": 1, "median_ms": ms}, {"batch": 32, "median_ms": 20 * ms}],
            "baseline": {"top1": 0.9, "macs_ratio": 0.4, "speedup": {"1": speedup, "32": speedup + 0.1},
                         "baseline_median_ms": {"1": ms * speedup, "32": 20 * ms * speedup}},
            "predicted_from_flops": [{"batch": 1, "predicted_ratio": 0.6, "measured_ratio": 0.5, "error_pct": 20.0}] if predicted else [],
            "predicted_from_table": [{"batch": 1, "predicted_ratio": 0.49, "measured_ratio": 0.5, "error_pct": -2.0}] if predicted else [],
            "prediction_note": "" if predicted else "no latency fit for x86-ort-int8/resnet20",
        }
    return {"targets": [
        {"target": "x86-ort-fp32", "precision": "fp32", "status": "ok", "message": "", "variants": {"fp32": variant(0.88, "fp32", 0.5, 1.8, True)}},
        {"target": "x86-openvino-bf16", "precision": "bf16", "status": "ok", "message": "", "variants": {"bf16": variant(0.88, "fp32", 0.6, 1.6, True)}},
        {"target": "x86-ort-int8", "precision": "int8", "status": "ok", "message": "", "variants": {"qdq-u8s8": variant(0.87, "int8", 0.3, 1.2, False)}},
        {"target": "x86-gone", "precision": "fp32", "status": "unavailable", "message": "cannot import x", "variants": {}},
    ]}


def test_the_mission_table_says_what_ran_and_what_was_predicted(tmp_path: Path) -> None:
    rows = mission_rows(bench_report())
    fp32 = rows[0]
    assert fp32["predicted_ms"][1] == 0.5 * 0.6 / 0.5 and fp32["dense_ms"][1] == 0.5 * 1.8
    assert fp32["table_predicted_ms"][1] == pytest.approx(0.5 * 0.49 / 0.5) and fp32["table_error_pct"][1] == -2.0
    table = format_mission(rows)
    fp32_line = next(line for line in table.splitlines() if line.startswith("x86-ort-fp32 "))
    assert "  +20.0%" in fp32_line and "   -2.0%" in fp32_line           # the FLOPs fit's error, then the table's
    int8_line = next(line for line in table.splitlines() if line.startswith("x86-ort-int8 "))
    assert "%" not in int8_line                                           # neither a fit nor a table: dashes
    assert "x86-openvino-bf16: asked bf16, this CPU ran fp32" in table
    assert "no latency fit for x86-ort-int8" in table and "x86-gone" in table and "unavailable" in table
    assert "1.80x b1, 1.90x b32" in table
    plot = tmp_path / "plot.png"
    plot_mission(rows, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_lower_precision_that_loses_accuracy_gets_a_line_and_one_that_keeps_it_does_not() -> None:
    """Every target kind: int8 and bf16 are judged against the package's fp32 ORT run on the same images; a drop
    over PRECISION_DROP_POINTS is named (what full-range U8S8 on a CPU without VNNI did: 3.2 points, silently)."""
    from lapp_edge.deploy.summary import PRECISION_DROP_POINTS

    report = bench_report()
    for target in report["targets"]:
        for variant in target["variants"].values():
            variant["accuracy"]["reference_top1"] = 0.88
    report["targets"][2]["variants"]["qdq-u8s8"]["accuracy"]["top1"] = 0.8489          # int8: -3.11 points
    report["targets"][1]["variants"]["bf16"]["accuracy"]["top1"] = 0.88 - PRECISION_DROP_POINTS / 100 + 0.0001   # within
    report["targets"][0]["variants"]["fp32"]["accuracy"]["top1"] = 0.85                 # fp32 vs fp32: not this check's
    lines = [l for l in format_mission(mission_rows(report)).splitlines() if "points of top-1" in l]
    assert lines == ["x86-ort-int8: int8 loses 3.11 points of top-1 against the package's fp32 ONNX Runtime run (0.8800 -> "
                     "0.8489; more than 1): check its kernels and quantization before shipping (lapp-edge bench --target "
                     "x86-ort-int8 shows every int8 route)"]
    report["targets"][2]["variants"]["qdq-u8s8"]["accuracy"]["top1"] = 0.875
    assert "points of top-1" not in format_mission(mission_rows(report))
    del report["targets"][2]["variants"]["qdq-u8s8"]["accuracy"]["reference_top1"]    # a report from before: no line
    report["targets"][2]["variants"]["qdq-u8s8"]["accuracy"]["top1"] = 0.5
    assert "points of top-1" not in format_mission(mission_rows(report))


def test_a_latency_budget_is_checked_against_the_dense_package_and_the_tables_reference() -> None:
    """A package shaped for x0.5 of dense at batch 32: measured 1 / 1.9 = 0.526 beside the dense package
    (+5.3%: outside +-5%) and 0.51 against the table's dense reference (+2%): the line names both."""
    report = bench_report()
    variant = report["targets"][0]["variants"]["fp32"]
    variant["budgets"] = [{"batch": 32, "budget_ratio": 0.5, "measured_ratio": 0.51, "off_pct": 2.0, "within": True, "note": ""}]
    [budget] = mission_rows(report)[0]["budgets"]
    assert budget["measured_vs_dense_package"] == pytest.approx(1 / 1.9)
    assert budget["off_vs_dense_package_pct"] == pytest.approx(100 * (1 / 1.9 / 0.5 - 1))
    line = next(l for l in format_mission(mission_rows(report)).splitlines() if "latency budget" in l)
    assert line == ("x86-ort-fp32: shaped for a latency budget of x0.500 of dense at batch 32: measured x0.526 vs the dense "
                    "package (+5.3%), x0.510 vs the table's dense reference (+2.0%): OUTSIDE +-5%")
    variant["baseline"]["speedup"] = {"1": 1.8}                  # no dense package at batch 32, no table reference either
    variant["budgets"][0].update(measured_ratio=None, off_pct=None, within=None, note="no dense reference")
    line = next(l for l in format_mission(mission_rows(report)).splitlines() if "latency budget" in l)
    assert line.endswith("at batch 32: not measured (no dense reference)")


def test_the_table_shows_batch_1_unless_a_target_did_not_measure_it() -> None:
    rows = mission_rows(bench_report())
    assert table_batch(rows) == 1
    for row in rows:
        row.get("slim_ms", {}).pop(1, None)
    assert table_batch(rows) == 32


def test_the_fit_and_the_table_share_one_measurement_against_their_dense_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # each measurement is 3 fresh compiles (a quantization each on int8): the bench measured the same dense
    # reference twice per batch, once for the FLOPs fit and once for the layer table
    from lapp_edge.deploy import bench
    from lapp_edge.deploy.compile import OnnxModel

    calls: list[tuple[str, int]] = []

    def measure(package, dense_model, profile, runner, data, work_dir, calibration, route, compiles):  # noqa: ANN001, ANN202
        calls.append((dense_model.onnx_path.name, len(data)))
        return 1.0, [0.5], False

    monkeypatch.setattr(bench, "measure_against_dense", measure)
    shared: bench.DenseMeasurements = {}
    dense = OnnxModel(Path("latency/dense-resnet20-1x28x28.onnx"), "input", (1, 28, 28))
    other = OnnxModel(Path("latency/dense-other.onnx"), "input", (1, 28, 28))
    for model, batch in [(dense, 1), (dense, 32), (dense, 1), (dense, 32), (other, 1)]:
        assert bench.measured_once(shared, PACKAGE, model, None, None, np.zeros((batch, 1, 28, 28)), Path("w"), None, "", 3) \
            == (1.0, [0.5], False)
    assert calls == [("dense-resnet20-1x28x28.onnx", 1), ("dense-resnet20-1x28x28.onnx", 32), ("dense-other.onnx", 1)]
    bench.measured_once(None, PACKAGE, dense, None, None, np.zeros((1, 1, 28, 28)), Path("w"), None, "", 3)
    assert len(calls) == 4                              # no cache given: measured each time
