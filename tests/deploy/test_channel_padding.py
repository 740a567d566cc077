"""Narrow channel spaces zero-padded to a kernel block (`deploy/backends/channel_padding.py`), and the ORT int8
backend's measured choice between the padded and the plain form (`onnxruntime_cpu.choose_channel_padding`).

The padded network must compute the same logits (fp32: to rounding; int8: the same Q/DQ numbers), for every
family LAPP slims, with removed branches; what the padder does not recognise stays as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lapp_edge.deploy.backends import LoadRequest
from lapp_edge.deploy.backends import onnxruntime_cpu
from lapp_edge.deploy.backends.channel_padding import channel_spaces, pad_channels
from lapp_edge.deploy.backends.onnxruntime_cpu import choose_channel_padding, qdq_model
from lapp_edge.deploy.bench import padding_line
from lapp_edge.export.onnx import export_onnx
from lapp_edge.models.fuse import fuse_model
from tests.lapp.test_block_removal import REMOVED_BY_MODEL, SHAPE, masked_and_removed

CALIBRATION = np.random.default_rng(0).standard_normal((64, *SHAPE)).astype(np.float32)


def conv(name: str, source: str, out: str, c_in: int, c_out: int, rng: np.random.Generator, group: int = 1) -> tuple[Any, list[Any]]:
    weight = numpy_helper.from_array(rng.standard_normal((c_out, c_in // group, 3, 3)).astype(np.float32) * 0.3, f"{name}.w")
    bias = numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32) * 0.1, f"{name}.b")
    return helper.make_node("Conv", [source, weight.name, bias.name], [out], name=name, pads=[1, 1, 1, 1], group=group), [weight, bias]


def small_graph(tail: str = "gemm") -> onnx.ModelProto:
    """x (N x 3 x 8 x 8) -> conv a (6) -> relu -> depthwise (6) -> clip -> + c (1 x 6 x 1 x 1) -> conv b (6) -> + (residual
    with a) -> max pool -> conv c (12) -> mean over H, W -> reshape N x 12 -> gemm (4). `tail` "output": conv b's
    space is also a graph output (so it may not be padded)."""
    rng = np.random.default_rng(0)
    convs = {name: conv(name, *args, rng) for name, args in (("a", ("x", "a", 3, 6)), ("b", ("k", "b", 6, 6)), ("c", ("p", "c", 6, 12)))}
    convs["dw"] = conv("dw", "ra", "dw", 6, 6, rng, group=6)
    tensors = [tensor for _, made in convs.values() for tensor in made]
    tensors += [numpy_helper.from_array(rng.standard_normal((1, 6, 1, 1)).astype(np.float32), "shift"),
                numpy_helper.from_array(np.array(0.0, np.float32), "low"), numpy_helper.from_array(np.array(6.0, np.float32), "high"),
                numpy_helper.from_array(np.array([2, 3], np.int64), "axes"), numpy_helper.from_array(np.array([-1, 12], np.int64), "shape"),
                numpy_helper.from_array(rng.standard_normal((4, 12)).astype(np.float32), "fc.w"),
                numpy_helper.from_array(np.zeros(4, np.float32), "fc.b")]
    nodes = [
        convs["a"][0], helper.make_node("Relu", ["a"], ["ra"]), convs["dw"][0], helper.make_node("Clip", ["dw", "low", "high"], ["cl"]),
        helper.make_node("Add", ["cl", "shift"], ["k"]), convs["b"][0], helper.make_node("Add", ["b", "a"], ["s"]),
        helper.make_node("MaxPool", ["s"], ["p"], kernel_shape=[2, 2], strides=[2, 2]), convs["c"][0],
        helper.make_node("ReduceMean", ["c", "axes"], ["m"], keepdims=1), helper.make_node("Reshape", ["m", "shape"], ["v"]),
        helper.make_node("Gemm", ["v", "fc.w", "fc.b"], ["y"], transB=1),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])]
    if tail == "output":
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, ["n", 6, 8, 8]))
    graph = helper.make_graph(nodes, "spaces", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])], outputs, tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model: onnx.ModelProto, x: np.ndarray, name: str = "x") -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})


def weight_dims(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
    return {node.name or node.output[0]: shapes[node.input[1]] for node in model.graph.node if node.op_type in ("Conv", "Gemm")}


def test_every_kind_of_member_is_padded_and_the_logits_do_not_change() -> None:
    model = small_graph()
    spaces = {space.width: space for space in channel_spaces(model)}
    assert sorted(spaces) == [6, 12] and not spaces[6].refused
    six = spaces[6]
    assert ([c.node.name for c in six.writers], [c.node.name for c in six.depthwise]) == (["a", "b"], ["dw"])
    assert sorted(c.node.name for c in six.readers) == ["b", "c"] and len(six.constants) == 1
    assert spaces[12].gemms and spaces[12].reshapes
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    before = run(model, x)[0]
    assert pad_channels(model, 8) == [(6, 8), (12, 16)]
    onnx.checker.check_model(model, full_check=True)
    assert weight_dims(model) == {"a": (8, 3, 3, 3), "dw": (8, 1, 3, 3), "b": (8, 8, 3, 3), "c": (16, 8, 3, 3), "y": (4, 16)}
    depthwise = next(node for node in model.graph.node if node.name == "dw")
    assert [a.i for a in depthwise.attribute if a.name == "group"] == [8]
    np.testing.assert_allclose(run(model, x)[0], before, rtol=1e-5, atol=1e-5)
    assert np.allclose(run(model, x[:1])[0], before[:1], rtol=1e-5, atol=1e-5)
    assert pad_channels(model, 8) == []                        # padded once, nothing narrow is left


def test_a_space_the_padder_cannot_follow_stays_as_it_is() -> None:
    model = small_graph("output")                              # the residual sum is also a graph output
    refused = [space for space in channel_spaces(model) if space.refused]
    assert [space.width for space in refused] == [6] and "graph output s" in refused[0].refused
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = run(model, x)
    assert pad_channels(model, 8) == [(12, 16)]
    assert weight_dims(model)["a"] == (6, 3, 3, 3)
    after = run(model, x)
    assert after[1].shape == (2, 6, 8, 8) and np.allclose(after[0], before[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="channel multiple"):
        pad_channels(model, 0)


def exported(name: str, tmp_path: Path) -> Path:
    _, removed, _ = masked_and_removed(name)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(export_onnx(fuse_model(removed), SHAPE))
    return path


@pytest.mark.parametrize("name", list(REMOVED_BY_MODEL))
def test_every_narrow_space_of_a_slim_family_member_is_padded_exactly(name: str, tmp_path: Path) -> None:
    path = exported(name, tmp_path)
    model = onnx.load(str(path))
    widths = sorted(space.width for space in channel_spaces(model))
    assert not [space.refused for space in channel_spaces(model) if space.refused]
    x = np.random.default_rng(3).standard_normal((4, *SHAPE)).astype(np.float32)
    before = run(model, x, "input")[0]
    padded = pad_channels(model, 16)
    assert sorted(width for width, _ in padded) == [width for width in widths if width % 16]
    assert all(target % 16 == 0 and 0 < target - width < 16 for width, target in padded)
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    dims = {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
    assert all(dims[node.input[1]][0] % 16 == 0 for node in convs)       # every conv now writes whole blocks
    after = run(model, x, "input")[0]
    assert float(np.abs(after - before).max()) <= 1e-5 * max(1.0, float(np.abs(before).max()))


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_the_padded_int8_model_gives_the_plain_int8_model_s_numbers(name: str, tmp_path: Path) -> None:
    """Zero channels neither widen an activation's range (MinMax includes 0) nor touch a real channel's weight
    scale, and integer accumulation is exact: the padded Q/DQ model's logits are the plain one's, bit for bit."""
    path = exported(name, tmp_path)
    plain = qdq_model(path, "input", CALIBRATION, tmp_path / "work", reduce_range=True)
    padded = qdq_model(path, "input", CALIBRATION, tmp_path / "work", reduce_range=True, pad_multiple=16)
    assert padded != plain and ".int8-qdq-xc-r7-p16." in padded.name
    x = np.random.default_rng(4).standard_normal((6, *SHAPE)).astype(np.float32)
    assert np.array_equal(run(onnx.load(str(padded)), x, "input")[0], run(onnx.load(str(plain)), x, "input")[0])


def request_for(path: Path, tmp_path: Path, multiple: int, batch: int = 4) -> LoadRequest:
    return LoadRequest(path, "input", SHAPE, "int8", 1, batch, tmp_path / "work", CALIBRATION, channel_multiple=multiple)


def test_the_backend_measures_both_forms_and_runs_the_one_it_chose(tmp_path: Path) -> None:
    path = exported("resnet20", tmp_path)
    runner = onnxruntime_cpu.BACKEND.load(request_for(path, tmp_path, 16))
    padding = runner.info.details["channel_padding"]
    assert padding["multiple"] == 16 and padding["spaces"] and 0.3 < padding["padded_over_plain"] < 3.0
    assert padding["used"] == (padding["padded_over_plain"] * onnxruntime_cpu.PADDING_MIN_SPEEDUP <= 1.0)
    assert ("-p16." in Path(runner.info.model_path).name) == padding["used"]
    x = np.random.default_rng(5).standard_normal((4, *SHAPE)).astype(np.float32)
    plain = onnxruntime_cpu.BACKEND.load(request_for(path, tmp_path, 0))
    assert "channel_padding" not in plain.info.details and "-p16." not in Path(plain.info.model_path).name
    assert np.array_equal(runner.infer(x), plain.infer(x))
    assert padding_line(padding, 4).startswith("channel spaces zero-padded to multiples of 16 (")


@pytest.mark.parametrize("ratio, chosen", [(0.90, "padded"), (0.99, "plain"), (1.2, "plain")])
def test_padding_is_run_only_where_it_measured_enough_faster(ratio: float, chosen: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice alone, the measurement replaced by a fixed ratio (the test above measures for real)."""
    path = exported("resnet20", tmp_path)
    plain = qdq_model(path, "input", CALIBRATION, tmp_path / "work", reduce_range=True)
    monkeypatch.setattr(onnxruntime_cpu, "padded_over_plain", lambda padded, plain, request: ratio)
    model_path, padding = choose_channel_padding(plain, request_for(path, tmp_path, 16), True)
    assert padding["used"] == (chosen == "padded") and padding["padded_over_plain"] == ratio
    assert (model_path == plain) == (chosen == "plain")


