"""GPU backends (TensorRT, torch-cuda): everything that runs without TensorRT or a GPU.

Run here on the CPU: the GPU target profiles, the fp16 ONNX (onnx.checker, ONNX Runtime CPU
against fp32), the symmetric Q/DQ ONNX for TensorRT (zero points, int8 types, per-channel
weight scales, float biases; ONNX Runtime CPU top-1 agreement with fp32 on real
Fashion-MNIST test images), why ORT's U8S8 file does not fit TensorRT, the engine cache key,
the engine-inspector parsing for TensorRT 10 and 11 JSON, the trtexec-style latency
protocol (with a fake clock), the one-line unavailable paths and `benchmarks/tensorrt_check.py`
without TensorRT. Tests marked `gpu` need TensorRT and/or CUDA and skip, saying what was not run.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from lapp_edge.deploy.backends import BACKENDS, BackendUnavailable, LoadRequest, get_backend, run_batched
from lapp_edge.deploy.backends.gpu_measure import GpuLatencyProtocol, summarize_ms, time_iterations
from lapp_edge.deploy.backends.onnx_variants import fp16_model, qdq_symmetric_model
from lapp_edge.deploy.backends.tensorrt import batch_profile, engine_cache_key, precision_from_inspector
from lapp_edge.deploy.calibration_set import draw_calibration, load_definition
from lapp_edge.data.torch_data import Dataset, normalize
from lapp_edge.errors import UserError
from lapp_edge.resources import TARGETS_DIR
from lapp_edge.export.onnx import export_onnx
from lapp_edge.export.verify import ort_session
from lapp_edge.models.fuse import fuse_model
from lapp_edge.models import build_model
from lapp_edge.models.spec import load_slim_model
from lapp_edge.deploy.targets import load_target
from tests.deploy.conftest import changed_profile
from tests.models.test_fuse import randomize_batchnorm

ROOT = Path(__file__).resolve().parents[2]
TARGETS = TARGETS_DIR
INPUT = (1, 28, 28)
FP16_TOLERANCE = 1e-2        # fp16 vs fp32 logits: max |diff| <= 1% of max(1, max |fp32 logit|) (fp16 eps ~1e-3, ~20 layers)
INT8_AGREEMENT = 0.97        # symmetric int8 vs fp32 top-1 agreement on real test images
INT8_TOP1_DROP = 0.01        # and at most 1 point of top-1 lost
TEST_IMAGES = 2000
HAS_CONVERTER = importlib.util.find_spec("onnxconverter_common") is not None
needs_converter = pytest.mark.skipif(not HAS_CONVERTER, reason="onnxconverter-common is not installed (lapp-edge[gpu]): fp16 ONNX production not run")


def has_tensorrt() -> bool:
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init ResNet-20 (bypass branches, non-trivial BN statistics), fused and exported."""
    generator = torch.Generator().manual_seed(7)
    model = build_model("resnet20", 1, 10, bypass=True).eval()
    randomize_batchnorm(model, generator)
    path = tmp_path_factory.mktemp("gpu-random") / "model.onnx"
    path.write_bytes(export_onnx(fuse_model(model), INPUT))
    return path


@pytest.fixture(scope="module")
def trained_onnx(trained_run: Path) -> Path:
    model, _ = load_slim_model(trained_run)
    path = trained_run.parent / "trained.onnx"
    path.write_bytes(export_onnx(fuse_model(model), INPUT))
    return path


@pytest.fixture(scope="module")
def test_images(fmnist: Dataset) -> tuple[np.ndarray, np.ndarray]:
    split = fmnist.test
    return (normalize(split.images[:TEST_IMAGES], fmnist.info).numpy().astype(np.float32),  # type: ignore[attr-defined]
            split.labels[:TEST_IMAGES])


def random_inputs(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *INPUT)).astype(np.float32)


def ort_logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort_session(str(path), threads=1)
    return np.concatenate([session.run(None, {"input": images[i : i + 256]})[0] for i in range(0, len(images), 256)])


# --- profiles and registry -----------------------------------------------------------------------

