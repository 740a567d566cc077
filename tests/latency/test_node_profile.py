"""In-network scales (latency.node_profile): profiled conv nodes matched to layer signatures, the scales and their
normalisation, the table field they live in (numpy and torch lookups, the file), a refit that measures them on this
machine, and the refusals (another machine's table, a backend with no profiler)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lapp_edge.costs.latency_table import BatchTable, LayerTable, load_table, onnx_conv_layers, table_from_dict
from lapp_edge.deploy.backends import NodeProfileUnavailable, NodeTime, runtime_available
from lapp_edge.deploy.compile import OnnxModel
from lapp_edge.deploy.targets import load_target, runtime_version, target_machine_key
from lapp_edge.errors import UserError
from lapp_edge.latency.node_profile import apply_scales, conv_ms_by_signature, conv_signature, in_network_scales, profile_conv_ms

ROOT = Path(__file__).resolve().parents[2]
LATENCY = ROOT / "lapp_edge" / "resources" / "latency"
DENSE = LATENCY / "dense-resnet20-1x28x28.onnx"
RESNET20_SIGNATURES = {"conv k3x3 s1x1 p1x1 g1 28x28", "conv k3x3 s2x2 p1x1 g1 28x28", "conv k1x1 s2x2 p0x0 g1 28x28",
                       "conv k3x3 s1x1 p1x1 g1 14x14", "conv k3x3 s2x2 p1x1 g1 14x14", "conv k1x1 s2x2 p0x0 g1 14x14",
                       "conv k3x3 s1x1 p1x1 g1 7x7"}


def node(op: str, x: tuple[int, ...], w: tuple[int, ...], y: tuple[int, ...], us: float = 10.0, weight_at: int = 1) -> NodeTime:
    inputs = [x] + [()] * (weight_at - 1) + [w]
    return NodeTime("n", op, tuple(inputs), y, us)


@pytest.mark.parametrize("profiled, signature", [
    # ORT's NCHWc graph: channels padded to the block; the signature takes only kernel, stride, padding, input size
    (node("Conv", (32, 16, 28, 28), (16, 8, 3, 3), (32, 16, 28, 28)), "conv k3x3 s1x1 p1x1 g1 28x28"),
    (node("Conv", (1, 32, 14, 14), (64, 32, 1, 1), (1, 64, 7, 7)), "conv k1x1 s2x2 p0x0 g1 14x14"),
    (node("Conv", (1, 8, 7, 7), (8, 8, 3, 3), (1, 8, 4, 4)), "conv k3x3 s2x2 p1x1 g1 7x7"),         # odd size, stride 2
    (node("Conv", (1, 96, 14, 14), (96, 1, 3, 3), (1, 96, 14, 14)), "conv k3x3 s1x1 p1x1 dw 14x14"),  # depthwise
    (node("QLinearConv", (1, 8, 28, 28), (16, 8, 3, 3), (1, 16, 28, 28), weight_at=3), "conv k3x3 s1x1 p1x1 g1 28x28"),
    # OpenVINO: logical shapes; a depthwise conv is a GroupConvolution with G x 1 x 1 x kh x kw weights
    (node("GroupConvolution", (1, 96, 14, 14), (96, 1, 1, 3, 3), (1, 96, 7, 7)), "conv k3x3 s2x2 p1x1 dw 14x14"),
    (node("Convolution", (1, 1, 28, 28), (16, 1, 3, 3), (1, 16, 28, 28)), "conv k3x3 s1x1 p1x1 g1 28x28"),
])
def test_a_profiled_conv_is_matched_to_its_layer_signature(profiled: NodeTime, signature: str) -> None:
    assert conv_signature(profiled) == signature


@pytest.mark.parametrize("profiled", [
    node("Relu", (1, 8, 28, 28), (1, 8, 28, 28), (1, 8, 28, 28)),                   # not a conv
    NodeTime("n", "Conv", ((1, 8, 28, 28),), (1, 8, 28, 28), 1.0),                    # no weight shape
    node("QLinearConv", (1, 28, 28, 16), (16,), (1, 28, 28, 16), weight_at=3),       # ORT int8: prepacked weights
    node("Conv", (1, 8, 28, 28), (8, 8, 3, 3), (1, 8, 3, 3)),                         # no stride maps 28 onto 3
    node("Conv", (1, 8, -1, 28), (8, 8, 3, 3), (1, 8, 28, 28)),                       # a dynamic dimension
])
def test_a_node_that_is_not_a_readable_conv_has_no_signature(profiled: NodeTime) -> None:
    assert conv_signature(profiled) is None


def test_conv_time_is_summed_per_signature_in_ms() -> None:
    nodes = [node("Conv", (1, 16, 28, 28), (16, 16, 3, 3), (1, 16, 28, 28), 100.0),
             node("Conv", (1, 16, 28, 28), (16, 16, 3, 3), (1, 16, 28, 28), 50.0),
             node("Conv", (1, 16, 7, 7), (16, 16, 3, 3), (1, 16, 7, 7), 20.0),
             node("ReorderOutput", (1, 16, 7, 7), (), (1, 16, 7, 7), 999.0)]
    assert conv_ms_by_signature(nodes) == pytest.approx({"conv k3x3 s1x1 p1x1 g1 28x28": 0.15, "conv k3x3 s1x1 p1x1 g1 7x7": 0.02})


def two_shape_table() -> tuple[BatchTable, list[tuple[str, float, float]]]:
    big, small = "conv k3x3 s1x1 p1x1 g1 28x28", "conv k3x3 s1x1 p1x1 g1 7x7"
    layers = {big: LayerTable(big, [8, 16], [8, 16], [[1.0, 2.0], [2.0, 4.0]]),
              small: LayerTable(small, [8, 16], [8, 16], [[0.5, 1.0], [1.0, 2.0]])}
    dense = [(big, 16, 16), (big, 16, 16), (small, 16, 16)]
    table = BatchTable(1, layers, 0.0, 1.0, 10.0, 5.0, 0.0)
    return table, dense


def test_scales_move_weight_between_layer_shapes_and_keep_the_dense_sum() -> None:
    """Profiled: the 28x28 convs take 6 ms (table 8), the 7x7 one 3 ms (table 2): relative scales 0.75 : 1.5, normalised
    so the dense sum stays 10 ms; a network thinned only at 28x28 is then predicted slower than by the raw table."""
    table, dense = two_shape_table()
    thin_early = [("conv k3x3 s1x1 p1x1 g1 28x28", 8, 8), ("conv k3x3 s1x1 p1x1 g1 28x28", 8, 8), ("conv k3x3 s1x1 p1x1 g1 7x7", 16, 16)]
    before = float(table.sum_ms(thin_early)) / float(table.sum_ms(dense))
    scales = in_network_scales(table, dense, {"conv k3x3 s1x1 p1x1 g1 28x28": 6.0, "conv k3x3 s1x1 p1x1 g1 7x7": 3.0})
    assert scales.scales["conv k3x3 s1x1 p1x1 g1 7x7"] / scales.scales["conv k3x3 s1x1 p1x1 g1 28x28"] == pytest.approx(2.0)
    assert scales.table_ms == pytest.approx({"conv k3x3 s1x1 p1x1 g1 28x28": 8.0, "conv k3x3 s1x1 p1x1 g1 7x7": 2.0})
    apply_scales(table, scales.scales, dense)
    assert table.dense_table_ms == pytest.approx(10.0)
    after = float(table.sum_ms(thin_early)) / float(table.sum_ms(dense))
    assert after == pytest.approx((2 * 1.0 * 10 / 12 + 2.0 * 20 / 12) / 10.0) and after > before
    # measured again on a scaled table: the scales come from its unscaled points, not compounded
    again = in_network_scales(table, dense, {"conv k3x3 s1x1 p1x1 g1 28x28": 6.0, "conv k3x3 s1x1 p1x1 g1 7x7": 3.0})
    assert again.scales == pytest.approx(scales.scales)


def test_a_layer_shape_the_profile_did_not_see_is_refused() -> None:
    table, dense = two_shape_table()
    with pytest.raises(UserError, match="no conv of shape conv k3x3 s1x1 p1x1 g1 7x7"):
        in_network_scales(table, dense, {"conv k3x3 s1x1 p1x1 g1 28x28": 6.0})


def test_the_scale_is_in_every_lookup_the_file_and_the_torch_cost() -> None:
    from lapp_edge.lapp.latency_cost import _TorchLayer

    layer = LayerTable("conv k3x3 s1x1 p1x1 g1 28x28", [8, 16], [8, 16], [[1.0, 2.0], [2.0, 4.0]], in_network_scale=0.5)
    assert float(layer.lookup(12, 12)) == pytest.approx(0.5 * 2.25)
    torch_layer = _TorchLayer(layer, torch.device("cpu"), torch.float64)
    assert float(torch_layer.lookup(torch.tensor(12.0, dtype=torch.float64), torch.tensor(12.0, dtype=torch.float64))) == pytest.approx(0.5 * 2.25)
    shipped = json.loads(next(LATENCY.glob("layer-table-x86-ort-fp32-resnet20-*.json")).read_text())
    for batch in shipped["batches"].values():
        for entry in batch["layers"].values():
            entry.pop("in_network_scale", None)                      # a table written before the field: scale 1
    assert all(l.in_network_scale == 1.0 for b in table_from_dict(shipped, "t").batches.values() for l in b.layers.values())
    first = next(iter(shipped["batches"].values()))
    for bad in (0, -1.0, "x", True, float("nan")):
        next(iter(first["layers"].values()))["in_network_scale"] = bad
        with pytest.raises(UserError, match="in_network_scale"):
            table_from_dict(json.loads(json.dumps(shipped, allow_nan=True)), "t")


def test_a_backend_without_a_profiler_says_so() -> None:
    from lapp_edge.deploy.backends.base import Runner, RunnerInfo

    class Plain(Runner):
        info = RunnerInfo("some-backend", "1", "fp32", "fp32", 1, 1)

        def infer(self, batch: np.ndarray) -> np.ndarray:
            return batch

    with pytest.raises(NodeProfileUnavailable, match="some-backend reports no per-node times"):
        Plain().node_times(np.zeros((1, 1, 28, 28), np.float32), 1)


@pytest.mark.parametrize("target", ["x86-ort-fp32", "x86-openvino-f32"])
def test_the_runtime_profiles_every_conv_of_the_dense_network(tmp_path: Path, target: str) -> None:
    """Real sessions: ORT's session profile and OpenVINO's performance counters each report every ResNet-20 conv
    shape, with a positive time; asked of a runner loaded without profiling, they refuse."""
    profile = load_target(target)
    if not runtime_available(profile.backend):
        pytest.skip(f"{profile.backend} is not installed")
    model = OnnxModel(DENSE, "input", (1, 28, 28))
    measured = profile_conv_ms(model, profile, 1, tmp_path, compiles=1, runs=3)
    assert set(measured) == RESNET20_SIGNATURES and all(v > 0 for v in measured.values())
    from lapp_edge.deploy.compile import compile_runner

    with compile_runner(model, profile, 1, tmp_path / "plain") as runner, pytest.raises(NodeProfileUnavailable):
        runner.node_times(np.zeros((1, 1, 28, 28), np.float32), 1)


def this_machines_copy(tmp_path: Path) -> Path:
    """The shipped ORT fp32 ResNet-20 table of some machine, relabelled as measured on this one (the scales are
    measured here; the stored networks' ratios are another machine's, which a refit does not mind)."""
    source = sorted(LATENCY.glob("layer-table-x86-ort-fp32-resnet20-*.json"))[0]
    payload = json.loads(source.read_text())
    payload["machine"], payload["runtime"] = target_machine_key("onnxruntime-cpu"), runtime_version("onnxruntime-cpu")
    copy = tmp_path / "table.json"
    copy.write_text(json.dumps(payload))
    return copy


def test_refit_with_in_network_scales_measures_them_here_and_keeps_them(tmp_path: Path) -> None:
    from lapp_edge.latency.profile_layers import format_table_summary, refit_table

    if not runtime_available("onnxruntime-cpu"):
        pytest.skip("onnxruntime is not installed")
    copy = this_machines_copy(tmp_path)
    before = load_table(copy)
    dense = onnx_conv_layers(DENSE)
    scaled = load_table(refit_table(copy, in_network_scales=True))
    for batch, table in scaled.batches.items():
        record = table.validation["in_network_scales"]
        assert set(record["scales"]) == RESNET20_SIGNATURES
        assert {sig: l.in_network_scale for sig, l in table.layers.items()} == pytest.approx(record["scales"])
        assert [l.ms for l in table.layers.values()] == [l.ms for l in before.batches[batch].layers.values()]
        # the scales move weight between shapes; the dense network's sum is what it was
        assert table.dense_table_ms == pytest.approx(float(before.batches[batch].sum_ms(dense)), rel=1e-9)
        assert float(table.sum_ms(dense)) == pytest.approx(table.dense_table_ms)
    assert "in-network scales, batch 1" in format_table_summary(scaled, copy)
    # a refit without the flag measures nothing and keeps the scales and their record
    kept = load_table(refit_table(copy))
    for batch, table in kept.batches.items():
        assert table.validation["in_network_scales"] == scaled.batches[batch].validation["in_network_scales"]
        assert {s: l.in_network_scale for s, l in table.layers.items()} == {s: l.in_network_scale for s, l in scaled.batches[batch].layers.items()}


@pytest.mark.parametrize("field, value", [("machine", "Some Other CPU; avx2"), ("runtime", "onnxruntime 0.0.1")])
def test_another_machines_table_cannot_be_scaled_here(tmp_path: Path, field: str, value: str) -> None:
    """One line, exit 2, the file untouched: another machine's (or runtime's) points scaled by this machine's profile
    would be a mixture of two machines."""
    from lapp_edge.cli import main

    copy = this_machines_copy(tmp_path)
    payload = json.loads(copy.read_text())
    payload[field] = value
    copy.write_text(json.dumps(payload))
    before = copy.read_bytes()
    assert main(["profile-layers", "--refit", str(copy), "--in-network-scales", "--quiet"]) == 2
    assert copy.read_bytes() == before
