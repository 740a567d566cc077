"""The latency-aware benchmark's accuracy-at-equal-latency comparison and its summary from results.json
(synthetic rows: no training, no runtime)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.benchmark_modules import load_benchmark

bench = load_benchmark("latency_aware_lapp.py", "latency_aware_lapp_under_test")

TARGET = "x86-ort-fp32"


def row(name: str, method: str, seed: int, latency: float, top1: float, shaped_for: str = "") -> object:
    return bench.Row(name, method, seed, shaped_for, 0.5 if method == "latency" else latency, top1, latency,
                     {TARGET: latency}, {TARGET: [latency]}, {TARGET: latency}, {})


def test_equal_latency_interpolates_the_same_seeds_flops_runs() -> None:
    rows = [row("flops-0.35-s0", "flops", 0, 0.45, 0.880), row("flops-0.45-s0", "flops", 0, 0.55, 0.890),
            row("latency-s0", "latency", 0, 0.50, 0.887, TARGET),
            row("flops-0.35-s1", "flops", 1, 0.46, 0.860), row("flops-0.45-s1", "flops", 1, 0.56, 0.870),
            row("latency-s1", "latency", 1, 0.58, 0.880, TARGET)]       # beyond seed 1's FLOPs runs: extrapolated
    first, second = bench.equal_latency(rows)
    assert first.flops_top1_at_equal_latency == pytest.approx(0.885) and not first.extrapolated
    assert first.difference_points == pytest.approx(0.2)
    assert second.flops_top1_at_equal_latency == pytest.approx(0.872) and second.extrapolated
    assert second.difference_points == pytest.approx(0.8)
    table = bench.format_equal_latency([first, second])
    assert "(extrapolated)" in table and "**+0.50**" in table                 # the mean over the two seeds


def test_equal_latency_edges_below_the_range_at_its_end_and_without_flops_runs() -> None:
    flops = [row("flops-0.35-s0", "flops", 0, 0.45, 0.880), row("flops-0.45-s0", "flops", 0, 0.55, 0.890),
             row("flops-0.55-s0", "flops", 0, 0.65, 0.894)]
    below, at_end, middle, lonely = bench.equal_latency(flops + [
        row("latency-a", "latency", 0, 0.40, 0.870, TARGET),        # below the range: from the two lowest
        row("latency-b", "latency", 0, 0.65, 0.900, TARGET),        # exactly the highest: inside
        row("latency-c", "latency", 0, 0.60, 0.890, TARGET),        # between the upper two
        row("latency-d", "latency", 1, 0.50, 0.880, TARGET),        # seed 1 has no FLOPs runs: left out
        row("latency-e", "latency", 0, 0.50, 0.880, "x86-openvino-bf16"),   # own target not measured: left out
    ]) + [None]
    assert lonely is None
    assert below.extrapolated and below.flops_top1_at_equal_latency == pytest.approx(0.875)
    assert not at_end.extrapolated and at_end.flops_top1_at_equal_latency == pytest.approx(0.894)
    assert not middle.extrapolated and middle.flops_top1_at_equal_latency == pytest.approx(0.892)
    table = bench.format_equal_latency([below, at_end, middle])
    assert "mean of 3 (1 extrapolated)" in table


def test_summarize_rewrites_the_tables_from_results_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.summarize(tmp_path) == 2 and "does not exist" in capsys.readouterr().err
    rows = [row("flops-0.35-s0", "flops", 0, 0.45, 0.880), row("flops-0.45-s0", "flops", 0, 0.55, 0.890),
            row("latency-s0", "latency", 0, 0.50, 0.887, TARGET)]
    results = {"settings": {"targets": TARGET, "batch": 32}, "header": {"machine": "test"}, "rows": [asdict(r) for r in rows]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert bench.summarize(tmp_path) == 0
    text = (tmp_path / "results.md").read_text()
    assert "Accuracy at equal measured latency" in text and "+0.20" in text
    assert (tmp_path / "accuracy_vs_latency.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["equal_latency"][0]["difference_points"] == pytest.approx(0.2)
    results["settings"]["targets"] = [TARGET]                                # a list, as a caller may store it
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert bench.summarize(tmp_path) == 0


def test_summarize_shows_how_far_off_budget_each_run_landed_and_what_its_freeze_measured(tmp_path: Path) -> None:
    """Rows stored before the freeze was measured read it from the run's report (training/landing.py)."""
    rows = [row("flops-0.35-s0", "flops", 0, 0.45, 0.880), row("flops-0.45-s0", "flops", 0, 0.55, 0.890),
            row("latency-s0", "latency", 0, 0.52, 0.887, TARGET)]
    stored = [asdict(r) for r in rows]
    del stored[2]["at_freeze"]
    landing = {"budgets": {TARGET: 0.5}, "rounds": [{"measured": {TARGET: 0.531}}, {"measured": {TARGET: 0.507}}], "chosen": 1}
    (tmp_path / "latency-s0").mkdir()
    (tmp_path / "latency-s0" / "report.json").write_text(json.dumps({"landing": landing}))
    (tmp_path / "results.json").write_text(json.dumps({"settings": {"targets": TARGET, "batch": 32}, "header": {}, "rows": stored}))
    assert bench.summarize(tmp_path) == 0
    line = next(l for l in (tmp_path / "results.md").read_text().splitlines() if l.startswith("| latency-s0"))
    assert line.endswith("| +4.0% | 0.507 |")
    assert json.loads((tmp_path / "results.json").read_text())["rows"][2]["at_freeze"] == {TARGET: 0.507}


@pytest.mark.parametrize(("multiple", "block_removal", "max_pruning_ratio"), [(0, False, 1.0), (8, True, 1.0), (8, False, 0.75)])
def test_every_run_trains_at_the_channel_multiple_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            multiple: int, block_removal: bool, max_pruning_ratio: float) -> None:
    """--channel-multiple reaches every new run's `lapp-edge train` command (0: the train default, not passed);
    --block-removal and --max-pruning-ratio reach the latency-aware runs only, and name them apart (a finished
    run without one is never reused for one with it)."""
    import argparse

    commands: list[list[str]] = []
    monkeypatch.setattr(bench.CHILDREN, "start", lambda command, **_: commands.append(command))
    args = argparse.Namespace(out=str(tmp_path), model="resnet20", epochs=4, prune_epochs=1, train_subset=256, seeds=[0],
                              train_targets=[TARGET], latency_targets=[0.5], flops_targets=[0.3], batch=32,
                              channel_multiple=multiple, block_removal=block_removal, max_pruning_ratio=max_pruning_ratio)
    runs = bench.plan(args)
    for run in runs:
        bench.launch(run, args)
    assert len(commands) == 2
    for command in commands:
        assert (command[command.index("--channel-multiple") + 1] == "8") if multiple else "--channel-multiple" not in command
    latency, flops = commands
    assert ("--block-removal" in latency) == block_removal and "--block-removal" not in flops
    assert runs[0].name.endswith("-blocks-s0") == block_removal
    floored = max_pruning_ratio < 1
    assert ("--max-pruning-ratio" in latency) == floored and "--max-pruning-ratio" not in flops
    assert runs[0].name.endswith("-mpr0.75-s0") == floored
    if floored:
        assert latency[latency.index("--max-pruning-ratio") + 1] == "0.75"
