"""Shared fixtures: real Fashion-MNIST (skipped with a reason where it is not installed),
and small, seeded training configurations that finish in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lapp_edge.data.torch_data import DEFAULT_DATA_DIRS, Dataset, load_dataset
from lapp_edge.training.trainer import TrainConfig

FMNIST_DIR = Path(DEFAULT_DATA_DIRS["fashion-mnist"])


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fmnist() -> Dataset:
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (make test installs dataset-fashion-mnist)")
    return load_dataset("fashion-mnist")


def tiny_config(out: Path, **overrides: object) -> TrainConfig:
    """ResNet-20 on 640 images, 2 epochs (1 pruning), batch 64: ~10 pruning steps."""
    values: dict[str, object] = dict(
        out=str(out), model="resnet20", dataset="fashion-mnist", epochs=2, prune_epochs=1, flops_target=0.4,
        batch_size=64, train_subset=640, test_subset=500, progress=False, bn_recalibration_batches=4, threads=1,
    )
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]
