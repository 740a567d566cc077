"""A valid model package made without training, for tests of the package readers: model.onnx
is Flatten + Gemm (1x28x28 -> 10 classes, seeded weights), the manifest follows the contract
in lapp_edge/deploy/package.py, every file is hashed. ONNX Runtime loads it in milliseconds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"


def tiny_onnx_bytes(seed: int = 0) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((784, 10)).astype(np.float32) * 0.01, "fc.weight")
    bias = numpy_helper.from_array(np.zeros(10, np.float32), "fc.bias")
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tiny_manifest(files: dict[str, str]) -> dict[str, Any]:
    return {
        "format": 1, "model": "tiny-linear", "dataset": "fashion-mnist",
        "input": {"name": "input", "shape": [1, 28, 28], "mean": [0.286], "std": [0.353], "layout": "NCHW"},
        "output": {"name": "logits", "num_classes": 10}, "class_names": [f"c{i}" for i in range(10)],
        "widths": {"fc": 10}, "dense_widths": {"fc": 10},
        "flops": {"dense_macs": 7840.0, "slim_macs": 7840.0, "ratio": 1.0}, "params": {"dense": 7850, "slim": 7850},
        "figures": {"dense": {"macs": 7840.0, "params": 7850.0, "activations": 10.0},
                    "slim": {"macs": 7840.0, "params": 7850.0, "activations": 10.0}},
        "files": files,
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def rehash(directory: Path) -> None:
    """Recompute the sha256 of every listed file that is a regular file (what an attacker holding
    the package can always do: the manifest itself is not signed)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    for name in manifest["files"]:
        path = directory / name
        if path.is_file() and not path.is_symlink():
            manifest["files"][name] = sha256(path)
    write_manifest(directory, manifest)


def write_tiny_package(directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True)
    (directory / MODEL_FILE).write_bytes(tiny_onnx_bytes(seed))
    write_manifest(directory, tiny_manifest({MODEL_FILE: sha256(directory / MODEL_FILE)}))
    return directory
