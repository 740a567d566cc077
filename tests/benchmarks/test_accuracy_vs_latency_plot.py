"""benchmarks/accuracy_vs_latency_plot.py: points grouped by the run folder (method), a PNG, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark_modules import load_benchmark

plot = load_benchmark("accuracy_vs_latency_plot.py", "bench_accuracy_vs_latency_plot")


def result(seed: int) -> dict:
    runs = {"lapp": (0.40, 1.6, 0.918), "lapp-latency-blocks": (0.38, 2.2, 0.910)}
    models = [{"name": "dense", "role": "dense", "source_run": "runs/dense", "test_top1": 0.921}]
    rows = []
    for method, (macs, speedup, top1) in runs.items():
        name = f"s{seed}-{method}"
        models.append({"name": name, "role": "slim", "source_run": f"bench/s{seed}/{method}", "test_top1": top1 + seed / 1000})
        for target in ("x86-ort-fp32", "x86-openvino-f32"):
            rows.append({"target": target, "batch": 32, "slim": name, "macs_ratio": macs, "speedup": {"median": speedup + seed / 100}})
    return {"models": models, "slim_rows": rows}


def test_points_group_seeds_by_method_and_the_plot_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    series, dense = plot.points([result(0), result(1), result(1)], "x86-ort-fp32", 32)   # a package measured twice counts once
    assert dense == 0.921
    assert sorted(series) == ["lapp", "lapp-latency-blocks"]
    assert sorted(series["lapp-latency-blocks"]) == [(2.2, 0.910, "s0-lapp-latency-blocks"), (2.21, 0.911, "s1-lapp-latency-blocks")]
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"r{seed}.json")
        paths[-1].write_text(json.dumps(result(seed)))
    out = tmp_path / "plot.png"
    assert plot.main([str(p) for p in paths] + ["--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lapp-latency-blocks" in capsys.readouterr().out


def test_no_matching_row_or_a_missing_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result(0)))
    assert plot.main([str(path), "--batch", "1", "--out", str(tmp_path / "p.png")]) == 2
    assert plot.main([str(tmp_path / "absent.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("accuracy_vs_latency_plot: error:") for line in err)
    assert not (tmp_path / "p.png").exists()