def test_gpu_profiles_load_and_name_registered_backends() -> None:
    fp16, int8, torch_fp16 = (load_target(TARGETS / f"{n}.yaml") for n in ("gpu-tensorrt-fp16", "gpu-tensorrt-int8", "gpu-torch-cuda-fp16"))
    assert (fp16.backend, fp16.precision, fp16.calibration) == ("tensorrt", "fp16", "")
    assert (int8.backend, int8.precision, int8.int8_routes) == ("tensorrt", "int8", ("qdq-s8s8",))
    assert int8.calibration == "fashion-mnist-train-512"
    assert (torch_fp16.backend, torch_fp16.precision) == ("torch-cuda", "fp16")
    for profile in (fp16, int8, torch_fp16):
        assert profile.input_shape == INPUT and 1 in profile.batch_sizes
        assert profile.latency.min_iterations >= 10 and profile.latency.min_seconds >= 3.0
        assert profile.backend in BACKENDS
    assert fp16.baselines is None and int8.baselines is None          # TensorRT has never run (docs/GPU.md)
    [(machine, record)] = torch_fp16.baselines.machines.items()       # recorded on the lent H200 (docs/GPU.md)
    assert machine.startswith("NVIDIA H200; host ") and sorted(record.speedup) == [1, 32, 256]
    before = set(sys.modules)
    assert get_backend("tensorrt").precisions == ("fp16", "int8")
    assert get_backend("torch-cuda").precisions == ("fp32", "fp16", "bf16")
    assert "tensorrt" not in set(sys.modules) - before           # the backend module imports no runtime


@pytest.mark.parametrize(("changes", "message"), [
    ({"precision": "fp32"}, "no precision 'fp32'"),
    ({"int8_routes": ["qdq-u8s8"]}, "int8_routes must be a list drawn from: qdq-s8s8"),
    ({"calibration": None}, "needs a calibration set"),
])
def test_gpu_profile_errors_are_one_line(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message) as error:
        load_target(changed_profile("gpu-tensorrt-int8", tmp_path, **changes))
    assert "\n" not in str(error.value)


# --- fp16 ONNX ---------------------------------------------------------------------------------

@needs_converter
def test_fp16_onnx_is_valid_float32_io_and_close_to_fp32(random_onnx: Path, tmp_path: Path) -> None:
    path = fp16_model(random_onnx, tmp_path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param          # batch still dynamic
    floats = collections.Counter(t.data_type for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16))
    assert floats[TensorProto.FLOAT16] > 0 and floats[TensorProto.FLOAT] == 0    # every weight and bias is fp16
    ops = collections.Counter(node.op_type for node in model.graph.node)
    assert ops["Cast"] == 2 and ops["Conv"] == 21                                  # one Cast in, one out
    images = random_inputs(64)
    reference, half = ort_logits(random_onnx, images), ort_logits(path, images)
    assert half.dtype == np.float32
    assert np.abs(half - reference).max() <= FP16_TOLERANCE * max(1.0, float(np.abs(reference).max()))
    written = path.stat().st_mtime_ns
    assert fp16_model(random_onnx, tmp_path) == path and path.stat().st_mtime_ns == written      # cached by content


