"""In-network corrections for a layer table: what each layer point costs inside a network, by the runtime's own
per-node profiler, against what the point measured alone says.

Why: `profile-layers` measures every layer shape alone (parallel copies, `profile_point`). Inside a network some
points cost quite differently: on the AVX-512 EPYC without AVX-VNNI, OpenVINO f32 at batch 1 ran the dense
ResNet-20's stride-2 28x28 conv (16 -> 32 channels) in 17 us where its isolated point says 38 us, while the same
shape at 16 -> 8 matched (10 us); ORT fp32 at batch 32 ran the 7x7 convs at 0.92 of their points and the 28x28 ones
at 0.77. Such points bend the table's sums, and with them its predictions of the networks LAPP trains (which thin one
stage and keep another): docs/RESULTS.md, "In-network corrections".

How: a set of calibration networks (the dense one and random widths drawn with another seed than the fit's
networks, `latency.calibrate.draw_configs`; the fit's held-out error stays measured on networks the corrections
never saw) is compiled on the target with the runtime's per-node profiler on (`Runner.node_times`: ORT's session
profile, OpenVINO's performance counters). Every profiled conv is matched to its ONNX conv (`conv_of_node`) and so to
its (layer signature, c_in, c_out). For each table point observed exactly (widths on the grid), its correction is
median in-network time / (unit x isolated time), where the unit (the median of in-network / isolated over all
observed points) keeps the table's units; a point not observed takes its layer shape's median correction, a shape
never observed 1. The corrections multiply the isolated points in every lookup (`LayerTable.in_network`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.costs.latency_table import BatchTable, onnx_conv_layers
from lapp_edge.deploy.backends import NodeProfileUnavailable, NodeTime
from lapp_edge.deploy.compile import OnnxModel, compile_runner
from lapp_edge.deploy.targets import TargetProfile
from lapp_edge.errors import UserError

NODE_PROFILE_RUNS = {1: 100, 32: 20}    # profiled inferences per network by batch (others: 20); medians per node
PASS_THROUGH = ("Relu", "Clip", "Add", "Sum", "QuantizeLinear", "DequantizeLinear")   # fused after a conv by runtimes
_SUFFIXES = (re.compile(r"_token_\d+$"), re.compile(r"_nchwc$"), re.compile(r"/.*$"))


@dataclass(frozen=True)
class LayerTime:
    """One conv of a network as profiled inside it: its layer signature, widths, and median time (us per run)."""

    signature: str
    c_in: int
    c_out: int
    us: float


def conv_of_node(name: str, conv_names: dict[str, int], producers: dict[str, Any]) -> int | None:
    """The index (in graph order) of the ONNX Conv a runtime node runs, or None. Runtimes name fused nodes after the
    original: OpenVINO keeps the node's name ("node_Conv_8/WithoutBiases"), ORT's int8 kernels add a token
    ("node_Conv_8_token_1"), ORT's NCHWc convs take their output tensor's name ("relu_1_nchwc": the Relu after the
    conv it fused). A tensor is followed back through PASS_THROUGH ops to the conv that produced it."""
    candidates = [name]
    for pattern in _SUFFIXES:
        stripped = pattern.sub("", candidates[-1])
        if stripped != candidates[-1]:
            candidates.append(stripped)
    for candidate in candidates:
        if candidate in conv_names:
            return conv_names[candidate]
    for candidate in candidates:                         # a tensor name: walk back to its conv (a few ops at most)
        tensors = [candidate]
        for _ in range(4):
            nodes = [producers[t] for t in tensors if t in producers]
            conv = next((n for n in nodes if n.op_type in ("Conv", "QLinearConv") and n.name in conv_names), None)
            if conv is not None:
                return conv_names[conv.name]
            tensors = [t for n in nodes if n.op_type in PASS_THROUGH for t in n.input]
            if not tensors:
                break
    return None


def conv_layer_times(nodes: list[NodeTime], onnx_path: str | Path) -> list[LayerTime]:
    """The profiled nodes that run a conv of the ONNX model at `onnx_path`, as LayerTimes (a conv a runtime split into
    several nodes is summed; nodes that run no conv are left out)."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    convs = [node for node in graph.node if node.op_type == "Conv"]
    conv_names = {node.name: index for index, node in enumerate(convs) if node.name}
    producers = {output: node for node in graph.node for output in node.output}
    layers = onnx_conv_layers(onnx_path)
    per_conv: dict[int, float] = defaultdict(float)
    for node in nodes:
        index = conv_of_node(node.name, conv_names, producers)
        if index is not None:
            per_conv[index] += node.us
    return [LayerTime(layers[i][0], int(layers[i][1]), int(layers[i][2]), us) for i, us in sorted(per_conv.items())]


