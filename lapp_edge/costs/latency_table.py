"""Per-target layer latency tables: the data behind latency-aware LAPP, read without torch or a runtime.

`lapp-edge profile-layers` (lapp_edge/latency/profile_layers.py) measures, on one target, the
latency of every distinct conv of a model family as deployed (fused conv + bias + ReLU, one
ONNX model per layer shape) over the grid of widths the target's channel multiple allows, and
then a set of whole networks at random widths. A network's latency is predicted as

    latency_ratio = a + b * table_ratio [+ c * macs_ratio or activations_ratio],
    table_ratio = sum_l T_l(c_in_l, c_out_l) / sum_l T_l(dense)

where T_l is layer l's table, bilinearly interpolated between grid widths (differentiable in
soft kept counts, `lapp/latency_cost.py`), and a, b are fitted on the whole-network
measurements: isolated layers carry a fixed per-model cost and miss the non-conv work
(residual adds, pooling, the classifier), so a raw sum overshoots; DEPLOY_NOTES ("Predicting
whole-network latency") found the fitted constant and scale necessary (the constant comes
out negative, the scale above 1 on OpenVINO). An extra term (conv MACs or output elements, as
ratios to dense) is added only where it lowers the held-out error measurably, as the FLOPs fit adds
its memory term (`costs.latency_fit.choose_fit`). A third feature, output elements of convs whose
width is off the 16-channel block (`off_block_share`), is evaluated and recorded but not fitted by
`profile-layers` (it fitted random width-only networks better on AVX-512 and AMX, and predicted the
networks LAPP trains worse: `latency.profile_layers`); a table file that carries it is read and
predicted from like any other term. The table file also records the held-out
error of this prediction and of the FLOPs fit on the same measurements, its own timing
noise, the machine, the runtime version and the load while it was measured.

A layer table may carry in-network corrections (`LayerTable.in_network`, one factor per point: what the point costs
inside networks, by the runtime's per-node profiler, relative to alone; `latency/node_profile.py`); every lookup
applies them.

Tables are keyed by target, model family, input shape and machine (`machine_key`: CPU model
and kernel-picking ISA flags): `table_file_name`. They live in the latency data (./latency-data
first, then the package's resources/latency; `lapp_edge.resources.find_latency_file`).

The classifier (a linear layer, a few hundred MACs) gets no table: its cost is in the constant.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.costs.latency_fit import machine_slug
from lapp_edge.errors import UserError
from lapp_edge.fileio import read_json, shown

TABLE_FORMAT = "lapp-edge-layer-latency-table/1"
MAX_GRID = 64                 # widths per axis a table may hold (a file is refused beyond this)


def table_file_name(target: str, model: str, input_shape: tuple[int, int, int] | list[int], machine: str) -> str:
    """The file name of a target's layer table for a model family, input shape and machine."""
    return f"layer-table-{target}-{model}-{'x'.join(map(str, input_shape))}-{machine_slug(machine)}.json"


def find_table_file(target: str, model: str, input_shape: tuple[int, int, int] | list[int], machine: str) -> Path | None:
    """The layer table for (target, model, input shape, machine) in the latency data (./latency-data
    first, then the shipped one), or None where there is none."""
    from lapp_edge.resources import find_latency_file

    return find_latency_file(table_file_name(target, model, input_shape, machine))


def layer_signature(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], depthwise: bool,
                    groups: int, in_hw: tuple[int, int]) -> str:
    """What a conv's latency depends on besides its widths: kernel, stride, padding, grouping and
    input size ("conv k3x3 s1x1 p1x1 g1 28x28"). Layers with equal signatures share a table."""
    grouping = "dw" if depthwise else f"g{groups}"
    return (f"conv k{kernel[0]}x{kernel[1]} s{stride[0]}x{stride[1]} p{padding[0]}x{padding[1]} {grouping} "
            f"{in_hw[0]}x{in_hw[1]}")


