"""In-network scales for a layer table: what each layer shape costs inside the dense network, by the runtime's
own per-node profiler, against what its isolated table points say.

Why: `profile-layers` measures every layer shape alone (parallel copies, `profile_point`). Inside a network a
layer's cost differs by shape: ORT's per-node profile of the dense ResNet-20 (fp32, batch 32, AVX-512 EPYC
without AVX-VNNI) put its 7x7 convs at 0.92 of their table points and its 28x28 convs at 0.77, so the table gave
the 28x28 stage too much of the network's time and the 7x7 stage too little. A network LAPP trains keeps its last
stage wide and thins the first (`--keep-blocks 1` packages), and the table predicted those 5.7% fast at batch 32
and 6.3% at batch 1 while fitting random-width networks within 1-3% (docs/RESULTS.md, "In-network scales").

One scale per layer signature: s_sig = (dense network's measured conv time of that signature / the table's dense
sum of it), normalised so that the scaled table's dense sum equals the unscaled one (the scales move weight
between layer shapes; the fit's constant and scale keep their meaning). Measured on the dense network only, so
the held-out error over the table's random networks stays honest. The profiler: ORT's session profile (per-node
`kernel_time`), OpenVINO's performance counters (`PERF_COUNT`), through `Runner.node_times`
(`deploy.backends`); other backends have none and their tables keep scale 1.

Matching a profiled node to a layer signature: its weight's kernel, the input's height and width, the stride
that maps them onto the output's, "same" padding ((k - 1) / 2: every conv of the model families here), and
depthwise where the weight has one input channel per group and the input more than one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lapp_edge.costs.latency_table import BatchTable, LayerTable, layer_signature
from lapp_edge.deploy.backends import NodeProfileUnavailable, NodeTime
from lapp_edge.deploy.compile import OnnxModel, compile_runner
from lapp_edge.deploy.targets import TargetProfile
from lapp_edge.errors import UserError

CONV_OPS = {"Conv": 1, "FusedConv": 1, "NchwcConv": 1, "QLinearConv": 3,        # ONNX Runtime: op -> weight input
            "Convolution": 1, "GroupConvolution": 1}                             # OpenVINO
NODE_PROFILE_RUNS = 60          # inferences profiled per compile (medians per node)
NODE_PROFILE_COMPILES = 3       # fresh compiles; the per-signature sums' median over them


def conv_signature(node: NodeTime) -> str | None:
    """The layer signature (`costs.latency_table.layer_signature`) of a profiled conv node, or None where the
    node is not a conv or its shapes cannot be read (module docstring: how)."""
    weight_index = CONV_OPS.get(node.op)
    if weight_index is None or len(node.input_shapes) <= weight_index:
        return None
    x, w, y = node.input_shapes[0], node.input_shapes[weight_index], node.output_shape
    if len(x) != 4 or len(y) != 4 or len(w) not in (4, 5) or min(*x[1:], *y[2:], *w) <= 0:
        return None
    kernel = (w[-2], w[-1])
    padding = ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
    strides = []
    for axis in (0, 1):
        size, out = x[2 + axis], y[2 + axis]
        found = [s for s in range(1, 5) if (size + 2 * padding[axis] - kernel[axis]) // s + 1 == out]
        if not found:
            return None
        strides.append(found[0])
    grouped_5d = len(w) == 5                     # OpenVINO's GroupConvolution: G x O/G x I/G x kh x kw
    depthwise = (grouped_5d and w[1] == 1 and w[2] == 1 and w[0] == x[1]) or (not grouped_5d and w[1] == 1 and x[1] > 1)
    groups = w[0] if grouped_5d else 1
    return layer_signature(kernel, (strides[0], strides[1]), padding, depthwise, groups, (x[2], x[3]))


def conv_ms_by_signature(nodes: list[NodeTime]) -> dict[str, float]:
    """Sum of profiled conv time per layer signature, ms per inference (nodes that are not convs left out)."""
    sums: dict[str, float] = defaultdict(float)
    for node in nodes:
        signature = conv_signature(node)
        if signature is not None:
            sums[signature] += node.us / 1000.0
    return dict(sums)


def profile_conv_ms(onnx_model: OnnxModel, profile: TargetProfile, batch: int, work: Path,
                    calibration: np.ndarray | None = None, compiles: int = NODE_PROFILE_COMPILES,
                    runs: int = NODE_PROFILE_RUNS, seed: int = 0) -> dict[str, float]:
    """Per layer signature, the conv time (ms per inference) of `onnx_model` on `profile`'s runtime at `batch`, by
    the runtime's per-node profiler: median over `compiles` fresh compiles of `runs` profiled inferences each
    (after `runs // 4` unprofiled warm-up ones). Raises NodeProfileUnavailable where the backend has no profiler."""
    data = np.random.default_rng(seed).standard_normal((batch, *onnx_model.input_shape)).astype(np.float32)
    per_compile: list[dict[str, float]] = []
    for index in range(compiles):
        with compile_runner(onnx_model, profile, batch, work / f"node-profile-b{batch}-{index}", calibration,
                            profile_nodes=True) as runner:
            per_compile.append(conv_ms_by_signature(runner.node_times(data, runs)))
    signatures = set().union(*per_compile)
    if not signatures:
        raise NodeProfileUnavailable(
            f"{profile.name}: the runtime's node profile shows no conv whose shapes this project can read (ONNX Runtime "
            "int8 runs QLinearConv on prepacked weights, shapes unreported); its table keeps in-network scale 1")
    return {sig: float(np.median([found.get(sig, 0.0) for found in per_compile])) for sig in sorted(signatures)}


@dataclass(frozen=True)
class InNetworkScales:
    """Per layer signature, its in-network scale (module docstring), and what it came from: the dense network's
    profiled conv ms and the table's dense sum of that signature (ms, unscaled)."""

    scales: dict[str, float]
    measured_ms: dict[str, float]
    table_ms: dict[str, float]

    def record(self) -> dict[str, dict[str, float]]:
        return {"scales": self.scales, "dense_profiled_ms": self.measured_ms, "dense_table_ms": self.table_ms}