def profile_layer_times(onnx_model: OnnxModel, profile: TargetProfile, batch: int, work: Path,
                        calibration: np.ndarray | None = None, runs: int | None = None, seed: int = 0) -> list[LayerTime]:
    """Every conv of `onnx_model` as profiled inside it on `profile`'s runtime at `batch` (one fresh compile, `runs`
    profiled inferences after as many unprofiled warm-up ones; default NODE_PROFILE_RUNS). Raises
    NodeProfileUnavailable where the backend has no profiler or no profiled node could be matched to a conv."""
    runs = runs or NODE_PROFILE_RUNS.get(batch, 20)
    data = np.random.default_rng(seed).standard_normal((batch, *onnx_model.input_shape)).astype(np.float32)
    with compile_runner(onnx_model, profile, batch, work, calibration, profile_nodes=True) as runner:
        for _ in range(runs):
            runner.infer(data)
        times = conv_layer_times(runner.node_times(data, runs), onnx_model.onnx_path)
    if not times:
        raise NodeProfileUnavailable(f"{profile.name}: no node of the runtime's profile could be matched to a conv of "
                                     f"{onnx_model.onnx_path.name}")
    return times


@dataclass(frozen=True)
class InNetworkCorrections:
    """Per layer signature, the correction of each table point (rows x columns as `LayerTable.ms`), and what they
    came from: the unit (median in-network / isolated over observed points), how many points were observed, and the
    per-signature median correction unobserved points took."""

    corrections: dict[str, list[list[float]]]
    unit: float
    observed_points: int
    total_points: int
    signature_medians: dict[str, float]

    def record(self) -> dict[str, Any]:
        return {"unit": self.unit, "observed_points": self.observed_points, "total_points": self.total_points,
                "signature_medians": self.signature_medians}


def in_network_corrections(table: BatchTable, observations: list[LayerTime]) -> InNetworkCorrections:
    """Corrections of `table`'s points (module docstring) from layer times profiled inside networks. Observations off
    the grid (a width no grid point holds) or of a shape the table lacks are not used. Raises UserError where none
    falls on a grid point."""
    at_point: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for seen in observations:
        layer = table.layers.get(seen.signature)
        if layer is None or seen.c_out not in layer.c_out_grid or (not layer.tied and seen.c_in not in layer.c_in_grid):
            continue
        row = 0 if layer.tied else layer.c_in_grid.index(seen.c_in)
        at_point[(seen.signature, row, layer.c_out_grid.index(seen.c_out))].append(seen.us / 1000.0)
    if not at_point:
        raise UserError("no profiled layer fell on a point of the latency table (widths off its grid)")
    ratio = {key: float(np.median(ms)) / table.layers[key[0]].ms[key[1]][key[2]] for key, ms in at_point.items()}
    unit = float(np.median(list(ratio.values())))
    per_signature: dict[str, list[float]] = defaultdict(list)
    for (signature, _, _), value in ratio.items():
        per_signature[signature].append(value / unit)
    medians = {signature: float(np.median(values)) for signature, values in sorted(per_signature.items())}
    corrections = {}
    for signature, layer in table.layers.items():
        fill = medians.get(signature, 1.0)
        corrections[signature] = [[ratio[(signature, i, o)] / unit if (signature, i, o) in ratio else fill
                                   for o in range(len(layer.c_out_grid))] for i in range(len(layer.ms))]
    total = sum(len(layer.ms) * len(layer.c_out_grid) for layer in table.layers.values())
    return InNetworkCorrections(corrections, unit, len(ratio), total, medians)


def apply_corrections(table: BatchTable, corrections: dict[str, list[list[float]]] | None,
                      dense_layers: list[tuple[str, float, float]]) -> None:
    """Set every layer table's in-network corrections (None: none) and the dense sum they imply
    (`BatchTable.dense_table_ms`), in place."""
    for signature, layer in table.layers.items():
        layer.in_network = None if corrections is None else corrections.get(signature)
    table.dense_table_ms = float(table.sum_ms(dense_layers))


__all__ = ["InNetworkCorrections", "LayerTime", "NodeProfileUnavailable", "apply_corrections", "conv_layer_times",
           "conv_of_node", "in_network_corrections", "profile_layer_times"]