@dataclass(frozen=True)
class Geometry:
    """A conv's shape as its signature states it."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    depthwise: bool
    groups: int
    in_hw: tuple[int, int]

    @property
    def out_elements(self) -> int:
        h = (self.in_hw[0] + 2 * self.padding[0] - self.kernel[0]) // self.stride[0] + 1
        w = (self.in_hw[1] + 2 * self.padding[1] - self.kernel[1]) // self.stride[1] + 1
        return h * w

    def macs(self, c_in: Any, c_out: Any) -> Any:
        """Multiply-accumulates per image at these widths (numpy or torch arithmetic)."""
        per_output = self.kernel[0] * self.kernel[1] * self.out_elements
        if self.depthwise:
            return per_output * c_out
        return per_output * c_in * c_out / self.groups

    def activations(self, c_out: Any) -> Any:
        """Output elements per image (a memory-traffic proxy)."""
        return self.out_elements * c_out

    def off_block_activations(self, c_out: Any) -> Any:
        """Output elements per image counted where c_out is off the OFF_BLOCK_CHANNELS block (`off_block_share`)."""
        return self.out_elements * c_out * off_block_share(c_out)


OFF_BLOCK_CHANNELS = 16       # oneDNN's blocked layouts on AVX-512 / AMX (DEPLOY_NOTES: widths 24~32, 40~48 cost alike)


def off_block_share(c_out: Any) -> Any:
    """1 where `c_out` is an odd multiple of OFF_BLOCK_CHANNELS / 2 (8, 24, 40, ...), 0 at multiples of the
    block (16, 32, ...), linear in between (numpy or torch arithmetic: a soft kept count gets a gradient
    towards the nearest block). Exact for widths on a grid of 8, the tables' multiple on these CPUs. At a
    width exactly on the block (a kink: the minimum) torch's gradient is the right-hand slope, +1/8, so a
    fit carrying this term would push dense widths down at the first step; no shipped fit carries it."""
    half = OFF_BLOCK_CHANNELS / 2
    return 1.0 - abs((c_out / half) % 2.0 - 1.0)


_SIGNATURE = re.compile(r"conv k(\d+)x(\d+) s(\d+)x(\d+) p(\d+)x(\d+) (dw|g\d+) (\d+)x(\d+)$")


def geometry(signature: str) -> Geometry:
    """The shape a layer signature names (UserError for a string that is not one)."""
    match = _SIGNATURE.match(signature)
    if match is None:
        raise UserError(f"not a layer signature: {shown(signature)}")
    kh, kw, sh, sw, ph, pw, grouping, h, w = match.groups()
    depthwise = grouping == "dw"
    return Geometry((int(kh), int(kw)), (int(sh), int(sw)), (int(ph), int(pw)), depthwise,
                    1 if depthwise else int(grouping[1:]), (int(h), int(w)))


@dataclass
class LayerTable:
    """Latency in ms of one layer shape at batch `batch`: `ms[i][o]` at c_in = c_in_grid[i], c_out =
    c_out_grid[o], as measured on the layer alone. A depthwise conv has c_in == c_out: `tied`, one axis
    (`ms[0][o]`, c_in_grid == [0]). Where `in_network` is set (same rows x columns), every lookup multiplies
    each point by it: what the point costs inside networks relative to alone, by the runtime's per-node profile
    (`latency.node_profile`)."""

    signature: str
    c_in_grid: list[int]
    c_out_grid: list[int]
    ms: list[list[float]]
    tied: bool = False
    in_network: list[list[float]] | None = None

    def values_ms(self) -> np.ndarray:
        """The points as the prediction uses them: measured alone x `in_network` where set (rows x columns, ms)."""
        values = np.asarray(self.ms, dtype=np.float64)
        return values if self.in_network is None else values * np.asarray(self.in_network, dtype=np.float64)

    def lookup(self, c_in: Any, c_out: Any) -> Any:
        """Bilinear interpolation of the table at (c_in, c_out) (numpy arrays or floats, any shape),
        clamped to the grid's range above it; below the smallest grid width, linear down to 0 ms at
        0 channels (a layer with no channels is not run: a removed block, `--block-removal`)."""
        values = self.values_ms()
        c_out = np.asarray(c_out, dtype=np.float64)
        grid_out = np.asarray(self.c_out_grid, dtype=np.float64)
        if self.tied:
            return interpolate_1d(grid_out, values[0], c_out) * below_grid_scale(grid_out, c_out)
        grid_in, c_in = np.asarray(self.c_in_grid, dtype=np.float64), np.asarray(c_in, dtype=np.float64)
        return (interpolate_2d(grid_in, grid_out, values, c_in, c_out)
                * below_grid_scale(grid_in, c_in) * below_grid_scale(grid_out, c_out))


def below_grid_scale(grid: np.ndarray, x: np.ndarray) -> np.ndarray:
    """1 from the grid's smallest width up, x / that width below it (0 at 0 channels)."""
    return np.clip(x / grid[0], 0.0, 1.0) if grid[0] > 0 else np.ones(np.shape(x))


