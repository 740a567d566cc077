"""OpenVINO on the CPU: f32, bf16 and int8 (two routes).

Every compile sets INFERENCE_PRECISION_HINT, INFERENCE_NUM_THREADS, PERFORMANCE_HINT
(LATENCY) and NUM_STREAMS (1) explicitly: left alone, OpenVINO runs bf16 on a CPU with
native bf16 (AMX, or AVX512-BF16 as on our AMD EPYC box). The runner reports what the compiled model says it uses (`get_property`) and the
kernels of the runtime model (each op's `primitiveType` / `runtimePrecision`), so a
"f32" target that silently ran bf16 would show.

The model is converted with `ov.convert_model` (it fuses more than `read_model`) and
reshaped to a static batch (faster than a dynamic one); a shorter batch is zero-padded
and the padding's logits dropped (images are independent at inference).

int8 routes:
  nncf     NNCF post-training quantization of the OpenVINO model, MinMax activation
           ranges and no bias correction (NNCF's defaults lost accuracy here).
  ort-qdq  the U8S8 Q/DQ ONNX made by the ONNX Runtime backend, read by OpenVINO,
           which runs its Q/DQ pairs as int8 kernels: one artifact for both runtimes.
For int8 the precision hint applies to the ops left unquantized; it is f32.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.deploy import artifacts
from lapp_edge.deploy.backends.base import (
    Backend, LoadRequest, NodeProfileUnavailable, NodeTime, Runner, RunnerInfo, content_digest, import_runtime, runtime_refused,
)
from lapp_edge.errors import UserError

NAME = "openvino-cpu"
INSTALL_HINT = "'pip install openvino nncf' (or lapp-edge[openvino])"
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
NNCF_ROUTE, QDQ_ROUTE = "nncf", "ort-qdq"


def _ov() -> Any:
    decline_telemetry()
    return import_runtime("openvino", NAME, INSTALL_HINT)


def decline_telemetry() -> None:
    """Decline OpenVINO's usage telemetry for this process. `ov.convert_model` reports usage through
    `openvino_telemetry`, which is on unless a consent file says no; it sends each event from a forked
    copy of this process and waits up to 3 s for it. Measured here (no network): convert_model of
    ResNet-20 took 0.32 s with it, 0.11 s without, and every conversion forked a ~600 MB process.
    Only this process is affected (no consent file is written; `opt_in_out --opt_out` is the
    machine-wide switch). A library without the checker (the stub ovc falls back to) needs nothing."""
    try:
        from openvino_telemetry.utils import opt_in_checker
    except ImportError:
        return
    opt_in_checker.OptInChecker.check = lambda self, *args, **kwargs: opt_in_checker.ConsentCheckResult.DECLINED


def nncf_quantize(model: Any, calibration: np.ndarray) -> Any:
    """NNCF PTQ with the recipe that kept accuracy here: MinMax ranges, no bias correction."""
    nncf = import_runtime("nncf", NAME, INSTALL_HINT)
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    samples = [np.ascontiguousarray(calibration[i : i + 1], dtype=np.float32) for i in range(len(calibration))]
    return nncf.quantize(
        model, nncf.Dataset(samples), subset_size=len(samples),
        advanced_parameters=AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX, disable_bias_correction=True,
        ),
    )


def _text(rt_info: Any, key: str) -> str:
    return str(rt_info[key].astype(str)) if key in rt_info else "?"


def _property(compiled: Any, key: str) -> str:
    value = compiled.get_property(key)
    return str(value.to_string()) if hasattr(value, "to_string") else str(value)


def nncf_model(onnx_path: Path, calibration: np.ndarray, work_dir: Path) -> Path:
    """The NNCF-quantized OpenVINO IR of `onnx_path` (dynamic batch, f32 weights kept), as a private
    copy to load (xml + bin). Cached in work_dir like `onnxruntime_cpu.qdq_model` (deploy/artifacts.py)."""
    ov = _ov()
    work_dir = artifacts.work_directory(work_dir)
    digest = content_digest(onnx_path, calibration)
    name = f"{Path(onnx_path).stem}.int8-nncf.{digest[:12]}"
    members = (f"{name}.xml", f"{name}.bin")
    cached = artifacts.fetch(work_dir, name, digest, members)
    if cached is not None:
        return cached[members[0]]
    output = artifacts.private_directory() / members[0]
    quantized = nncf_quantize(ov.convert_model(str(onnx_path)), calibration)
    ov.save_model(quantized, str(output), compress_to_fp16=False)
    artifacts.publish(work_dir, name, digest, {member: output.parent / member for member in members})
    return output


def runtime_kernels(compiled: Any) -> dict[str, Any]:
    """Kernel and precision counts of the compiled (runtime) model, for convolutions and overall."""
    conv_kernels: Counter[str] = Counter()
    conv_precisions: Counter[str] = Counter()
    precisions: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = _text(info, "layerType")
        precision = _text(info, "runtimePrecision")
        primitive = _text(info, "primitiveType")
        if layer in ("Input", "Output", "Const"):
            continue
        precisions[precision] += 1
        if layer in ("Convolution", "GroupConvolution", "FullyConnected"):
            conv_kernels[f"{layer}:{primitive}"] += 1
            conv_precisions[precision] += 1
    return {
        "conv_kernels": dict(sorted(conv_kernels.items())),
        "conv_precisions": dict(sorted(conv_precisions.items())),
        "op_precisions": dict(sorted(precisions.items())),
    }


def _precision_used(requested: str, conv_precisions: dict[str, int]) -> str:
    """The precision most convolutions / FC layers actually run in (u8/i8 -> int8)."""
    if not conv_precisions:
        return "unknown"
    top = max(conv_precisions.items(), key=lambda item: item[1])[0].lower()
    if top in ("u8", "i8"):
        return "int8"
    return {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(top, top)


class StaticBatchRequest:
    """One infer request of a model compiled for a static batch, its input bound once to a buffer it shares
    (`ov.Tensor(shared_memory=True)`): `infer` copies a batch in (zero-padding a short one), runs
    `request.infer()` and copies the first N rows of the output out.

    Why not `request.infer([batch], share_inputs=True)`: that call wraps its inputs and results in Python
    objects on every inference, which cost about 45 us per call on the AVX-512 EPYC without AVX-VNNI
    (openvino 2026.4.1, the demo's ResNet-20 at batch 1: dense 374 -> 330 us, slim 229 -> 184 us in bf16;
    docs/RESULTS.md, "OpenVINO: 45 us of every batch-1 inference was the Python call"); a deployed application
    pays none of it, so neither do the latency figures, nor a bundle's runner."""

    def __init__(self, compiled: Any, input_shape: tuple[int, int, int], batch: int) -> None:
        ov = _ov()
        self.request = compiled.create_infer_request()
        self.batch = batch
        self.buffer = np.zeros((batch, *input_shape), dtype=np.float32)
        self.request.set_input_tensor(ov.Tensor(self.buffer, shared_memory=True))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 N x C x H x W (N <= the compiled batch) -> float32 N x classes (a copy). ValueError for a
        larger N."""
        count = len(batch)
        if count > self.batch:
            raise ValueError(f"batch {count} exceeds the compiled static batch {self.batch}")
        self.buffer[:count] = batch
        if count < self.batch:
            self.buffer[count:] = 0.0
        self.request.infer()
        return np.array(self.request.get_output_tensor(0).data[:count], dtype=np.float32)


class OpenVinoRunner(Runner):
    def __init__(self, compiled: Any, info: RunnerInfo, input_shape: tuple[int, int, int]) -> None:
        self.compiled = compiled
        self.static = StaticBatchRequest(compiled, input_shape, info.batch)
        self.info = info

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.static.infer(batch)

    def node_times(self, batch: np.ndarray, runs: int) -> list[NodeTime]:
        """OpenVINO's performance counters (`PERF_COUNT`): after each of `runs` inferences, every executed
        node's `real_time`; median per node. Shapes are the runtime model's (logical NCHW; a grouped conv's
        weights G x O/G x I/G x kh x kw)."""
        if str(self.compiled.get_property("PERF_COUNT")).upper() not in ("YES", "TRUE"):     # a string: "YES" / "NO"
            raise NodeProfileUnavailable("this OpenVINO model was compiled without PERF_COUNT (LoadRequest.profile_nodes)")
        durations: dict[str, list[float]] = {}
        kinds: dict[str, str] = {}
        for _ in range(runs):
            self.infer(batch)
            for info in self.static.request.get_profiling_info():
                if info.status == info.Status.EXECUTED:
                    durations.setdefault(info.node_name, []).append(info.real_time.total_seconds() * 1e6)
                    kinds[info.node_name] = info.node_type
        ops = {op.get_friendly_name(): op for op in self.compiled.get_runtime_model().get_ordered_ops()}
        nodes = []
        for name, times in durations.items():
            op = ops.get(name)
            inputs = tuple(_static_shape(op.get_input_partial_shape(i)) for i in range(op.get_input_size())) if op is not None else ()
            output = _static_shape(op.get_output_partial_shape(0)) if op is not None and op.get_output_size() else ()
            nodes.append(NodeTime(name, kinds[name], inputs, output, float(np.median(times))))
        return nodes


def _static_shape(shape: Any) -> tuple[int, ...]:
    """A partial shape's dimensions (-1 where one is dynamic)."""
    return tuple(int(d.get_length()) if d.is_static else -1 for d in shape)


