"""benchmarks/training_cost.py and training/step_cost.py: trainers are timed in a rotated order, and the
benchmark rebuilds each finished LAPP run's two phases (the slim one at the run's learned widths, without
the bypass where the run merged it at freeze) and reports the whole training in dense steps."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lapp_edge.data.torch_data import Dataset
from lapp_edge.training.step_cost import interleaved_step_costs
from lapp_edge.training.trainer import Trainer
from tests.benchmark_modules import load_benchmark
from tests.conftest import tiny_config

bench = load_benchmark("training_cost.py", "bench_training_cost")


@dataclass
class Record:
    seconds: float
    cpu_seconds: float


@dataclass
class CountingTrainer:
    """Stands in for a Trainer in the scheduling test only: records when it was called, costs `ms` a step."""

    name: str
    ms: float
    calls: list[str] = field(default_factory=list)
    steps_per_epoch: int = 4

    def train_epoch(self) -> Record:
        self.calls.append(self.name)
        return Record(self.ms * 4 / 1e3, self.ms * 4 / 1e3)


def test_the_order_rotates_every_block_and_the_median_is_per_step() -> None:
    calls: list[str] = []
    trainers = {name: CountingTrainer(name, ms, calls) for name, ms in (("a", 10.0), ("b", 20.0), ("c", 5.0))}
    costs = interleaved_step_costs(trainers, blocks=3)  # type: ignore[arg-type]
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: cost.cpu_ms_per_step for name, cost in costs.items()} == pytest.approx({"a": 10.0, "b": 20.0, "c": 5.0})
    assert costs["b"].cpu_blocks == pytest.approx([20.0, 20.0, 20.0])
    with pytest.raises(ValueError, match="at least one trainer and one block"):
        interleaved_step_costs(trainers, blocks=0)  # type: ignore[arg-type]


def test_finished_runs_are_timed_per_phase_against_dense(tmp_path: Path, fmnist: Dataset,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    runs = {}
    for name, overrides in (("dense", {"dense": True}), ("lapp", {"merge_bypass_at_freeze": False}),
                            ("merged", {})):
        Trainer(tiny_config(tmp_path / name, train_subset=128, test_subset=64, **overrides), fmnist).run()
        runs[name] = tmp_path / name
    report_path = runs["merged"] / "report.json"       # a run trained on a GPU is timed on the CPU all the same
    report = json.loads(report_path.read_text())
    report["config"]["device"] = "cuda"
    report_path.write_text(json.dumps(report))
    out = tmp_path / "cost.json"
    monkeypatch.setattr("sys.argv", ["training_cost.py", "--runs", str(runs["lapp"]), "--runs", str(runs["merged"]),
                                     "--dense-run", str(runs["dense"]), "--images", "64", "--blocks", "2", "--out", str(out)])
    assert bench.main() == 0
    payload = json.loads(out.read_text())
    assert set(payload["step_costs"]) == {"dense", "0:pruning", "0:slim", "1:pruning", "1:slim"}
    lapp, merged = payload["runs"]
    assert (lapp["bypass_merged"], merged["bypass_merged"]) == (False, True)
    for run in (lapp, merged):
        assert run["epochs"] == 2 and run["prune_epochs"] == 1
        assert run["whole_training_ratio"] == pytest.approx((run["pruning_step_ratio"] + run["slim_step_ratio"]) / 2)
        assert run["slim_step_ratio"] > 0 and run["recorded_ratio"] > 0
    assert payload["machine"] and payload["images"] == 64
    assert "| whole training / dense |" in capsys.readouterr().out


def test_a_dense_or_unfinished_run_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["training_cost.py", "--runs", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match=r"has no report.json \(not a finished run\)$"):
        bench.main()
