"""ONNX Runtime on the CPU: fp32, and int8 by static U8S8 Q/DQ quantization.

fp32: ORT_ENABLE_ALL (the NCHWc layout transform lives only at that level), intra-op
threads from the profile, one inter-op thread, sequential execution.

int8: `quant_pre_process` (shape inference + ORT's optimizer), then `quantize_static` with
QDQ format, uint8 activations, int8 per-channel weights and MinMax calibration over the
calibration set. ORT's default S8S8 left convs in fp32 between Q/DQ pairs and ran slower
than fp32 here (docs/../shared DEPLOY_NOTES), hence U8S8. The Q/DQ file is also what the
OpenVINO backend's `ort-qdq` int8 route reads, so one quantized artifact serves both.
On a CPU without VNNI the weights are quantized to 7 bits (`reduce_range`): there the U8S8
kernels add pairs of u8 x s8 products in 16 bits (`vpmaddubsw`), which saturates with full
8-bit weights; ORT's quantization docs give this setting for non-VNNI machines. Measured on
the AVX2 EPYC (docs/RESULTS.md): the demo's slim ResNet-20 lost 3.20 points of top-1 as
full-range U8S8 and 0.18 with `reduce_range`.

Before quantizing, every Add's per-channel constant (1 x C x 1 x 1: what a removed residual branch leaves,
relu(x + c)) is given the full C x H x W of the tensor it is added to (`expand_channel_constants`). ORT runs
int8 adds as NHWC QLinearAdd, and broadcasting a per-channel constant there splits the add into one call per
pixel of C elements; measured on the AVX-512 EPYC without AVX-VNNI (docs/RESULTS.md, "ORT int8: a removed
branch's add"): 743 us per such add at batch 32 against 33 us for a same-shape add, 23% of the demo's slim
int8 latency. The expanded constant holds the same values and quantizes to the same; only the add kernels'
rounding differs (at most one output step in tests/deploy/test_ort_int8_constants.py).

Then, where the target's channel multiple on this CPU (`LoadRequest.channel_multiple`) leaves channel spaces of
the network narrow (8 of 16, 56 of 64), the same network with those spaces zero-padded to the multiple
(`channel_padding.pad_channels`: the same logits; the same Q/DQ numbers, bit for bit) is quantized too, both are
timed against each other at the requested batch (`padded_over_plain`), and the padded one is run only where it
measured at least 3% faster (`choose_channel_padding`; what was tried is the runner's
`details["channel_padding"]`). Measured on the AVX-512 EPYC without AVX-VNNI: ORT's int8 QLinearConv writing
8 channels is slower than writing 16 (869 vs 618 us for one 16-channel 3x3 conv at 28 x 28, batch 32), and the
demo's slim ResNet-20 ran 0.92-0.95 of its unpadded int8 latency padded; every float target and OpenVINO int8
ran 11-21% slower padded, so only this backend's int8 tries it, and only a measurement decides it (a CPU where
narrow kernels are cheap, as the AVX2 EPYC's 8 -> 8 convs were, keeps the plain form). Bundles ship the plain
form: the device's CPU is not the one measured here.

`info.details["optimized_ops"]` counts the operator types of the graph ORT actually runs
(written via `optimized_model_filepath`), so int8 is shown to run as QLinearConv, not as
float Conv between Q/DQ pairs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.deploy import artifacts
from lapp_edge.deploy.backends.base import (
    Backend, LoadRequest, NodeProfileUnavailable, NodeTime, Runner, RunnerInfo, content_digest, import_runtime, runtime_refused,
)
from lapp_edge.deploy.backends.channel_padding import pad_channels
from lapp_edge.fileio import atomic_write_bytes

NAME = "onnxruntime-cpu"
INSTALL_HINT = "'pip install onnxruntime'"
CALIBRATION_BATCH = 32
EXPANDED_CONSTANT_MAX_ELEMENTS = 1 << 22   # per constant (16 MiB as fp32): larger ones stay broadcast
PADDING_MIN_SPEEDUP = 1.03                  # padded int8 is run only where it measured >= 3% faster (above the A/B's noise)
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})   # CPU flags with int8 dot products accumulated in 32 bits


def _ort() -> Any:
    return import_runtime("onnxruntime", NAME, INSTALL_HINT)


def session_options(threads: int, optimized_path: Path | None = None, profile_prefix: Path | None = None) -> Any:
    """The session settings every ORT target runs with (module docstring); `profile_prefix`: where ORT's
    per-node profiler writes its JSON (profiling on), for `OrtRunner.node_times`."""
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3      # errors only: ORT warns on every optimized-model dump
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return options


def reduced_range_needed(flags: set[str]) -> bool:
    """Whether U8S8 int8 on a CPU with these /proc/cpuinfo `flags` needs 7-bit weights
    (`quantize_static(reduce_range=True)`): True without any VNNI flag (see the module docstring)."""
    return not (flags & VNNI_FLAGS)


def _static_dims(value_info: Any) -> list[int | None]:
    """A tensor's dims from ONNX shape inference: an int where known, None where symbolic or unknown."""
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in value_info.type.tensor_type.shape.dim]


