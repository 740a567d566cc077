"""Shared fixtures: real Fashion-MNIST (skipped with a reason where it is not installed, but a
failure where the environment says the data must be there: CI or LAPP_EDGE_REQUIRE_DATA set,
as `make test` does), and small, seeded training configurations that finish in seconds on a CPU."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lapp_edge.data.torch_data import DEFAULT_DATA_DIRS, Dataset, load_dataset
from lapp_edge.training.trainer import TrainConfig

FMNIST_DIR = Path(DEFAULT_DATA_DIRS["fashion-mnist"])
REQUIRE_DATA = ("CI", "LAPP_EDGE_REQUIRE_DATA")     # either set (not "", "0" or "false"): a missing dataset fails


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fmnist() -> Dataset:
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        required = [name for name in REQUIRE_DATA if os.environ.get(name, "").lower() not in ("", "0", "false")]
        if required:
            pytest.fail(f"Fashion-MNIST is not installed in {FMNIST_DIR} and {'/'.join(required)} says it must be "
                        "(make data installs dataset-fashion-mnist)", pytrace=False)
        pytest.skip("Fashion-MNIST is not installed (make test installs dataset-fashion-mnist)")
    return load_dataset("fashion-mnist")


# CI's machine has 2 cores and the suite runs one test at a time: in-process training takes both.
# (The same thread count in every run a test compares, so results stay bitwise reproducible.)
TRAIN_THREADS = min(2, os.cpu_count() or 1)


def tiny_config(out: Path, **overrides: object) -> TrainConfig:
    """ResNet-20 on 640 images, 2 epochs (1 pruning), batch 64: ~10 pruning steps."""
    values: dict[str, object] = dict(
        out=str(out), model="resnet20", dataset="fashion-mnist", epochs=2, prune_epochs=1, flops_target=0.4,
        batch_size=64, train_subset=640, test_subset=500, progress=False, bn_recalibration_batches=4,
        threads=TRAIN_THREADS,
    )
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


class StopRun(Exception):
    """Raised by `stop_after_epoch`'s hook: the run stops as a kill after that epoch's checkpoint would."""


def stop_after_epoch(epoch: int) -> Callable[[Any], None]:
    """An `on_epoch` hook for `Trainer.run` that stops the run once `epoch` epochs are complete."""
    def hook(trainer: Any) -> None:
        if trainer.state.epoch == epoch:
            raise StopRun
    return hook


def assert_train_refused(args: list[str], message: str, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lapp-edge train ARGS` (a tiny run into `out`) exits 2 with one line on stderr holding `message`, no
    traceback, and writes nothing."""
    from lapp_edge.cli import main

    assert main(["train", *args, "--train-subset", "64", "--epochs", "2", "--prune-epochs", "1", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and message in err, err
    assert not out.exists()