def test_a_network_with_no_narrow_space_is_not_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "wide.onnx"
    model = small_graph()
    pad_channels(model, 8)
    model.graph.input[0].name = "input"
    for node in model.graph.node:
        node.input[:] = ["input" if name == "x" else name for name in node.input]
    path.write_bytes(model.SerializeToString())
    monkeypatch.setattr(onnxruntime_cpu, "padded_over_plain", lambda *args: pytest.fail("measured"))
    request = LoadRequest(path, "input", (3, 8, 8), "int8", 1, 2, tmp_path / "work",
                          np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32), channel_multiple=8)
    plain = qdq_model(path, "input", request.calibration, request.work_dir, reduce_range=True)
    assert choose_channel_padding(plain, request, True) == (plain, {"multiple": 8, "spaces": [], "used": False})


def test_a_graph_the_padder_cannot_analyse_runs_plain_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The padder's own failure (here forced: its shape inference refusing the graph) costs the optimisation, not
    the compile: the plain int8 model runs and the runner's details say why nothing was padded."""
    path = exported("resnet20", tmp_path)

    def refuse(model: Any, multiple: int) -> Any:
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] a graph this onnx cannot infer")

    monkeypatch.setattr(onnxruntime_cpu, "pad_channels", refuse)
    runner = onnxruntime_cpu.BACKEND.load(request_for(path, tmp_path, 16))
    padding = runner.info.details["channel_padding"]
    assert padding["used"] is False and padding["spaces"] == [] and "InferenceError" in padding["skipped"]
    assert "-p16." not in Path(runner.info.model_path).name
    assert runner.infer(np.zeros((4, *SHAPE), np.float32)).shape == (4, 10)
