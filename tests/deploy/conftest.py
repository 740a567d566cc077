"""A small real model package shared by the deploy-side tests (trained once per session)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lapp_edge.data.torch_data import Dataset
from lapp_edge.deploy.package import ModelPackage, load_package
from lapp_edge.export.package_writer import export_run
from lapp_edge.resources import TARGETS_DIR
from lapp_edge.training.trainer import Trainer
from tests.conftest import tiny_config


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, fmnist: Dataset) -> Path:
    """A dense ResNet-20 trained 2 epochs on 3000 images (real accuracy, ~80%)."""
    out = tmp_path_factory.mktemp("backends") / "run"
    Trainer(tiny_config(out, dense=True, epochs=2, prune_epochs=1, train_subset=3000, test_subset=500), fmnist).run()
    return out


@pytest.fixture(scope="session")
def package(trained_run: Path) -> ModelPackage:
    out = trained_run.parent / "models" / "tiny"
    export_run(trained_run, out, images=200)
    return load_package(out)


def changed_profile(name: str, tmp_path: Path, **changes: object) -> Path:
    """A copy of shipped profile `name` with fields changed (a value of None removes the field)."""
    payload = yaml.safe_load((TARGETS_DIR / f"{name}.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            payload.pop(key)
        else:
            payload[key] = value
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(payload))
    return path


def int8_weight_range(model: Any) -> int:
    """The largest |value| of the int8 weight tensors of a Q/DQ `onnx.ModelProto` (ORT's 7-bit range is [-64, 64])."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.INT8]
    assert weights, "a Q/DQ model holds int8 weights"
    return max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
