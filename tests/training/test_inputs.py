"""Issue 14 at the training level (kinds 1, 3, 5, 6): what is knowable before training is checked
before anything is written; what fails later fails with one line and leaves a resumable run; the
data's decisions are printed before training and stored in the run's config. Tiny runs, seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lapp_edge.data.torch_data as torch_data
from lapp_edge.cli import main
from lapp_edge.data.torch_data import Dataset
from lapp_edge.errors import UserError
from lapp_edge.training.trainer import Trainer
from tests.conftest import tiny_config
from tests.data.test_imagefolder import truncate, write_tree

QUICK = ["--epochs", "2", "--prune-epochs", "1", "--threads", "1", "--bn-recalibration-batches", "2", "--quiet"]


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_tree(root, "train", "cat,dog,fox", 6)
    write_tree(root, "val", "cat,fox", 3)
    return root


def test_imagefolder_run_prints_its_decisions_first_and_stores_them(tree: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--model", "resnet20", "--dataset", "imagefolder", "--data-dir", str(tree), "--flops-target", "0.5",
                 "--batch-size", "8", "--out", str(out), *QUICK]) == 0
    stdout = capsys.readouterr().out
    decided = ["data: imagefolder", "val/ has no images of dog", "input 3x40x40", "held in memory", "augmentation: small",
               "normalisation: mean", "training: 18 images in batches of 8", "LAPP: FLOPs target 0.5"]
    positions = [stdout.find(text) for text in decided]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), stdout
    assert max(positions) < stdout.find("LAPP resnet20 on imagefolder")              # before the report
    config = json.loads((out / "config.json").read_text())
    assert config["input_size"] == 40 and config["augment"] == "small" and len(config["mean"].split(",")) == 3
    assert json.loads((out / "report.json").read_text())["config"]["input_size"] == 40
    # resuming reads the same data from the stored decisions (nothing given differs)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--quiet"]) == 0


def test_a_truncated_image_is_refused_before_anything_is_written(tree: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    truncate(tree / "train" / "dog" / "img002.png")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(tree), "--batch-size", "4", "--out", str(out), *QUICK]) == 2
    assert "dog/img002.png: image file is truncated" in one_error(capsys)
    assert not out.exists()


def test_an_image_that_breaks_mid_training_stops_with_one_line_and_the_run_resumes(tree: Path, tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_data, "IN_MEMORY_LIMIT", 0)                         # read per image: decoded during training
    victim = tree / "train" / "dog" / "img002.png"
    intact = victim.read_bytes()
    config = tiny_config(tmp_path / "run", dataset="imagefolder", data_dir=str(tree), batch_size=4, train_subset=0,
                         test_subset=0, mean="0.5", std="0.25", flops_target=0.5, epochs=3)

    def break_after_first_epoch(trainer: Trainer) -> None:
        if trainer.state.epoch == 1:
            truncate(victim)

    with pytest.raises(UserError, match="cannot decode image .*dog/img002.png") as error:
        Trainer(config).run(on_epoch=break_after_first_epoch)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "config.json"]
    victim.write_bytes(intact)                                                    # fixed: the run goes on from epoch 1
    report = Trainer(config).run(resume=True)
    assert [e["epoch"] for e in report["epochs"]] == [1, 2, 3]


def test_a_last_training_batch_of_one_image_trains(tmp_path: Path, fmnist: Dataset) -> None:
    # torchvision ResNet-18 on 28x28 reaches 1x1 maps: 129 = 128 + 1 images used to crash BatchNorm
    trainer = Trainer(tiny_config(tmp_path / "run", model="resnet18", train_subset=129, batch_size=128, test_subset=50,
                                  flops_target=0.5), fmnist)
    assert trainer.steps_per_epoch == 1 and any("is dropped" in line for line in trainer.decisions())
    report = trainer.run()
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]


def test_batch_size_one_where_batchnorm_sees_1x1_maps_is_refused_before_training(tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--model", "resnet18", "--batch-size", "1", "--train-subset", "8", "--out", str(out), *QUICK]) == 2
    assert "--batch-size 1" in one_error(capsys) and not out.exists()
    Trainer(tiny_config(tmp_path / "r20", batch_size=1, train_subset=8))             # ResNet-20's smallest maps are 7x7: fine


@pytest.mark.parametrize(("args", "message"), [
    (["--train-subset", "70000"], "--train-subset 70000 is more than the 60000 images"),
    (["--input-size", "32"], "--input-size 32: fashion-mnist images are 28x28"),
    (["--augment", "imagenet"], "--augment imagenet needs full-size images"),
    (["--mean", "0.5,0.5"], "--mean needs 1 finite value"),
    (["--std", "0"], "--std values must be"),
    (["--channel-multiple", "64", "--flops-target", "0.5"], "can only keep its full width"),
    (["--channel-multiple", "32", "--flops-target", "0.92"], "cannot be met"),
])
def test_settings_the_data_or_model_cannot_meet_are_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *QUICK, *args]) == 2
    assert message in one_error(capsys)
    assert not out.exists()


def test_a_channel_multiple_above_every_width_keeps_full_widths_at_target_one(tmp_path: Path, fmnist: Dataset) -> None:
    report = Trainer(tiny_config(tmp_path / "run", channel_multiple=64, flops_target=1.0, train_subset=128), fmnist).run()
    assert report["flops"]["ratio"] == 1.0 and all(layer["kept"] == layer["total"] for layer in report["layers"])


def test_without_quiet_each_epoch_and_its_progress_are_shown(tree: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Benchmarks (lapp_vs_dense) run `train` into log files without --quiet: the log shows each epoch's line
    and the step progress bar (which tests/training/test_reliability.py reads to time its kills)."""
    quick = [flag for flag in QUICK if flag != "--quiet"]
    assert main(["train", "--model", "resnet20", "--dataset", "imagefolder", "--data-dir", str(tree), "--flops-target", "0.5",
                 "--batch-size", "8", "--out", str(tmp_path / "run"), *quick]) == 0
    captured = capsys.readouterr()
    assert "epoch   1 [pruning]" in captured.out and "epoch   2 [slim" in captured.out, captured.out
    assert "epoch 1/2 [pruning]" in captured.err, captured.err
