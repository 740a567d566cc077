"""benchmarks/memory_format.py: the formats alternate between repeats, ratios are paired within a repeat,
and a failed run is one line with exit 1. Training itself is stubbed here (the runs are real `lapp-edge
train` processes in the benchmark; `make bench-memory-format`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.benchmark_modules import load_benchmark

bench = load_benchmark("memory_format.py", "bench_memory_format")

# epoch CPU seconds of the stubbed runs: channels_last is 0.8x contiguous, and the second repeat runs
# on a machine 1.5x slower, which the paired ratio must not see
SECONDS = {"dense": 10.0, "pruning": 20.0, "slim": 5.0}


def _args(tmp_path: Path, repeats: int) -> argparse.Namespace:
    return argparse.Namespace(out=str(tmp_path), models="resnet20,mobilenetv2", repeats=repeats, train_subset=64,
                              test_subset=32, threads=1, flops_target=0.5, seed=0)


def test_ratios_are_paired_within_a_repeat_and_the_order_alternates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, str, int]] = []

    def fake_run(out: Path, model: str, mode: str, memory_format: str, args: argparse.Namespace) -> dict:
        repeat = int(out.name.rsplit("-r", 1)[1])
        calls.append((model, mode, memory_format, repeat))
        scale = (0.8 if memory_format == "channels_last" else 1.0) * (1.5 if repeat == 1 else 1.0)
        return {"epoch_cpu_seconds_median": {p: SECONDS[p] * scale for p in bench.PHASES[mode]}}

    monkeypatch.setattr(bench, "run_train", fake_run)
    rows, _ = bench.measure(_args(tmp_path, repeats=2))
    assert [(r.model, r.phase) for r in rows] == [(m, p) for m in ("resnet20", "mobilenetv2") for p in ("dense", "pruning", "slim")]
    assert all(r.ratio == pytest.approx(0.8) and r.ratios == pytest.approx([0.8, 0.8]) for r in rows)
    assert rows[0].contiguous_cpu_s == pytest.approx(12.5)          # median of 10 and 15 (the slower repeat)
    first = [c[2] for c in calls if c[:2] == ("resnet20", "dense")]
    assert first == ["contiguous", "channels_last", "channels_last", "contiguous"]
    assert "| resnet20 | slim | 6.2 | 5.0 | **0.80** (0.80, 0.80) |" in bench.format_table(rows)


def test_a_failed_run_is_one_line_and_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def failing_run(*_args: object) -> dict:
        raise RuntimeError("lapp-edge train --out x failed: lapp-edge: error: no such model\nsecond line")

    monkeypatch.setattr(bench, "run_train", failing_run)
    monkeypatch.setattr("sys.argv", ["memory_format.py", "--out", str(tmp_path), "--repeats", "1"])
    assert bench.main() == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("memory_format: error: lapp-edge train") and "\n" not in err
    assert not (tmp_path / "results.json").exists()
