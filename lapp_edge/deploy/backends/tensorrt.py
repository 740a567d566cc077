"""TensorRT 10.x / 11.x on an NVIDIA GPU: fp16 and int8, precision carried by the ONNX.

Written against the modern API only, and NOT YET RUN against a real TensorRT anywhere
(no GPU or TensorRT on the machines this was written on; see docs/GPU.md). What runs on the
CPU is tested: the fp16 / Q/DQ ONNX producers (`onnx_variants`), the engine cache key, the
inspector parsing, the latency protocol and the one-line unavailable path.

Build (once per engine cache key):
    trt.Builder -> builder.create_network(flags)   (explicit batch is implicit since 10.0;
        STRONGLY_TYPED is set where the enum has it: required on 10.x for a typed build,
        accepted and ignored on 11.x, where every network is strongly typed)
    trt.OnnxParser(network, logger).parse(onnx bytes)
    config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, 1 GiB)
    an optimization profile for the dynamic batch axis: min 1, opt = max = request.batch
    config.profiling_verbosity = DETAILED (so the engine inspector can report layer types)
    builder.build_serialized_network(network, config) -> plan bytes, cached on disk
Run:
    trt.Runtime(logger).deserialize_cuda_engine(plan) -> engine.create_execution_context()
    name-based I/O: num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype,
    context.set_input_shape(input, (n, C, H, W)), context.set_tensor_address(name, pointer),
    context.execute_async_v3(stream handle).
No TensorRT 8 API is used (no bindings, execute_v2 or build_engine) and no builder
precision flag or calibrator (removed in 11.x): precision comes from the ONNX itself,
    fp16  the fp16 ONNX from `onnx_variants.fp16_model` (float32 I/O, float16 inside);
    int8  the symmetric S8S8 Q/DQ ONNX from `onnx_variants.qdq_symmetric_model` (route
          "qdq-s8s8"; that module's docstring says why ORT's U8S8 file cannot be used).
          Ops left outside Q/DQ pairs run in float32 (strong typing keeps the ONNX types).

Device memory, streams, events and CUDA graphs come from torch's CUDA runtime, not from
cuda-python: torch is already a dependency of the package (the torch-cuda backend needs
its CUDA build anyway), its caching allocator hands out device pointers
(`tensor.data_ptr()`) and pinned host buffers, and `torch.cuda.Event` / `torch.cuda.graph`
give timing and graph capture without a second CUDA binding whose versions must be kept in
step. TensorRT and torch share the device's primary CUDA context.

Engine cache: `<work_dir>/tensorrt-engines/<onnx stem>.<key>.engine`, key =
`engine_cache_key(sha256 of the ONNX bytes, TensorRT version, GPU name, precision, batch
profile)` plus the builder settings' version (CACHE_FORMAT). A plan that fails to
deserialize is rebuilt once.

Latency: `runner.gpu_latency(batch)` measures as trtexec does (gpu_measure: 200 ms warm-up,
>= 10 iterations and >= 3 s, CUDA events, compute apart from H2D/D2H copies), replaying a CUDA
graph of the enqueue where capture works and falling back to plain `execute_async_v3`
(the dict says which, and why). `infer` stays the plain path and returns float32 logits.

Errors: BackendUnavailable (one line) when tensorrt cannot be imported or is older than
10, when torch sees no CUDA GPU, or when onnxconverter-common (fp16) is missing; UserError
when TensorRT cannot parse or build the model or the engine has unexpected I/O; ValueError
when a batch exceeds the engine's maximum batch.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.deploy.backends.base import Backend, BackendUnavailable, LoadRequest, Runner, RunnerInfo, import_runtime
from lapp_edge.deploy.backends.gpu_measure import CudaDevice, GpuLatencyProtocol, cuda_event_step, cuda_torch, time_iterations
from lapp_edge.deploy.backends.onnx_variants import fp16_model, qdq_symmetric_model
from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_bytes

NAME = "tensorrt"
INSTALL_HINT = "'pip install tensorrt' (TensorRT 10 or 11, on a machine with an NVIDIA GPU and driver)"
QDQ_ROUTE = "qdq-s8s8"
WORKSPACE_BYTES = 1 << 30
CACHE_FORMAT = f"lapp-edge-trt-1;workspace={WORKSPACE_BYTES};strongly-typed;profiling=detailed"
BatchProfile = tuple[int, int, int]      # min, opt, max batch of the optimization profile

# TensorRT DataType member name -> torch dtype name
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


def tensorrt_module() -> Any:
    """`import tensorrt`, or one line (BackendUnavailable) when it is missing or older than 10."""
    trt = import_runtime("tensorrt", NAME, INSTALL_HINT)
    version = str(getattr(trt, "__version__", "0"))
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major < 10:
        raise BackendUnavailable(f"backend {NAME} is unavailable: TensorRT {version} found, this backend needs 10.x or 11.x")
    return trt


def batch_profile(batch: int) -> BatchProfile:
    """The optimization profile for an engine that serves batches 1..`batch`, tuned for `batch`."""
    return (1, batch, batch)


def engine_cache_key(onnx_bytes: bytes, trt_version: str, gpu_name: str, precision: str, profile: BatchProfile) -> str:
    """sha256 (hex, 64 chars) over everything a serialized engine depends on: the ONNX bytes
    (which already carry fp16 / Q/DQ), the TensorRT version, the GPU name, the precision, the
    batch profile (min, opt, max) and the builder settings (CACHE_FORMAT)."""
    fields = {
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(), "tensorrt": trt_version, "gpu": gpu_name,
        "precision": precision, "batch_profile": [int(b) for b in profile], "builder": CACHE_FORMAT,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _dtype_word(entry: Any) -> str:
    """A layer input/output entry of the inspector JSON -> int8 | fp8 | bf16 | fp16 | fp32 | int32 | unknown.
    TensorRT 10 writes one "Format/Datatype" string ("Row major linear FP32", "Channel major FP16
    format ..."), 11 splits it into "Format" and "DataType" ("Float", "Half", "Int8")."""
    if not isinstance(entry, dict):
        return "unknown"
    text = str(entry["DataType"] if "DataType" in entry else entry.get("Format/Datatype", entry.get("Format", ""))).lower()
    for word, tokens in (("int8", ("int8",)), ("fp8", ("fp8",)), ("bf16", ("bf16", "bfloat16")),
                         ("fp16", ("fp16", "half")), ("int32", ("int32",)), ("fp32", ("fp32", "float"))):
        if any(token in text for token in tokens):
            return word
    return "unknown"


def _is_matmul_layer(layer: dict[str, Any]) -> bool:
    """A convolution / GEMM layer by its LayerType ("CaskConvolution", "CaskGemmConvolution", ...);
    by its name only where the JSON has no LayerType (reformat layers name the conv they feed)."""
    if "LayerType" in layer:
        kind = str(layer["LayerType"])
        return any(word in kind for word in ("Convolution", "Conv", "Gemm", "MatrixMultiply", "FullyConnected"))
    name = str(layer.get("Name", ""))
    return "Reformat" not in name and any(word in name for word in ("Conv", "Gemm", "MatMul"))


def precision_from_inspector(engine_json: str) -> tuple[str, dict[str, Any]]:
    """(precision most conv/GEMM layers read their input in, counts) from the engine
    inspector's JSON (DETAILED verbosity). "unknown" when the JSON has no typed layer entries."""
    try:
        layers = json.loads(engine_json).get("Layers", [])
    except (ValueError, AttributeError):
        return "unknown", {}
    conv: Counter[str] = Counter()
    outputs: Counter[str] = Counter()
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        for entry in layer.get("Outputs", []):
            outputs[_dtype_word(entry)] += 1
        if _is_matmul_layer(layer) and layer.get("Inputs"):
            conv[_dtype_word(layer["Inputs"][0])] += 1
    used = max(conv.items(), key=lambda item: item[1])[0] if conv else "unknown"
    return used, {"conv_input_precisions": dict(sorted(conv.items())), "layer_output_precisions": dict(sorted(outputs.items())),
                  "layers": len(layers)}


def _parser_error(error: Any) -> str:
    text = error.desc() if hasattr(error, "desc") else str(error)
    node = error.node() if hasattr(error, "node") else None
    return f"node {node}: {text}" if isinstance(node, int) and node >= 0 else str(text)


def build_serialized_engine(trt: Any, onnx_bytes: bytes, input_name: str, input_shape: tuple[int, int, int],
                            profile: BatchProfile, workspace_bytes: int = WORKSPACE_BYTES) -> tuple[bytes, bool]:
    """Parse the ONNX and build a serialized engine (plan bytes) for batches profile[0]..profile[2].
    Returns (plan, strongly typed flag set). Raises UserError with TensorRT's first parser error."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 0 if strongly_typed is None else 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT cannot parse the ONNX model: {errors[0].splitlines()[0] if errors else 'no parser error given'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    optimization = builder.create_optimization_profile()
    low, opt, high = profile
    optimization.set_shape(input_name, (low, *input_shape), (opt, *input_shape), (high, *input_shape))
    config.add_optimization_profile(optimization)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT could not build an engine for the model (build_serialized_network returned None; see its log above)")
    return bytes(plan), strongly_typed is not None


class TensorRtRunner(Runner):
    """One engine and execution context; device input/output buffers for the maximum batch.

    infer(batch): float32 N x C x H x W (N <= max batch) -> float32 N x classes logits.
    gpu_latency(batch): trtexec-style GPU timing (see gpu_measure), a dict in milliseconds.
    """

    def __init__(self, trt: Any, torch: Any, plan: bytes, input_name: str, input_shape: tuple[int, int, int],
                 max_batch: int, info: RunnerInfo) -> None:
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserError("TensorRT could not deserialize the engine plan")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [input_name] or len(outputs) != 1:
            raise UserError(f"the TensorRT engine has inputs {inputs} and outputs {outputs}; expected ['{input_name}'] and one output")
        self.input_name, self.output_name = input_name, outputs[0]
        self.input_shape, self.max_batch = input_shape, max_batch
        self.context.set_input_shape(input_name, (max_batch, *input_shape))
        self._batch = max_batch
        output_shape = tuple(int(d) for d in self.context.get_tensor_shape(self.output_name))
        dtypes = {n: self.engine.get_tensor_dtype(n).name for n in (input_name, self.output_name)}
        unknown = [f"{n}: {t}" for n, t in dtypes.items() if t not in TORCH_DTYPES]
        if unknown:
            raise UserError(f"the TensorRT engine has I/O of a type this runner cannot hold: {', '.join(unknown)}")
        self.device_in = torch.empty((max_batch, *input_shape), dtype=getattr(torch, TORCH_DTYPES[dtypes[input_name]]), device="cuda")
        self.device_out = torch.empty(output_shape, dtype=getattr(torch, TORCH_DTYPES[dtypes[self.output_name]]), device="cuda")
        self.host_in = torch.empty((max_batch, *input_shape), dtype=torch.float32, pin_memory=True)
        self.host_out = torch.empty(output_shape, dtype=self.device_out.dtype, pin_memory=True)
        self.context.set_tensor_address(input_name, self.device_in.data_ptr())
        self.context.set_tensor_address(self.output_name, self.device_out.data_ptr())
        self.stream = torch.cuda.Stream()
        self._graphs: dict[int, tuple[Any, str]] = {}
        self.info = info
        self.info.details["io_dtypes"] = dtypes
        try:
            inspector = self.engine.create_engine_inspector()
            used, counts = precision_from_inspector(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        except Exception as error:  # noqa: BLE001 - the inspector is diagnostics only
            used, counts = "unknown", {"inspector_error": str(error).splitlines()[0] if str(error) else type(error).__name__}
        self.info.precision_used = used
        self.info.details.update(counts)

    def _set_batch(self, count: int) -> None:
        if count > self.max_batch or count <= 0:
            raise ValueError(f"batch {count} is outside the engine's profile 1..{self.max_batch}")
        if count != self._batch:
            self.context.set_input_shape(self.input_name, (count, *self.input_shape))
            self._batch = count

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _load_host(self, batch: np.ndarray) -> int:
        count = len(batch)
        self._set_batch(count)
        self.host_in[:count].copy_(self.torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        return count

    def infer(self, batch: np.ndarray) -> np.ndarray:
        count = self._load_host(batch)
        torch = self.torch
        with torch.cuda.stream(self.stream):
            self.device_in[:count].copy_(self.host_in[:count], non_blocking=True)
            self._enqueue()
            self.host_out[:count].copy_(self.device_out[:count], non_blocking=True)
        self.stream.synchronize()
        return self.host_out[:count].float().numpy().copy()

    def _graph(self, count: int) -> tuple[Any, str]:
        """A CUDA graph of one enqueue at batch `count`, or (None, why not). Captured once per batch."""
        if count in self._graphs:
            return self._graphs[count]
        torch = self.torch
        self._set_batch(count)
        with torch.cuda.stream(self.stream):
            self._enqueue()                  # one plain enqueue after a shape change, before capturing
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue()
            with torch.cuda.stream(self.stream):
                graph.replay()
            self.stream.synchronize()
            result: tuple[Any, str] = (graph, "captured")
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to plain enqueue
            torch.cuda.synchronize()
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            result = (None, f"capture failed, plain execute_async_v3 used: {message[:200]}")
        self._graphs[count] = result
        return result

    def gpu_latency(self, batch: np.ndarray, protocol: GpuLatencyProtocol = GpuLatencyProtocol(),
                    cuda_graph: bool = True) -> dict[str, Any]:
        """trtexec-style latency of `batch` (float32 N x C x H x W): GPU compute, H2D and D2H
        times in ms (median/p90/p95/p99/mean/min/max), iterations, whether a CUDA graph ran."""
        count = self._load_host(batch)
        graph, note = self._graph(count) if cuda_graph else (None, "disabled")
        self._set_batch(count)

        def h2d() -> None:
            self.device_in[:count].copy_(self.host_in[:count], non_blocking=True)

        def compute() -> None:
            if graph is not None:
                graph.replay()
            else:
                self._enqueue()

        def d2h() -> None:
            self.host_out[:count].copy_(self.device_out[:count], non_blocking=True)

        result = time_iterations(cuda_event_step(self.torch, self.stream, h2d, compute, d2h), protocol)
        result.update(batch=count, cuda_graph=graph is not None, cuda_graph_note=note,
                      throughput_ips=count * 1e3 / result["compute_ms"]["median"] if result["compute_ms"]["median"] > 0 else 0.0)
        return result

    def __del__(self) -> None:
        # context before engine before runtime
        for name in ("_graphs", "context", "engine", "runtime"):
            if hasattr(self, name):
                delattr(self, name)


class TensorRt(CudaDevice, Backend):
    name = NAME
    runtime_modules = ("tensorrt", "torch")
    needs_cuda_gpu = True
    precisions = ("fp16", "int8")
    int8_routes = (QDQ_ROUTE,)

    def load(self, request: LoadRequest) -> Runner:
        self.check_request(request)
        trt = tensorrt_module()
        torch = cuda_torch(NAME)
        model_path = Path(request.onnx_path)
        variant = {"fp16": "fp16 ONNX (onnxconverter-common, float32 I/O)", "int8": "symmetric S8S8 per-channel Q/DQ ONNX (ORT quantize_static)"}
        if request.precision == "fp16":
            model_path = fp16_model(model_path, request.work_dir, NAME)
        else:
            assert request.calibration is not None
            model_path = qdq_symmetric_model(model_path, request.input_name, request.calibration, request.work_dir, NAME)
        onnx_bytes = model_path.read_bytes()
        gpu = str(torch.cuda.get_device_name())
        profile = batch_profile(request.batch)
        key = engine_cache_key(onnx_bytes, str(trt.__version__), gpu, request.precision, profile)
        engine_path = request.work_dir / "tensorrt-engines" / f"{model_path.stem}.{key[:16]}.engine"
        details: dict[str, Any] = {
            "gpu": gpu, "onnx_variant": variant[request.precision], "batch_profile": list(profile),
            "workspace_bytes": WORKSPACE_BYTES, "engine_path": str(engine_path), "engine_cache_key": key,
            "device_memory": f"torch {torch.__version__} CUDA allocator",
        }
        for attempt in range(2):
            cached = engine_path.is_file() and attempt == 0
            if cached:
                plan = engine_path.read_bytes()
                details["strongly_typed_flag"] = None     # not known for a cached plan built earlier
            else:
                plan, typed = build_serialized_engine(trt, onnx_bytes, request.input_name, request.input_shape, profile)
                atomic_write_bytes(engine_path, plan)
                details["strongly_typed_flag"] = typed
            details["engine_cache_hit"] = cached
            info = RunnerInfo(
                backend=NAME, runtime_version=str(trt.__version__), precision_requested=request.precision,
                precision_used="unknown", threads=request.threads, batch=request.batch,
                int8_route=QDQ_ROUTE if request.precision == "int8" else "", model_path=str(model_path), details=dict(details),
            )
            try:
                return TensorRtRunner(trt, torch, plan, request.input_name, request.input_shape, request.batch, info)
            except UserError:
                if not cached:
                    raise
                engine_path.unlink(missing_ok=True)    # a stale or corrupt cached plan: build once more
        raise AssertionError("unreachable")


BACKEND = TensorRt()