class OpenVinoCpu(Backend):
    name = NAME
    precisions = ("fp32", "bf16", "int8")
    runtime_modules = ("openvino",)
    int8_routes = (NNCF_ROUTE, QDQ_ROUTE)
    node_profiler = True

    def load(self, request: LoadRequest) -> Runner:
        self.check_request(request)
        ov = _ov()
        artifacts.work_directory(request.work_dir)
        route = (request.int8_route or NNCF_ROUTE) if request.precision == "int8" else ""
        model_path = Path(request.onnx_path)
        if route == QDQ_ROUTE:
            from lapp_edge.deploy.backends.onnxruntime_cpu import qdq_model

            assert request.calibration is not None
            model_path = qdq_model(model_path, request.input_name, request.calibration, request.work_dir)
        config = {
            "INFERENCE_PRECISION_HINT": HINTS[request.precision],
            "INFERENCE_NUM_THREADS": request.threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            **({"PERF_COUNT": True} if request.profile_nodes else {}),
        }
        try:
            if route == NNCF_ROUTE:
                assert request.calibration is not None
                model = ov.Core().read_model(str(nncf_model(model_path, request.calibration, request.work_dir)))
            else:
                model = ov.convert_model(str(model_path))
            model.reshape({model.input(0).get_any_name(): [request.batch, *request.input_shape]})
            compiled = ov.Core().compile_model(model, "CPU", config)
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - OpenVINO's own exception types; a model it cannot convert is bad input
            raise runtime_refused(NAME, request.onnx_path, error) from None
        kernels = runtime_kernels(compiled)
        properties = {
            key: _property(compiled, key)
            for key in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT", "EXECUTION_MODE_HINT")
        }
        info = RunnerInfo(
            backend=NAME, runtime_version=str(ov.get_version()), precision_requested=request.precision,
            precision_used=_precision_used(request.precision, kernels["conv_precisions"]),
            threads=int(compiled.get_property("INFERENCE_NUM_THREADS")), batch=request.batch, int8_route=route,
            model_path=str(model_path), details={"compiled_properties": properties, **kernels},
        )
        return OpenVinoRunner(compiled, info, request.input_shape)


BACKEND = OpenVinoCpu()