def in_network_scales(table: BatchTable, dense_layers: list[tuple[str, float, float]],
                      measured_ms: dict[str, float]) -> InNetworkScales:
    """The in-network scale of every layer shape of `table` (module docstring) from the dense network's
    (signature, c_in, c_out) triples and its profiled conv ms per signature. Raises UserError where a layer shape
    of the dense network has no profiled time (the profile and the table disagree on the network)."""
    table_ms: dict[str, float] = defaultdict(float)
    for signature, c_in, c_out in dense_layers:
        layer = table.layers.get(signature)
        if layer is None:
            raise UserError(f"the latency table has no entry for layer '{signature}'")
        table_ms[signature] += _unscaled(layer, c_in, c_out)
    missing = sorted(sig for sig in table_ms if measured_ms.get(sig, 0.0) <= 0.0)
    if missing:
        raise UserError(f"the runtime's node profile of the dense network shows no conv of shape {', '.join(missing)} "
                        f"(profiled: {', '.join(sorted(measured_ms)) or 'none'})")
    raw = {sig: measured_ms[sig] / table_ms[sig] for sig in table_ms}
    norm = sum(table_ms.values()) / sum(raw[sig] * table_ms[sig] for sig in table_ms)
    return InNetworkScales({sig: raw[sig] * norm for sig in sorted(table_ms)},
                           {sig: measured_ms[sig] for sig in sorted(table_ms)}, dict(sorted(table_ms.items())))


def _unscaled(layer: LayerTable, c_in: float, c_out: float) -> float:
    """The layer's isolated table value at (c_in, c_out), ignoring any in-network scale it carries."""
    return float(layer.lookup(c_in, c_out)) / layer.in_network_scale


def apply_scales(table: BatchTable, scales: dict[str, float], dense_layers: list[tuple[str, float, float]]) -> None:
    """Set every layer table's in-network scale (1 for shapes `scales` does not name) and the dense sum it
    implies (`BatchTable.dense_table_ms`), in place."""
    for signature, layer in table.layers.items():
        layer.in_network_scale = float(scales.get(signature, 1.0))
    table.dense_table_ms = float(table.sum_ms(dense_layers))


__all__ = ["CONV_OPS", "InNetworkScales", "NodeProfileUnavailable", "apply_scales", "conv_ms_by_signature",
           "conv_signature", "in_network_scales", "profile_conv_ms"]