@needs_converter
def test_fp16_onnx_keeps_top1_on_real_images(trained_onnx: Path, test_images: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    images, _ = test_images
    reference = ort_logits(trained_onnx, images)
    half = ort_logits(fp16_model(trained_onnx, tmp_path), images)
    assert np.abs(half - reference).max() <= FP16_TOLERANCE * max(1.0, float(np.abs(reference).max()))
    assert (half.argmax(1) == reference.argmax(1)).mean() >= 0.995


def test_fp16_without_converter_is_one_line(random_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)
    monkeypatch.setitem(sys.modules, "onnxconverter_common.float16", None)
    with pytest.raises(BackendUnavailable, match="cannot import onnxconverter_common") as error:
        fp16_model(random_onnx, tmp_path)
    assert "\n" not in str(error.value) and "lapp-edge[gpu]" in str(error.value)


# --- symmetric Q/DQ ONNX -------------------------------------------------------------------------

def _qdq_parts(model: onnx.ModelProto) -> tuple[dict[str, onnx.TensorProto], list[onnx.NodeProto], list[onnx.NodeProto]]:
    initializers = {t.name: t for t in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    return initializers, quantize, dequantize


def test_symmetric_qdq_onnx_is_what_tensorrt_accepts(random_onnx: Path, tmp_path: Path) -> None:
    calibration = random_inputs(64, seed=1)
    path = qdq_symmetric_model(random_onnx, "input", calibration, tmp_path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    initializers, quantize, dequantize = _qdq_parts(model)
    assert quantize and dequantize
    # zero points: all int8 and all 0 (TensorRT: symmetric only)
    for node in quantize + dequantize:
        assert len(node.input) == 3, f"{node.name} has no explicit zero point"
        zero_point = initializers[node.input[2]]
        assert zero_point.data_type == TensorProto.INT8
        assert not numpy_helper.to_array(zero_point).any()
    # every DequantizeLinear reads int8: activations from a QuantizeLinear, weights from int8 initializers
    quantized_outputs = {n.output[0] for n in quantize}
    weight_dq = [n for n in dequantize if n.input[0] in initializers]
    for node in dequantize:
        assert node.input[0] in quantized_outputs or initializers[node.input[0]].data_type == TensorProto.INT8
    assert not any(t.data_type == TensorProto.INT32 and any(n.input[0] == t.name for n in dequantize) for t in initializers.values())
    # weights: per-channel scales (one per output channel, axis 0), values in TensorRT's [-127, 127]
    producers = {n.output[0]: n for n in dequantize}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 21
    for conv in convs:
        assert conv.input[0] in producers, f"{conv.name}: activation input is not dequantized"
        weight = producers[conv.input[1]]
        values = numpy_helper.to_array(initializers[weight.input[0]])
        scale = numpy_helper.to_array(initializers[weight.input[1]])
        assert values.dtype == np.int8 and values.min() >= -127
        assert scale.shape == (values.shape[0],) and (scale > 0).all()
        assert {a.name: a.i for a in weight.attribute}.get("axis", 1) == 0
        assert len(conv.input) < 3 or initializers[conv.input[2]].data_type == TensorProto.FLOAT   # bias stays float32
    assert len(weight_dq) == len(convs)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")      # the classifier stays float32
    assert gemm.input[1] in initializers and initializers[gemm.input[1]].data_type == TensorProto.FLOAT
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert adds and all(name in producers for n in adds for name in n.input)     # residual Adds read dequantized int8
    # only standard ONNX ops and opsets; Relu kept
    assert {n.domain for n in model.graph.node} == {""}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert collections.Counter(n.op_type for n in model.graph.node)["Relu"] == 19
    # float32 I/O, and ONNX Runtime CPU runs it
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    logits = ort_logits(path, random_inputs(8, seed=2))
    assert logits.shape == (8, 10) and np.isfinite(logits).all()
    again = qdq_symmetric_model(random_onnx, "input", calibration, tmp_path)             # from the work-dir cache:
    assert again.name == path.name and again.read_bytes() == path.read_bytes()           # a checked private copy


def test_ort_u8s8_file_is_not_tensorrt_compatible(random_onnx: Path, tmp_path: Path) -> None:
    """Why TensorRT gets its own Q/DQ file: ORT's U8S8 one has uint8, non-zero activation zero
    points and int32 biases behind DequantizeLinear."""
    from lapp_edge.deploy.backends.onnxruntime_cpu import qdq_model

    model = onnx.load(str(qdq_model(random_onnx, "input", random_inputs(64, seed=1), tmp_path)))
    initializers, quantize, dequantize = _qdq_parts(model)
    activation_zero_points = [initializers[n.input[2]] for n in quantize]
    assert all(z.data_type == TensorProto.UINT8 for z in activation_zero_points)
    assert any(numpy_helper.to_array(z).any() for z in activation_zero_points)
    assert any(n.input[0] in initializers and initializers[n.input[0]].data_type == TensorProto.INT32 for n in dequantize)


def test_symmetric_int8_keeps_top1_on_real_images(trained_onnx: Path, trained_run: Path, fmnist: Dataset,
                                                  test_images: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    _, spec = load_slim_model(trained_run)
    calibration = draw_calibration(load_definition("fashion-mnist-train-512"), spec.mean, spec.std, dataset=fmnist)
    images, labels = test_images
    reference = ort_logits(trained_onnx, images)
    quantized = ort_logits(qdq_symmetric_model(trained_onnx, "input", calibration.images, tmp_path), images)
    fp32_top1, int8_top1 = (reference.argmax(1) == labels).mean(), (quantized.argmax(1) == labels).mean()
    assert fp32_top1 > 0.6, "the fixture model should have learned something"
    assert (quantized.argmax(1) == reference.argmax(1)).mean() >= INT8_AGREEMENT
    assert fp32_top1 - int8_top1 <= INT8_TOP1_DROP


# --- engine cache key, inspector, latency protocol -----------------------------------------------------

def test_engine_cache_key_changes_with_each_input() -> None:
    base = dict(onnx_bytes=b"model-bytes", trt_version="10.13.0.35", gpu_name="NVIDIA H200", precision="fp16", profile=(1, 32, 32))
    key = engine_cache_key(**base)  # type: ignore[arg-type]
    assert len(key) == 64 and int(key, 16) >= 0
    assert engine_cache_key(**base) == key  # type: ignore[arg-type]
    variants = [("onnx_bytes", b"model-bytez"), ("trt_version", "11.4.0.106"), ("gpu_name", "NVIDIA L4"),
                ("precision", "int8"), ("profile", (1, 32, 64)), ("profile", (1, 1, 32))]
    keys = {engine_cache_key(**{**base, name: value}) for name, value in variants}  # type: ignore[arg-type]
    assert len(keys) == len(variants) and key not in keys
    assert batch_profile(32) == (1, 32, 32)


def test_precision_from_inspector_reads_tensorrt_10_and_11_json() -> None:
    v10 = {"Layers": [
        {"Name": "/stem/Conv", "LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "Outputs": [{"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
        {"Name": "/fc/Gemm", "LayerType": "CaskGemmConvolution", "Inputs": [{"Format/Datatype": "Row major linear FP16 format"}],
         "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "/relu", "LayerType": "PointWiseV2", "Inputs": [], "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "Reformatting CopyNode for Input Tensor 0 to /stem/Conv", "LayerType": "Reformat",
         "Inputs": [{"Format/Datatype": "Row major linear FP32"}], "Outputs": [{"Format/Datatype": "Channel major FP16 format"}]},
    ], "Bindings": ["input", "logits"]}
    used, counts = precision_from_inspector(json.dumps(v10))
    assert used == "fp16" and counts["conv_input_precisions"] == {"fp16": 2} and counts["layer_output_precisions"] == {"fp16": 2, "fp32": 2}
    v11 = {"Layers": [
        {"Name": "/layer1/Conv + Relu", "LayerType": "CaskConvolution", "Inputs": [{"Format": "Thirty-two wide channel vectorized", "DataType": "Int8"}],
         "Outputs": [{"Format": "Thirty-two wide channel vectorized", "DataType": "Int8"}]},
        {"Name": "/layer2/Conv", "LayerType": "CaskConvolution", "Inputs": [{"Format": "Row major linear FP32 format (kLINEAR)", "DataType": "Int8"}],
         "Outputs": [{"Format": "Row major linear", "DataType": "Float"}]},
    ], "I/O Tensors": [{"Name": "input", "IOMode": "Input", "DataType": "Float"}]}
    used, counts = precision_from_inspector(json.dumps(v11))
    assert used == "int8" and counts["conv_input_precisions"] == {"int8": 2}
    assert precision_from_inspector(json.dumps({"Layers": ["conv1", "conv2"]}))[0] == "unknown"   # names-only verbosity
    assert precision_from_inspector("not json")[0] == "unknown"


class FakeTensorRt:
    """Records the build calls `build_serialized_engine` makes (not TensorRT: a check of our call sequence)."""

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class ProfilingVerbosity:
        DETAILED = "detailed"

    def __init__(self, parses: bool = True, plan: bytes | None = b"plan", strongly_typed: bool = True) -> None:
        self.calls: dict[str, object] = {}
        fake = self
        if not strongly_typed:
            self.NetworkDefinitionCreationFlag = types.SimpleNamespace()  # type: ignore[misc, assignment]

        class Error:
            def desc(self) -> str:
                return "Invalid Node - x_DequantizeLinear\nmore detail"

            def node(self) -> int:
                return 3

        class Parser:
            num_errors = 0 if parses else 1

            def __init__(self, network: object, logger: object) -> None:
                pass

            def parse(self, data: bytes) -> bool:
                fake.calls["parsed_bytes"] = len(data)
                return parses

            def get_error(self, index: int) -> Error:
                return Error()

        class Profile:
            def set_shape(self, name: str, low: tuple[int, ...], opt: tuple[int, ...], high: tuple[int, ...]) -> None:
                fake.calls["profile"] = (name, low, opt, high)

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls["pool"] = (pool, size)

            def add_optimization_profile(self, profile: Profile) -> None:
                fake.calls["profiles_added"] = 1

        class Builder:
            def __init__(self, logger: object) -> None:
                pass

            def create_network(self, flags: int) -> object:
                fake.calls["network_flags"] = flags
                return object()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: object, config: Config) -> bytes | None:
                fake.calls["verbosity"] = getattr(config, "profiling_verbosity", None)
                return plan

        self.OnnxParser, self.Builder = Parser, Builder


def test_engine_build_call_sequence_with_a_fake_tensorrt() -> None:
    from lapp_edge.deploy.backends.tensorrt import WORKSPACE_BYTES, build_serialized_engine

    fake = FakeTensorRt()
    plan, typed = build_serialized_engine(fake, b"onnx", "input", INPUT, (1, 8, 8))
    assert plan == b"plan" and typed
    assert fake.calls == {"network_flags": 1 << 1, "parsed_bytes": 4, "pool": ("workspace", WORKSPACE_BYTES),
                          "profile": ("input", (1, 1, 28, 28), (8, 1, 28, 28), (8, 1, 28, 28)), "profiles_added": 1,
                          "verbosity": "detailed"}
    untyped = FakeTensorRt(strongly_typed=False)          # an 11.x that dropped the (ignored) flag: plain create_network(0)
    assert build_serialized_engine(untyped, b"onnx", "input", INPUT, (1, 8, 8)) == (b"plan", False)
    assert untyped.calls["network_flags"] == 0
    with pytest.raises(UserError, match="TensorRT cannot parse the ONNX model: node 3: Invalid Node - x_DequantizeLinear$"):
        build_serialized_engine(FakeTensorRt(parses=False), b"onnx", "input", INPUT, (1, 8, 8))
    with pytest.raises(UserError, match="could not build an engine"):
        build_serialized_engine(FakeTensorRt(plan=None), b"onnx", "input", INPUT, (1, 8, 8))


def test_tensorrt_backend_uses_no_tensorrt_8_api() -> None:
    source = (ROOT / "lapp_edge" / "deploy" / "backends" / "tensorrt.py").read_text()
    code = source.split('"""', 2)[2]                       # past the module docstring, which names what is not used
    for old in ("execute_v2", "execute_async_v2", "build_engine(", "get_binding", "binding_is_input", "max_workspace_size",
                "EXPLICIT_BATCH", "BuilderFlag", "int8_calibrator", "IInt8", "device_memory_size"):
        assert old not in code, old
    for new in ("create_network(", "OnnxParser(", "set_memory_pool_limit(", "create_optimization_profile(", "build_serialized_network(",
                "deserialize_cuda_engine(", "num_io_tensors", "get_tensor_name(", "get_tensor_mode(", "set_input_shape(",
                "set_tensor_address(", "execute_async_v3("):
        assert new in code, new


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_latency_protocol_is_trtexec_like() -> None:
    clock = FakeClock()
    samples = iter(range(1, 10_000))

    def step() -> tuple[float, float, float]:          # each iteration takes 62.5 ms of wall time (exact in binary)
        clock.now += 0.0625
        n = next(samples)
        return 0.01, float(n), 0.02

    result = time_iterations(step, GpuLatencyProtocol(), clock)
    assert result["warmup_iterations"] == 4                      # 200 ms of warm-up: 4 x 62.5 ms
    assert result["iterations"] == 48 and result["seconds"] == 3.0  # 3 s at 62.5 ms per iteration
    compute = result["compute_ms"]
    assert compute["median"] == pytest.approx(np.median(np.arange(5, 53)))
    assert compute["p99"] == pytest.approx(np.percentile(np.arange(5, 53), 99))
    assert set(compute) == {"median", "p90", "p95", "p99", "mean", "min", "max"}
    assert result["h2d_ms"]["median"] == pytest.approx(0.01) and result["d2h_ms"]["median"] == pytest.approx(0.02)
    assert result["end_to_end_ms"]["min"] == pytest.approx(5.03)
    clock.now = 0.0

    def slow() -> tuple[float, float, float]:            # 1 s per iteration: still at least 10 iterations
        clock.now += 1.0
        return 0.0, 1.0, 0.0

    slow_result = time_iterations(slow, GpuLatencyProtocol(max_seconds=5.0), clock)
    assert slow_result["warmup_iterations"] == 1 and slow_result["iterations"] == 10
    assert summarize_ms([]) == {}


# --- unavailable paths -----------------------------------------------------------------------------

def _request(onnx_path: Path, precision: str, work: Path, calibration: np.ndarray | None = None, route: str = "") -> LoadRequest:
    return LoadRequest(onnx_path, "input", INPUT, precision, 1, 8, work, calibration, route)


def test_missing_tensorrt_is_one_line(random_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)      # `import tensorrt` raises ImportError
    with pytest.raises(BackendUnavailable, match="backend tensorrt is unavailable: cannot import tensorrt") as error:
        get_backend("tensorrt").load(_request(random_onnx, "fp16", tmp_path))
    assert "\n" not in str(error.value)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(BackendUnavailable, match="TensorRT 8.6.1 found, this backend needs 10.x or 11.x"):
        get_backend("tensorrt").load(_request(random_onnx, "fp16", tmp_path))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.0.35"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="backend tensorrt is unavailable: no CUDA GPU is visible to torch") as error:
        get_backend("tensorrt").load(_request(random_onnx, "fp16", tmp_path))
    assert "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())                      # nothing converted before the checks


def test_torch_cuda_without_cuda_is_one_line(random_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="backend torch-cuda is unavailable: no CUDA GPU is visible to torch") as error:
        get_backend("torch-cuda").load(_request(random_onnx, "fp16", tmp_path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("backend", "precision", "route", "message"), [
    ("tensorrt", "fp32", "", "does not support precision fp32"),
    ("tensorrt", "int8", "qdq-u8s8", "unknown int8 route 'qdq-u8s8'"),
    ("torch-cuda", "int8", "", "does not support precision int8"),
])
def test_gpu_backends_refuse_what_they_do_not_do(random_onnx: Path, tmp_path: Path, backend: str, precision: str, route: str,
                                                 message: str) -> None:
    calibration = random_inputs(4) if precision == "int8" else None
    with pytest.raises(UserError, match=message):
        get_backend(backend).load(_request(random_onnx, precision, tmp_path, calibration, route))


def test_tensorrt_check_without_tensorrt_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    if has_tensorrt() and torch.cuda.is_available():
        pytest.skip("TensorRT and a CUDA GPU are present: the 'not available' path of tensorrt_check.py was not exercised")
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tensorrt_check.py"), "--package", str(tmp_path / "none")],
                             capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300)
    assert process.returncode == 2
    assert process.stdout == ""
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tensorrt_check: not run: backend tensorrt is unavailable")


# --- on a GPU (skipped here) ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engine_on_gpu(precision: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if not has_tensorrt():
        pytest.skip(f"TensorRT is not installed: the TensorRT {precision} engine build, inference, engine cache and GPU latency were NOT run")
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA GPU: the TensorRT {precision} engine build, inference, engine cache and GPU latency were NOT run")
    trained_onnx: Path = request.getfixturevalue("trained_onnx")
    images, labels = request.getfixturevalue("test_images")
    calibration = None
    if precision == "int8":
        _, spec = load_slim_model(request.getfixturevalue("trained_run"))
        calibration = draw_calibration(load_definition("fashion-mnist-train-512"), spec.mean, spec.std,
                                       dataset=request.getfixturevalue("fmnist")).images
    load = LoadRequest(trained_onnx, "input", INPUT, precision, 1, 32, tmp_path, calibration, "")
    runner = get_backend("tensorrt").load(load)
    assert runner.info.details["engine_cache_hit"] is False
    reference = ort_logits(trained_onnx, images)
    logits = run_batched(runner, images, 32)
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= (0.995 if precision == "fp16" else INT8_AGREEMENT)
    assert runner.info.precision_used == precision
    again = get_backend("tensorrt").load(load)
    assert again.info.details["engine_cache_hit"] is True
    latency = runner.gpu_latency(images[:32], GpuLatencyProtocol(min_seconds=0.5))  # type: ignore[attr-defined]
    assert latency["iterations"] >= 10 and latency["compute_ms"]["median"] > 0 and latency["h2d_ms"]["median"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_cuda_on_gpu(precision: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA GPU: the torch-cuda {precision} runner (fused model, CUDA graphs) and its GPU latency were NOT run")
    from lapp_edge.export.package_writer import export_run
    from lapp_edge.deploy.package import load_package

    export_run(request.getfixturevalue("trained_run"), tmp_path / "package", images=200)
    package = load_package(tmp_path / "package")
    images, _ = request.getfixturevalue("test_images")
    runner = get_backend("torch-cuda").load(LoadRequest(package.onnx_path, package.input_name, package.input_shape, precision, 1, 32, tmp_path))
    reference = ort_logits(package.onnx_path, images)
    logits = run_batched(runner, images, 32)
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.99
    assert runner.info.precision_used == precision and runner.info.details["execution"] in ("cuda-graph", "eager")
    latency = runner.gpu_latency(images[:32], GpuLatencyProtocol(min_seconds=0.5))  # type: ignore[attr-defined]
    assert latency["iterations"] >= 10 and latency["compute_ms"]["median"] > 0
