"""ORT int8: a per-channel constant an Add reads is expanded to the full map before quantizing
(`onnxruntime_cpu.expand_channel_constants`), since QLinearAdd broadcasts it one pixel at a time.

The constants come from removed residual branches (relu(x + c), `--block-removal`) in every family that removes
them; the expanded int8 model must compute what the broadcast one does, up to the rounding of the add kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lapp_edge.deploy.backends.onnxruntime_cpu import expand_channel_constants, qdq_model, static_qdq
from lapp_edge.export.onnx import export_onnx
from lapp_edge.models.fuse import fuse_model
from tests.lapp.test_block_removal import REMOVED_BY_MODEL, SHAPE, masked_and_removed

CALIBRATION = np.random.default_rng(0).standard_normal((64, *SHAPE)).astype(np.float32)


def constant_graph() -> onnx.ModelProto:
    """x (N x 4 x 6 x 6) -> relu(x + c) twice with one shared c (1 x 4 x 1 x 1), + d (4 x 1 x 1), + a full-shape e,
    then a global pool and + p on the 1 x 1 map, + a scalar s."""
    rng = np.random.default_rng(1)
    initializers = {
        "c": rng.standard_normal((1, 4, 1, 1)), "d": rng.standard_normal((4, 1, 1)), "e": rng.standard_normal((1, 4, 6, 6)),
        "p": rng.standard_normal((1, 4, 1, 1)), "s": np.array(0.5),
    }
    nodes = [
        helper.make_node("Add", ["x", "c"], ["a1"]), helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Add", ["c", "r1"], ["a2"]), helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("Add", ["r2", "d"], ["a3"]), helper.make_node("Add", ["a3", "e"], ["a4"]),
        helper.make_node("GlobalAveragePool", ["a4"], ["g"]), helper.make_node("Add", ["g", "p"], ["a5"]),
        helper.make_node("Add", ["a5", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 1, 1])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def logits_step(model: onnx.ModelProto) -> float:
    """The dequantization step (scale) of a Q/DQ model's output."""
    output = model.graph.output[0].name
    node = next(node for node in model.graph.node if output in node.output)
    assert node.op_type == "DequantizeLinear"
    scales = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    return float(scales[node.input[1]])


def add_constants(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Each Add's initializer input (name -> shape)."""
    shapes = {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
    return {name: shapes[name] for node in model.graph.node if node.op_type == "Add" for name in node.input if name in shapes}


def test_per_channel_constants_take_the_full_map_and_nothing_else_changes() -> None:
    model = constant_graph()
    x = np.random.default_rng(2).standard_normal((3, 4, 6, 6)).astype(np.float32)
    before = run(model, x)
    assert expand_channel_constants(model) == 3          # c twice (one expanded copy), d; not e, p (1 x 1 map), s
    constants = add_constants(model)
    assert constants == {"c.expanded_6x6": (1, 4, 6, 6), "d.expanded_6x6": (1, 4, 6, 6), "e": (1, 4, 6, 6),
                         "p": (1, 4, 1, 1), "s": ()}
    assert {tensor.name for tensor in model.graph.initializer} == set(constants)   # the originals are gone
    onnx.checker.check_model(model)
    assert np.array_equal(run(model, x), before)                                    # same numbers, any batch
    assert np.array_equal(run(model, x[:1]), before[:1])


def test_a_constant_over_the_size_limit_stays_broadcast() -> None:
    model = constant_graph()
    assert expand_channel_constants(model, max_elements=4 * 6 * 6 - 1) == 0
    assert add_constants(model)["c"] == (1, 4, 1, 1)


@pytest.mark.parametrize("name", list(REMOVED_BY_MODEL))
def test_int8_of_a_network_with_removed_blocks_expands_each_constant_and_computes_the_same(name: str, tmp_path: Path) -> None:
    _, removed, _ = masked_and_removed(name)
    path = tmp_path / "model.onnx"
    path.write_bytes(export_onnx(fuse_model(removed), SHAPE))
    expanded = onnx.load(str(qdq_model(path, "input", CALIBRATION, tmp_path / "work", reduce_range=True)))
    broadcast = onnx.load(str(static_qdq(path, "input", CALIBRATION, tmp_path / "work", "plain", "QUInt8",
                                         reduce_range=True)))
    # every removed block's constant reaches its add as a full map (through its Q/DQ pair)
    full_maps = [tensor for tensor in expanded.graph.initializer if ".expanded_" in tensor.name and len(tensor.dims) == 4]
    on_one_pixel = 1 if name == "resnet18" else 0     # ResNet-18's layer4 runs on 1 x 1 maps at 28 x 28: nothing to expand
    assert len(full_maps) == len(REMOVED_BY_MODEL[name]) - on_one_pixel   # (scales and zero points carry the name too)
    assert all(tensor.dims[0] == 1 and tensor.dims[2] * tensor.dims[3] > 1 for tensor in full_maps)
    assert not [tensor for tensor in broadcast.graph.initializer if ".expanded_" in tensor.name]
    x = np.random.default_rng(3).standard_normal((5, *SHAPE)).astype(np.float32)
    outputs = []
    for model in (expanded, broadcast):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        ops = {node.op_type for node in model.graph.node}
        assert "QuantizeLinear" in ops
        outputs.append(session.run(None, {"input": x})[0])
    # the same quantized values; ORT's broadcasting and full-map QLinearAdd kernels may round an element one step apart
    step = logits_step(broadcast)
    assert float(np.abs(outputs[0] - outputs[1]).max()) <= 2 * step + 1e-7
    assert (outputs[0].argmax(1) == outputs[1].argmax(1)).mean() >= 0.8
