"""Issue 14, kind 4: no option is silently dropped. A resumed run honours --epochs/--data-dir/
--device/--threads/--quiet and refuses any other change in one line with nothing written; a
mode that cannot apply an option (--dense and LAPP-only options) refuses it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lapp_edge.cli import main
from lapp_edge.data.torch_data import Dataset

TINY = ["--model", "resnet20", "--train-subset", "256", "--test-subset", "100", "--batch-size", "64",
        "--bn-recalibration-batches", "2", "--threads", "1", "--quiet"]


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, fmnist: Dataset) -> Path:
    out = tmp_path_factory.mktemp("options") / "run"
    assert main(["train", "--out", str(out), "--epochs", "2", "--prune-epochs", "1", "--flops-target", "0.5", *TINY]) == 0
    return out


def test_more_epochs_on_resume_continue_training(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for path in finished_run.iterdir():
        (run / path.name).write_bytes(path.read_bytes())
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--quiet"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [1, 2, 3]
    assert [e["phase"] for e in report["epochs"]] == ["pruning", "slim", "slim"]
    assert report["config"]["epochs"] == 3 and json.loads((run / "config.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("change", [["--lr", "0.01"], ["--flops-target", "0.25"], ["--seed", "5"], ["--no-bypass"],
                                    ["--epochs", "4", "--lr", "0.01", "--flops-target", "0.25"]])
def test_a_changed_setting_on_resume_is_refused_and_nothing_is_written(
        finished_run: Path, capsys: pytest.CaptureFixture[str], change: list[str]) -> None:
    before = snapshot(finished_run)
    assert main(["train", "--out", str(finished_run), "--resume", *change]) == 2
    err = one_error(capsys)
    assert "--resume keeps the run's saved settings" in err
    for flag in [c for c in change if c.startswith("--") and c != "--epochs"]:
        assert flag in err
    assert snapshot(finished_run) == before


def test_the_same_settings_given_again_on_resume_are_accepted(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for path in finished_run.iterdir():
        (run / path.name).write_bytes(path.read_bytes())
    # the original command line plus --resume: nothing differs, nothing to train (2 of 2 epochs done)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--prune-epochs", "1", "--flops-target", "0.5",
                 *TINY]) == 0


def test_fewer_epochs_than_completed_is_refused(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(finished_run)
    assert main(["train", "--out", str(finished_run), "--resume", "--epochs", "1"]) == 2
    assert "fewer than the 2 epochs" in one_error(capsys)
    assert snapshot(finished_run) == before


def test_a_run_without_a_completed_epoch_takes_the_new_settings_on_resume(tmp_path: Path, fmnist: Dataset) -> None:
    # a run killed before its first checkpoint has trained nothing: a corrected setting is honoured
    run = tmp_path / "run"
    run.mkdir()
    saved = {"out": str(run), "model": "resnet20", "epochs": 2, "prune_epochs": 1, "flops_target": 0.92,
             "channel_multiple": 32, "train_subset": 256, "test_subset": 100, "batch_size": 64,
             "bn_recalibration_batches": 2, "threads": 1, "progress": False}
    (run / "config.json").write_text(json.dumps(saved))
    assert main(["train", "--out", str(run), "--resume", "--flops-target", "0.9"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["config"]["flops_target"] == 0.9 and abs(report["flops"]["ratio"] - 0.9) <= 0.01


@pytest.mark.parametrize("lapp_option", [["--flops-target", "0.3"], ["--prune-epochs", "1"], ["--channel-multiple", "4"],
                                         ["--scorer", "bn_gamma"], ["--trace-every", "5"],
                                         ["--bn-recalibration-batches", "3"]])
def test_dense_refuses_options_only_lapp_uses(tmp_path: Path, capsys: pytest.CaptureFixture[str], lapp_option: list[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--dense", "--epochs", "2", *lapp_option]) == 2
    err = one_error(capsys)
    assert "--dense trains without LAPP" in err and lapp_option[0] in err
    assert not out.exists()