def axis_weights(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For sorted `grid` and values `x`: lower index, upper index and weight of the upper one,
    clamped to the grid's range (a one-point grid gives weight 0)."""
    if len(grid) == 1:
        zero = np.zeros(np.shape(x), dtype=np.int64)
        return zero, zero, np.zeros(np.shape(x))
    lower = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, len(grid) - 2)
    weight = np.clip((x - grid[lower]) / (grid[lower + 1] - grid[lower]), 0.0, 1.0)
    return lower, lower + 1, weight


def interpolate_1d(grid: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    low, high, w = axis_weights(grid, x)
    return (1 - w) * values[low] + w * values[high]


def interpolate_2d(grid_in: np.ndarray, grid_out: np.ndarray, values: np.ndarray, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
    i0, i1, wi = axis_weights(grid_in, x_in)
    o0, o1, wo = axis_weights(grid_out, x_out)
    return ((1 - wi) * (1 - wo) * values[i0, o0] + (1 - wi) * wo * values[i0, o1]
            + wi * (1 - wo) * values[i1, o0] + wi * wo * values[i1, o1])


EXTRA_FEATURES = ("macs_ratio", "activations_ratio", "off_block_activations_ratio")   # what a table's fit may add
FITTED_FEATURES = ("macs_ratio", "activations_ratio")   # what profile-layers' fit adds (the off-block term: recorded only)
# the dense network's sum each feature's ratio is taken against: off-block elements are a share of all its output
# elements (a dense network may have none off the block)
FEATURE_NORMALISER = {"macs_ratio": "macs_ratio", "activations_ratio": "activations_ratio",
                      "off_block_activations_ratio": "activations_ratio"}


# each extra term's value for one conv: (shape, c_in, c_out) -> per-image count
_FEATURE_OF = {
    "macs_ratio": lambda shape, c_in, c_out: shape.macs(c_in, c_out),
    "activations_ratio": lambda shape, c_in, c_out: shape.activations(c_out),
    "off_block_activations_ratio": lambda shape, c_in, c_out: shape.off_block_activations(c_out),
}


def feature_sums_of(layers: list[tuple[Geometry, Any, Any]], names: Iterable[str] = EXTRA_FEATURES) -> dict[str, Any]:
    """Per feature of `names` (default: conv MACs, output elements and off-block output elements), its sum per
    image over (shape, c_in, c_out) triples (numpy, torch or plain numbers), keyed by the name of the ratio it
    becomes but a raw sum: a ratio is a sum over its `dense_normalisers` entry. Only the features named are
    computed (a training step needs just those its fit carries)."""
    sums: dict[str, Any] = {}
    for name in names:
        feature = _FEATURE_OF[name]
        total: Any = 0.0
        for shape, c_in, c_out in layers:
            total = total + feature(shape, c_in, c_out)
        sums[name] = total
    return sums


def feature_sums(layers: list[tuple[str, Any, Any]], names: Iterable[str] = EXTRA_FEATURES) -> dict[str, Any]:
    """`feature_sums_of` for a network given as (signature, c_in, c_out) triples."""
    return feature_sums_of([(geometry(signature), c_in, c_out) for signature, c_in, c_out in layers], names)


def dense_normalisers(dense_sums: dict[str, Any]) -> dict[str, float]:
    """For each feature, the dense network's sum its ratio is taken against (FEATURE_NORMALISER)."""
    return {name: float(dense_sums[FEATURE_NORMALISER[name]]) for name in dense_sums}


@dataclass
class BatchTable:
    """Every layer table of one batch size, the whole-network fit and what it was checked against.

    latency_ratio = constant + scale * table_ratio + sum_f extra[f] * feature_ratio_f, where the
    feature ratios (conv MACs, output elements, off-block output elements) are relative to the dense network's;
    `extra` is empty unless extra terms lowered the held-out error measurably (`costs.latency_fit.choose_fit`);
    `dense_features` holds each term's normaliser (`dense_normalisers`)."""

    batch: int
    layers: dict[str, LayerTable]
    constant: float                    # a
    scale: float                       # b
    dense_table_ms: float              # sum of the dense network's layer tables
    dense_ms: float                    # the dense network's median latency, measured alone (this process)
    noise_pct: float                   # timing noise: median |drift| of the reference layer timed beside every point
    validation: dict[str, Any] = field(default_factory=dict)   # held-out errors: table vs FLOPs fit vs raw sums
    extra: dict[str, float] = field(default_factory=dict)       # feature name -> coefficient
    dense_features: dict[str, float] = field(default_factory=dict)   # feature name -> its dense normaliser

    def sum_ms(self, layers: list[tuple[str, Any, Any]]) -> Any:
        """Sum of layer tables for (signature, c_in, c_out) triples. Raises UserError for a layer
        shape the table does not hold."""
        total: Any = 0.0
        for signature, c_in, c_out in layers:
            table = self.layers.get(signature)
            if table is None:
                raise UserError(f"the latency table has no entry for layer '{signature}' at batch {self.batch} "
                                "(profile this model with lapp-edge profile-layers)")
            total = total + table.lookup(c_in, c_out)
        return total

    def predict_ratio(self, layers: list[tuple[str, Any, Any]]) -> Any:
        """The fitted latency ratio (latency / dense latency on the target) of a network given as layer triples."""
        value = self.constant + self.scale * self.sum_ms(layers) / self.dense_table_ms
        if self.extra:
            sums = feature_sums(layers, self.extra)
            for name, coefficient in self.extra.items():
                value = value + coefficient * sums[name] / self.dense_features[name]
        return value


@dataclass
class LatencyTable:
    """A target's layer latency tables for one model family, input shape and machine."""

    format: str
    target: str
    backend: str
    precision: str
    precision_used: str                # what the runtime compiled (bf16 falls back to f32 on CPUs without it)
    threads: int
    runtime: str                       # e.g. "onnxruntime 1.20.1"
    machine: str                       # deploy.measure.machine_key()
    cpu_model: str
    model: str
    coupled_groups: bool
    input_shape: list[int]
    channel_multiple: int
    batches: dict[int, BatchTable]
    dense_reference: str = ""          # the dense model's ONNX file, beside the table (bench measures against it)
    created: str = ""
    command: str = ""
    load: dict[str, Any] = field(default_factory=dict)

    def batch(self, batch: int) -> BatchTable:
        if batch not in self.batches:
            raise UserError(f"the latency table for {self.target} holds batches {sorted(self.batches)}, not {batch}")
        return self.batches[batch]

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["batches"] = {str(b): asdict(t) for b, t in self.batches.items()}
        return payload


def write_table_json(table: LatencyTable) -> bytes:
    return (json.dumps(table.to_dict(), indent=1) + "\n").encode("utf-8")


def _number(value: Any, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or (positive and value <= 0):
        raise UserError(f"{where} must be a {'positive ' if positive else ''}finite number, not {shown(value)}")
    return float(value)


def _grid(value: Any, where: str) -> list[int]:
    if (not isinstance(value, list) or not 1 <= len(value) <= MAX_GRID
            or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1 << 16 for v in value)
            or sorted(set(value)) != value):
        raise UserError(f"{where} must be a strictly increasing list of 1-{MAX_GRID} channel counts")
    return value


def _features(payload: Any, where: str, positive: bool = False) -> dict[str, float]:
    if not isinstance(payload, dict) or any(name not in EXTRA_FEATURES for name in payload):
        raise UserError(f"{where} must map some of {', '.join(EXTRA_FEATURES)} to numbers")
    return {name: _number(value, f"{where}: {name}", positive) for name, value in payload.items()}


def _layer(payload: Any, where: str) -> LayerTable:
    if not isinstance(payload, dict):
        raise UserError(f"{where} must be a mapping")
    tied = bool(payload.get("tied", False))
    c_in, c_out = _grid(payload.get("c_in_grid"), f"{where}: c_in_grid"), _grid(payload.get("c_out_grid"), f"{where}: c_out_grid")
    ms = payload.get("ms")
    if not isinstance(ms, list) or len(ms) != (1 if tied else len(c_in)) or any(
            not isinstance(row, list) or len(row) != len(c_out) for row in ms):
        raise UserError(f"{where}: ms must be a {len(c_in)} x {len(c_out)} list of lists")
    values = [[_number(v, f"{where}: ms", positive=True) for v in row] for row in ms]
    signature = payload.get("signature")
    if not isinstance(signature, str) or len(signature) > 200:
        raise UserError(f"{where}: signature must be a string")
    in_network = payload.get("in_network")
    if in_network is not None:
        if not isinstance(in_network, list) or len(in_network) != len(values) or any(
                not isinstance(row, list) or len(row) != len(c_out) for row in in_network):
            raise UserError(f"{where}: in_network must be a {len(values)} x {len(c_out)} list of lists like ms")
        in_network = [[_number(v, f"{where}: in_network", positive=True) for v in row] for row in in_network]
    return LayerTable(signature, c_in, c_out, values, tied, in_network)


def table_from_dict(payload: Any, where: str) -> LatencyTable:
    """A LatencyTable from its JSON; wrong shapes or types are a UserError naming the file and field."""
    if not isinstance(payload, dict) or payload.get("format") != TABLE_FORMAT:
        raise UserError(f"{where} is not a layer latency table (format {TABLE_FORMAT})")
    try:
        batches: dict[int, BatchTable] = {}
        raw_batches = payload["batches"]
        if not isinstance(raw_batches, dict) or not raw_batches:
            raise UserError(f"{where}: batches must be a non-empty mapping")
        for key, raw in raw_batches.items():
            if not str(key).isdigit() or not isinstance(raw, dict) or not isinstance(raw.get("layers"), dict):
                raise UserError(f"{where}: batch {shown(key)} must map a batch size to its layer tables")
            layers = {name: _layer(value, f"{where}: batch {key} layer {shown(name)}") for name, value in raw["layers"].items()}
            batches[int(key)] = BatchTable(
                int(key), layers, _number(raw["constant"], f"{where}: constant"), _number(raw["scale"], f"{where}: scale"),
                _number(raw["dense_table_ms"], f"{where}: dense_table_ms", True), _number(raw["dense_ms"], f"{where}: dense_ms", True),
                _number(raw["noise_pct"], f"{where}: noise_pct"), raw.get("validation") if isinstance(raw.get("validation"), dict) else {},
                _features(raw.get("extra", {}), f"{where}: extra"), _features(raw.get("dense_features", {}), f"{where}: dense_features", positive=True))
            if set(batches[int(key)].extra) - set(batches[int(key)].dense_features):
                raise UserError(f"{where}: batch {key} fits an extra term without the dense network's value for it")
        text = {name: payload[name] for name in ("target", "backend", "precision", "precision_used", "runtime", "machine",
                                                  "cpu_model", "model")}
        for name, value in text.items():
            if not isinstance(value, str) or len(value) > 300:
                raise UserError(f"{where}: {name} must be a string")
        shape = payload["input_shape"]
        if not isinstance(shape, list) or len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in shape):
            raise UserError(f"{where}: input_shape must be [C, H, W]")
        return LatencyTable(
            format=TABLE_FORMAT, **text, threads=int(_number(payload["threads"], f"{where}: threads", True)),
            coupled_groups=bool(payload["coupled_groups"]), input_shape=list(shape),
            channel_multiple=int(_number(payload["channel_multiple"], f"{where}: channel_multiple", True)), batches=batches,
            dense_reference=str(payload.get("dense_reference", "")), created=str(payload.get("created", "")),
            command=str(payload.get("command", "")), load=payload.get("load") if isinstance(payload.get("load"), dict) else {},
        )
    except KeyError as error:
        raise UserError(f"{where}: missing field {error}") from None


def load_table(path: str | Path) -> LatencyTable:
    """Read and validate a layer latency table (bounded read; UserError, one line, for a bad file)."""
    return table_from_dict(read_json(path), str(path))


# --- layers of a deployed ONNX model (bench predicts a package's latency from its graph) --------

def onnx_conv_layers(onnx_path: str | Path) -> list[tuple[str, int, int]]:
    """(signature, c_in, c_out) of every Conv of an ONNX model, read from its graph (weights as
    initializers; spatial sizes by ONNX shape inference). Imports onnx, not a runtime or torch."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    graph = model.graph
    shapes: dict[str, list[int]] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    weights = {init.name: list(init.dims) for init in graph.initializer}
    constants = {node.output[0]: list(numpy_helper.to_array(node.attribute[0].t).shape)
                 for node in graph.node if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR}
    layers = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        weight = weights.get(node.input[1]) or constants.get(node.input[1])
        in_shape = shapes.get(node.input[0])
        if weight is None or in_shape is None or len(in_shape) != 4 or in_shape[2] <= 0 or in_shape[3] <= 0:
            raise UserError(f"{onnx_path}: cannot read the shape of conv {node.name or node.output[0]}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        groups = int(attrs.get("group", 1))
        stride = tuple(attrs.get("strides", [1, 1]))
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        c_out, c_in = int(weight[0]), int(weight[1]) * groups
        depthwise = groups > 1 and groups == c_in == c_out
        signature = layer_signature((int(weight[2]), int(weight[3])), (int(stride[0]), int(stride[1])),  # type: ignore[arg-type]
                                    (int(pads[0]), int(pads[1])), depthwise, groups, (in_shape[2], in_shape[3]))
        layers.append((signature, c_in, c_out))
    return layers
