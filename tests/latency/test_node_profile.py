"""In-network corrections (latency.node_profile): runtime nodes matched to the ONNX convs they run, the corrections
of a table's points and their unit, the table field they live in (numpy and torch lookups, the file), real per-node
profiles on ONNX Runtime and OpenVINO, a refit that measures them on this machine, and the refusals (another
machine's table, a backend or runner with no profiler)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lapp_edge.costs.latency_table import BatchTable, LayerTable, load_table, onnx_conv_layers, table_from_dict
from lapp_edge.deploy.backends import NodeProfileUnavailable, runtime_available
from lapp_edge.deploy.compile import OnnxModel, compile_runner
from lapp_edge.deploy.targets import load_target, runtime_version, target_machine_key
from lapp_edge.costs.latency_fit import measurably_lower
from lapp_edge.errors import UserError
from lapp_edge.latency.node_profile import (
    LayerTime, apply_corrections, conv_of_node, in_network_corrections, profile_layer_times,
)

ROOT = Path(__file__).resolve().parents[2]
LATENCY = ROOT / "lapp_edge" / "resources" / "latency"
DENSE = LATENCY / "dense-resnet20-1x28x28.onnx"


def graph_index(path: Path) -> tuple[dict[str, int], dict[str, onnx.NodeProto]]:
    graph = onnx.load(str(path)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    return {n.name: i for i, n in enumerate(convs)}, {o: n for n in graph.node for o in n.output}


@pytest.mark.parametrize("runtime_name, conv", [
    ("node_Conv_9/WithoutBiases", 1),            # OpenVINO keeps the node's name
    ("node_Conv_8_token_1", 0),                  # ORT int8 (QLinearConv) adds a token
    ("relu_1_nchwc", 1),                         # ORT NCHWc: the fused Relu's output tensor -> its conv
    ("conv2d_2_nchwc", 2),                       # ORT NCHWc with the residual sum fused: the conv's own output
    ("ReorderOutput_token_39", None),            # layout reorders run no conv
    ("input_f32_abcd_bf16_acdb_node_Conv_8/WithoutBiases", None),    # OpenVINO's input reorder before a conv
    ("node_linear", None),
])
def test_a_runtime_node_is_matched_to_the_onnx_conv_it_runs(runtime_name: str, conv: int | None) -> None:
    names, producers = graph_index(DENSE)
    assert conv_of_node(runtime_name, names, producers) == conv


def grid_table() -> tuple[BatchTable, list[tuple[str, float, float]]]:
    big, small, unseen = "conv k3x3 s1x1 p1x1 g1 28x28", "conv k3x3 s1x1 p1x1 g1 7x7", "conv k1x1 s2x2 p0x0 g1 28x28"
    layers = {big: LayerTable(big, [8, 16], [8, 16], [[1.0, 2.0], [2.0, 4.0]]),
              small: LayerTable(small, [8, 16], [8, 16], [[0.5, 1.0], [1.0, 2.0]]),
              unseen: LayerTable(unseen, [8, 16], [8, 16], [[0.1, 0.2], [0.2, 0.4]])}
    dense = [(big, 16, 16), (big, 16, 16), (small, 16, 16), (unseen, 16, 16)]
    return BatchTable(1, layers, 0.0, 1.0, 10.4, 5.0, 0.0), dense


def same_corrections(a: dict[str, list[list[float]]], b: dict[str, list[list[float]]]) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[key], b[key]) for key in a)


def test_corrections_are_per_observed_point_in_the_tables_units() -> None:
    """In-network / isolated: 28x28 (16,16) 0.5 (twice observed: median), (8,8) 1.0; 7x7 (16,16) 1.0. Unit: their
    median (1.0). The 28x28 shape's unobserved points take its median (0.75), the 7x7 shape's its one (1.0), the
    shape never observed 1; off-grid widths and unknown shapes are not used."""
    table, dense = grid_table()
    seen = [LayerTime("conv k3x3 s1x1 p1x1 g1 28x28", 16, 16, 2000.0), LayerTime("conv k3x3 s1x1 p1x1 g1 28x28", 16, 16, 2000.0),
            LayerTime("conv k3x3 s1x1 p1x1 g1 28x28", 8, 8, 1000.0), LayerTime("conv k3x3 s1x1 p1x1 g1 7x7", 16, 16, 2000.0),
            LayerTime("conv k3x3 s1x1 p1x1 g1 7x7", 12, 16, 99_000.0),          # off the grid
            LayerTime("conv k3x3 s1x1 p1x1 g1 14x14", 16, 16, 99_000.0)]        # a shape the table lacks
    found = in_network_corrections(table, seen)
    assert found.unit == pytest.approx(1.0) and found.observed_points == 3 and found.total_points == 12
    assert np.allclose(found.corrections["conv k3x3 s1x1 p1x1 g1 28x28"], [[1.0, 0.75], [0.75, 0.5]])
    assert np.allclose(found.corrections["conv k3x3 s1x1 p1x1 g1 7x7"], [[1.0, 1.0], [1.0, 1.0]])
    assert found.corrections["conv k1x1 s2x2 p0x0 g1 28x28"] == [[1.0, 1.0], [1.0, 1.0]]
    # every observation twice as slow (another process, a slower moment): the unit takes it, the corrections do not move
    doubled = in_network_corrections(table, [LayerTime(s.signature, s.c_in, s.c_out, 2 * s.us) for s in seen])
    assert doubled.unit == pytest.approx(2.0) and same_corrections(doubled.corrections, found.corrections)
    apply_corrections(table, found.corrections, dense)
    assert float(table.layers["conv k3x3 s1x1 p1x1 g1 28x28"].lookup(16, 16)) == pytest.approx(2.0)
    assert table.dense_table_ms == pytest.approx(2 * 2.0 + 2.0 + 0.4)
    apply_corrections(table, None, dense)
    assert table.dense_table_ms == pytest.approx(2 * 4.0 + 2.0 + 0.4)
    # measured again on a corrected table: from its isolated points, not compounded
    apply_corrections(table, found.corrections, dense)
    assert same_corrections(in_network_corrections(table, seen).corrections, found.corrections)


def test_no_observation_on_the_grid_is_refused() -> None:
    table, _ = grid_table()
    with pytest.raises(UserError, match="no profiled layer fell on a point"):
        in_network_corrections(table, [LayerTime("conv k3x3 s1x1 p1x1 g1 28x28", 12, 12, 5.0)])


def test_the_corrections_are_in_every_lookup_the_file_and_the_torch_cost() -> None:
    from lapp_edge.lapp.latency_cost import _TorchLayer

    layer = LayerTable("conv k3x3 s1x1 p1x1 g1 28x28", [8, 16], [8, 16], [[1.0, 2.0], [2.0, 4.0]], in_network=[[0.5, 0.5], [0.5, 1.0]])
    assert float(layer.lookup(16, 16)) == pytest.approx(4.0) and float(layer.lookup(8, 16)) == pytest.approx(1.0)
    assert float(layer.lookup(12, 12)) == pytest.approx((0.5 + 1.0 + 1.0 + 4.0) / 4)
    torch_layer = _TorchLayer(layer, torch.device("cpu"), torch.float64)
    twelve = torch.tensor(12.0, dtype=torch.float64)
    assert float(torch_layer.lookup(twelve, twelve)) == pytest.approx(float(layer.lookup(12, 12)))
    shipped = json.loads(next(LATENCY.glob("layer-table-x86-ort-fp32-resnet20-*.json")).read_text())
    for batch in shipped["batches"].values():
        for entry in batch["layers"].values():
            entry.pop("in_network", None)                            # a table written before the field: none
    assert all(l.in_network is None for b in table_from_dict(shipped, "t").batches.values() for l in b.layers.values())
    entry = next(iter(next(iter(shipped["batches"].values()))["layers"].values()))
    rows, columns = len(entry["ms"]), len(entry["c_out_grid"])
    for bad in ([[1.0] * columns] * (rows + 1), [[1.0] * (columns + 1)] * rows, [[0.0] * columns] * rows,
                [["x"] * columns] * rows, 1.0, [[True] * columns] * rows):
        entry["in_network"] = bad
        with pytest.raises(UserError, match="in_network"):
            table_from_dict(json.loads(json.dumps(shipped)), "t")


def test_a_backend_without_a_profiler_says_so() -> None:
    from lapp_edge.deploy.backends.base import Runner, RunnerInfo

    class Plain(Runner):
        info = RunnerInfo("some-backend", "1", "fp32", "fp32", 1, 1)

        def infer(self, batch: np.ndarray) -> np.ndarray:
            return batch

    with pytest.raises(NodeProfileUnavailable, match="some-backend reports no per-node times"):
        Plain().node_times(np.zeros((1, 1, 28, 28), np.float32), 1)


@pytest.mark.parametrize("target", ["x86-ort-fp32", "x86-openvino-f32", "x86-openvino-bf16"])
def test_the_runtime_profiles_every_conv_of_a_network(tmp_path: Path, target: str) -> None:
    """Real sessions: ORT's session profile and OpenVINO's performance counters each report all 21 convs of the dense
    ResNet-20 and of a LAPP-shaped slim one (widths off the 16-channel block), matched to their ONNX convs with
    positive times; a runner loaded without profiling refuses."""
    profile = load_target(target)
    if not runtime_available(profile.backend):
        pytest.skip(f"{profile.backend} is not installed")
    for onnx_path in (DENSE, LATENCY / "slim-resnet20-1x28x28.onnx"):
        model = OnnxModel(onnx_path, "input", (1, 28, 28))
        times = profile_layer_times(model, profile, 1, tmp_path / onnx_path.stem, runs=3)
        assert [(t.signature, t.c_in, t.c_out) for t in times] == [tuple(l) for l in onnx_conv_layers(onnx_path)]
        assert all(t.us > 0 for t in times)
    with compile_runner(OnnxModel(DENSE, "input", (1, 28, 28)), profile, 1, tmp_path / "plain") as runner, \
            pytest.raises(NodeProfileUnavailable):
        runner.node_times(np.zeros((1, 1, 28, 28), np.float32), 1)


def this_machines_copy(tmp_path: Path) -> Path:
    """A shipped ORT fp32 ResNet-20 table relabelled as measured on this machine (the corrections are measured here;
    the stored networks' ratios are another machine's, which a refit does not mind)."""
    source = sorted(LATENCY.glob("layer-table-x86-ort-fp32-resnet20-*.json"))[0]
    payload = json.loads(source.read_text())
    payload["machine"], payload["runtime"] = target_machine_key("onnxruntime-cpu"), runtime_version("onnxruntime-cpu")
    copy = tmp_path / "table.json"
    copy.write_text(json.dumps(payload))
    return copy


@pytest.mark.slow
def test_refit_with_in_network_measures_the_corrections_here_and_keeps_them(tmp_path: Path) -> None:
    """About a minute: 24 calibration networks profiled at batches 1 and 32."""
    from lapp_edge.latency.profile_layers import format_table_summary, refit_table

    if not runtime_available("onnxruntime-cpu"):
        pytest.skip("onnxruntime is not installed")
    copy = this_machines_copy(tmp_path)
    before = load_table(copy)
    corrected = load_table(refit_table(copy, in_network=True))
    for batch, table in corrected.batches.items():
        record = table.validation["in_network"]
        assert record["networks"] == len(table.validation["configurations"]) and 0 < record["observed_points"] <= record["total_points"]
        # kept unless the fit is measurably better without (the stored networks are another machine's here: either)
        assert record["kept"] == (not measurably_lower(record["table_fit_without_pct"], record["table_fit_with_pct"]))
        assert all((layer.in_network is not None) == record["kept"] for layer in table.layers.values())
        assert table.validation["table_fit"]["median_abs_pct"] == pytest.approx(
            record["table_fit_with_pct"] if record["kept"] else record["table_fit_without_pct"])
        assert [l.ms for l in table.layers.values()] == [l.ms for l in before.batches[batch].layers.values()]
        assert table.dense_table_ms == pytest.approx(float(table.sum_ms(onnx_conv_layers(DENSE))))
    summary = format_table_summary(corrected, copy)
    assert "batch 32: in-network corrections " in summary and "from 24 networks" in summary
    kept = load_table(refit_table(copy))                 # without the flag: nothing measured, the corrections kept
    for batch, table in kept.batches.items():
        assert table.validation["in_network"] == corrected.batches[batch].validation["in_network"]
        assert [l.in_network for l in table.layers.values()] == [l.in_network for l in corrected.batches[batch].layers.values()]


@pytest.mark.parametrize("field, value", [("machine", "Some Other CPU; avx2"), ("runtime", "onnxruntime 0.0.1")])
def test_another_machines_table_cannot_be_corrected_here(tmp_path: Path, field: str, value: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """One line, exit 2, the file untouched: another machine's points corrected by this machine's profile would be a
    mixture of two machines."""
    from lapp_edge.cli import main

    copy = this_machines_copy(tmp_path)
    payload = json.loads(copy.read_text())
    payload[field] = value
    copy.write_text(json.dumps(payload))
    before = copy.read_bytes()
    assert main(["profile-layers", "--refit", str(copy), "--in-network", "--quiet"]) == 2
    assert copy.read_bytes() == before
    error = capsys.readouterr().err.strip()
    assert "was measured with another" in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("target", ["gpu-tensorrt-fp16", "gpu-torch-cuda-fp16"])
def test_a_target_without_a_profiler_is_refused_before_anything_is_measured(tmp_path: Path, target: str,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from lapp_edge.cli import main

    assert main(["profile-layers", "--target", target, "--in-network", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert "reports no per-node times" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