def expand_channel_constants(model: Any, max_elements: int = EXPANDED_CONSTANT_MAX_ELEMENTS) -> int:
    """Give each per-channel constant an Add reads (an initializer of shape 1 x C x 1 x 1 or C x 1 x 1, added to
    an N x C x H x W tensor whose C, H, W shape inference knows) the full 1 x C x H x W, in place in the ONNX
    `model` (a ModelProto); the batch axis stays 1, so a dynamic batch still broadcasts. Constants of more than
    `max_elements` elements, and adds whose other input is a 1 x 1 map or of unknown size, are left as they are.
    Returns how many adds now read an expanded constant. Why: ORT's int8 QLinearAdd broadcasts a per-channel
    constant one pixel at a time (module docstring)."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    dims = {info.name: _static_dims(info) for info in [*graph.value_info, *graph.input, *graph.output]}
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    added: set[str] = set()             # expanded initializers, one per (constant, H x W)
    count = 0
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        for position in (0, 1):
            constant, other = node.input[position], node.input[1 - position]
            shape = dims.get(other)
            if constant not in initializers or other in initializers or shape is None or len(shape) != 4:
                continue
            channels, height, width = shape[1:]
            if channels is None or height is None or width is None or height * width == 1:
                continue
            values = numpy_helper.to_array(initializers[constant])
            if values.shape not in ((1, channels, 1, 1), (channels, 1, 1)) or channels * height * width > max_elements:
                continue
            name = f"{constant}.expanded_{height}x{width}"
            if name not in added:
                full = np.ascontiguousarray(np.broadcast_to(values.reshape(1, channels, 1, 1), (1, channels, height, width)))
                model.graph.initializer.append(numpy_helper.from_array(full, name))
                added.add(name)
            node.input[position] = name
            count += 1
    used = {name for node in model.graph.node for name in node.input}
    graph_inputs = {value.name for value in model.graph.input}
    unused = [tensor for tensor in model.graph.initializer
              if tensor.name in initializers and tensor.name not in used and tensor.name not in graph_inputs]
    for tensor in unused:        # the per-channel originals no add reads any more
        model.graph.initializer.remove(tensor)
    return count


def static_qdq(onnx_path: Path, input_name: str, calibration: np.ndarray, work_dir: Path, tag: str, activation_type: str,
               backend: str = NAME, op_types: list[str] | None = None, extra_options: dict[str, Any] | None = None,
               postprocess: Callable[[Any], None] | None = None, reduce_range: bool = False,
               expand_constants: bool = False, pad_multiple: int = 0) -> Path:
    """ORT static quantization of `onnx_path` as a private copy to load: `quant_pre_process`, then
    `quantize_static` in QDQ format with `activation_type` ("QUInt8" or "QInt8") activations,
    per-channel int8 weights (7-bit with `reduce_range`) and MinMax calibration over `calibration`
    (float32 N x C x H x W, normalised; fed in batches of 32); `pad_multiple` > 1: narrow channel spaces are
    zero-padded to that multiple first (`channel_padding.pad_channels`); `expand_constants`: per-channel constants
    of adds are expanded first (`expand_channel_constants`); `postprocess` edits the ONNX model before it is written.
    Cached in work_dir as `<stem>.int8-<tag>.<digest>.onnx`: reused only when its authenticated
    sidecar and sha256 check out (`deploy/artifacts.py`), else built afresh and published there.
    BackendUnavailable (naming `backend`) without ONNX Runtime's quantization tools."""
    import_runtime("onnxruntime", backend, INSTALL_HINT)
    quantization = import_runtime("onnxruntime.quantization", backend, INSTALL_HINT)
    work_dir = artifacts.work_directory(work_dir)
    digest = content_digest(onnx_path, calibration)
    tag = f"{tag}-r7" if reduce_range else tag
    tag = f"{tag}-p{pad_multiple}" if pad_multiple > 1 else tag
    name = f"{Path(onnx_path).stem}.int8-{tag}.{digest[:12]}"
    cached = artifacts.fetch(work_dir, name, digest, (f"{name}.onnx",))
    if cached is not None:
        return cached[f"{name}.onnx"]
    private = artifacts.private_directory()
    output = private / f"{name}.onnx"
    prepared = private / f"{Path(onnx_path).stem}.preprocessed-{tag}.onnx"
    source = Path(onnx_path)
    try:
        if expand_constants or pad_multiple > 1:
            import onnx

            model = onnx.load(str(onnx_path))
            padded = pad_channels(model, pad_multiple) if pad_multiple > 1 else []
            if (expand_constants and expand_channel_constants(model)) or padded:
                source = private / f"{Path(onnx_path).stem}.rewritten-{tag}.onnx"
                atomic_write_bytes(source, model.SerializeToString())
        quantization.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    except Exception as error:  # noqa: BLE001 - a model the quantizer cannot read is bad input
        raise runtime_refused(backend, onnx_path, error) from None

    class Reader(quantization.CalibrationDataReader):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(
                calibration[start : start + CALIBRATION_BATCH] for start in range(0, len(calibration), CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    temporary = output.with_suffix(".tmp.onnx")
    options: dict[str, Any] = {"op_types_to_quantize": op_types} if op_types else {}
    quantization.quantize_static(
        str(prepared), str(temporary), Reader(),
        quant_format=quantization.QuantFormat.QDQ,
        activation_type=getattr(quantization.QuantType, activation_type),
        weight_type=quantization.QuantType.QInt8,
        per_channel=True,
        reduce_range=reduce_range,
        calibrate_method=quantization.CalibrationMethod.MinMax,
        extra_options=dict(extra_options or {}),
        **options,
    )
    if postprocess is None:
        temporary.replace(output)
    else:
        import onnx

        model = onnx.load(str(temporary))
        postprocess(model)
        atomic_write_bytes(output, model.SerializeToString())
        temporary.unlink(missing_ok=True)
    prepared.unlink(missing_ok=True)
    if source != Path(onnx_path):
        source.unlink(missing_ok=True)
    artifacts.publish(work_dir, name, digest, {output.name: output})
    return output


def qdq_model(onnx_path: Path, input_name: str, calibration: np.ndarray, work_dir: Path, reduce_range: bool | None = None,
              pad_multiple: int = 0) -> Path:
    """The U8S8 per-channel Q/DQ model of `onnx_path` calibrated on `calibration` (see `static_qdq`), adds'
    per-channel constants expanded (module docstring); 7-bit weights with `reduce_range`, which defaults to
    what this CPU needs (`reduced_range_needed`); narrow channel spaces zero-padded to `pad_multiple` where > 1."""
    if reduce_range is None:
        reduce_range = this_cpu_needs_reduced_range()
    return static_qdq(onnx_path, input_name, calibration, work_dir, "qdq-xc", "QUInt8", reduce_range=reduce_range,
                      expand_constants=True, pad_multiple=pad_multiple)


def padded_spaces(onnx_path: Path, multiple: int) -> list[tuple[int, int]]:
    """(width, padded width) of each channel space of `onnx_path` that `pad_channels` would pad to `multiple`
    (nothing is written). RuntimeRefused for a file ONNX cannot read."""
    import onnx

    try:
        model = onnx.load(str(onnx_path))
    except Exception as error:  # noqa: BLE001 - onnx's own exception types; an unreadable model is bad input
        raise runtime_refused(NAME, onnx_path, error) from None
    return pad_channels(model, multiple)


def padded_over_plain(padded: Path, plain: Path, request: LoadRequest) -> float:
    """Latency of the padded int8 model over the plain one at `request.batch` (`request.threads`), measured
    interleaved on random inputs with `measure.quiet_block_ratios`' default protocol: the median block ratio."""
    from lapp_edge.deploy.measure import RatioProtocol, quiet_block_ratios

    ort = _ort()
    runners = []
    for path in (padded, plain):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"], sess_options=session_options(request.threads))
        runners.append(OrtRunner(session, request.input_name, RunnerInfo(
            backend=NAME, runtime_version=str(ort.__version__), precision_requested="int8", precision_used="int8",
            threads=request.threads, batch=request.batch, model_path=str(path))))
    data = np.random.default_rng(0).standard_normal((request.batch, *request.input_shape)).astype(np.float32)
    return float(np.median(quiet_block_ratios(runners[0], runners[1], data, RatioProtocol()).block_ratios))


def choose_channel_padding(plain: Path, request: LoadRequest, reduce_range: bool) -> tuple[Path, dict[str, Any]]:
    """The int8 model to run: `plain` (the Q/DQ model of `request.onnx_path`), or the same network with its
    narrow channel spaces zero-padded to `request.channel_multiple` where that measured at least
    1 / PADDING_MIN_SPEEDUP faster here (module docstring), with what was tried and measured (the runner's
    `details["channel_padding"]`). Nothing is tried for a multiple of 1 or less, or where no space is narrow;
    a graph the padder cannot analyse runs plain, the reason recorded (`skipped`)."""
    multiple = request.channel_multiple
    if multiple <= 1:
        return plain, {}
    try:
        spaces = padded_spaces(request.onnx_path, multiple)
    except Exception as error:  # noqa: BLE001 - the plain form quantized and runs: padding is only an optimisation
        return plain, {"multiple": multiple, "spaces": [], "used": False, "skipped": f"{type(error).__name__}: {error}"[:300]}
    if not spaces:
        return plain, {"multiple": multiple, "spaces": [], "used": False}
    assert request.calibration is not None
    padded = qdq_model(request.onnx_path, request.input_name, request.calibration, request.work_dir, reduce_range, multiple)
    ratio = padded_over_plain(padded, plain, request)
    used = ratio * PADDING_MIN_SPEEDUP <= 1.0
    return (padded if used else plain), {"multiple": multiple, "spaces": [list(space) for space in spaces],
                                         "padded_over_plain": round(ratio, 4), "used": used}


def this_cpu_needs_reduced_range() -> bool:
    """`reduced_range_needed` for the CPU this process runs on."""
    from lapp_edge.deploy.measure import cpu_flags

    return reduced_range_needed(cpu_flags())


def _count_ops(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


class OrtRunner(Runner):
    def __init__(self, session: Any, input_name: str, info: RunnerInfo) -> None:
        self.session = session
        self.input_name = input_name
        self.output_names = [session.get_outputs()[0].name]
        self.info = info

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(self.output_names, {self.input_name: batch})[0]

    def node_times(self, batch: np.ndarray, runs: int) -> list[NodeTime]:
        """ORT's session profile (`enable_profiling`): each node's `*_kernel_time` events over the last `runs`
        inferences (earlier ones, warm-up included, dropped), median per node. Ends the session's profiling:
        once per runner."""
        if not self.session.get_session_options().enable_profiling:
            raise NodeProfileUnavailable("this ONNX Runtime session was loaded without profiling (LoadRequest.profile_nodes)")
        for _ in range(runs):
            self.infer(batch)
        profile_path = Path(self.session.end_profiling())
        try:
            events = json.loads(profile_path.read_text())
        finally:
            profile_path.unlink(missing_ok=True)
        durations: dict[str, list[float]] = {}
        shapes: dict[str, tuple[str, tuple[tuple[int, ...], ...], tuple[int, ...]]] = {}
        for event in events:
            if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
                continue
            name, args = event["name"][: -len("_kernel_time")], event.get("args", {})
            durations.setdefault(name, []).append(float(event["dur"]))
            if name not in shapes:
                inputs = tuple(tuple(int(v) for v in next(iter(i.values()))) for i in args.get("input_type_shape", []))
                outputs = [tuple(int(v) for v in next(iter(o.values()))) for o in args.get("output_type_shape", [])]
                shapes[name] = (str(args.get("op_name", "")), inputs, outputs[0] if outputs else ())
        return [NodeTime(name, shapes[name][0], shapes[name][1], shapes[name][2], float(np.median(times[-runs:])))
                for name, times in durations.items()]


class OnnxRuntimeCpu(Backend):
    name = NAME
    precisions = ("fp32", "int8")
    runtime_modules = ("onnxruntime",)
    int8_routes = ("qdq-u8s8",)
    node_profiler = True

    def load(self, request: LoadRequest) -> Runner:
        self.check_request(request)
        ort = _ort()
        model_path = Path(request.onnx_path)
        int8_details: dict[str, Any] = {}
        if request.precision == "int8":
            assert request.calibration is not None
            seven_bit = this_cpu_needs_reduced_range()
            model_path = qdq_model(model_path, request.input_name, request.calibration, request.work_dir, seven_bit)
            model_path, padding = choose_channel_padding(model_path, request, seven_bit)
            int8_details["int8_weights_7bit"] = seven_bit
            if padding:
                int8_details["channel_padding"] = padding
        work_dir = artifacts.work_directory(request.work_dir)
        # ORT writes its dump by path (following links): into our private directory, never the work dir
        optimized = artifacts.private_directory() / f"{model_path.stem}.ort-optimized.onnx"
        try:
            session = ort.InferenceSession(
                str(model_path), providers=["CPUExecutionProvider"],
                sess_options=session_options(request.threads, optimized,
                                             artifacts.private_directory() / f"{model_path.stem}.ort-profile" if request.profile_nodes else None),
            )
        except Exception as error:  # noqa: BLE001 - ORT's own exception types; a model it cannot load is bad input
            raise runtime_refused(NAME, request.onnx_path, error) from None
        ops = _count_ops(optimized) if optimized.is_file() else {}
        if optimized.is_file():   # for inspection only (never read back): replaced atomically, not written through
            atomic_write_bytes(work_dir / optimized.name, optimized.read_bytes())
            optimized.unlink()
        int8_ops = sum(count for op, count in ops.items() if op.startswith("QLinear") or op in ("ConvInteger", "MatMulInteger"))
        float_convs = sum(count for op, count in ops.items() if op.endswith("Conv") and not op.startswith("QLinear"))
        used = "int8" if request.precision == "int8" and int8_ops > 0 else "fp32"
        info = RunnerInfo(
            backend=NAME, runtime_version=str(ort.__version__), precision_requested=request.precision,
            precision_used=used, threads=request.threads, batch=request.batch,
            int8_route="qdq-u8s8" if request.precision == "int8" else "", model_path=str(model_path),
            details={
                "providers": session.get_providers(), "graph_optimization_level": "ORT_ENABLE_ALL",
                "intra_op_num_threads": request.threads, "inter_op_num_threads": 1,
                "optimized_ops": ops, "int8_ops": int8_ops, "float_conv_ops": float_convs,
                **int8_details,
            },
        )
        return OrtRunner(session, request.input_name, info)


BACKEND = OnnxRuntimeCpu()
