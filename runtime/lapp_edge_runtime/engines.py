"""Load a bundle's artifact in its runtime, with the settings recorded in bundle.json.

onnxruntime: `runtime.model` is an ONNX file (fp32, or Q/DQ int8). `runtime.settings`
    holds graph_optimization_level, intra_op_num_threads, inter_op_num_threads and
    execution_mode, applied to the session as recorded (CPU execution provider).
openvino: `runtime.model` is an OpenVINO IR (.xml, weights in `runtime.weights`).
    `runtime.settings` is the compile config (INFERENCE_PRECISION_HINT,
    INFERENCE_NUM_THREADS, PERFORMANCE_HINT, NUM_STREAMS). The model is reshaped to a
    static batch (as the builder measured it), its input bound once to a shared buffer; a
    shorter batch is zero-padded and the padding's outputs dropped.

The runtime is imported here, lazily; a missing one is one line naming the pip extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

from lapp_edge_runtime.bundle import Bundle, RunnerError, one_line


def import_runtime(module: str) -> ModuleType:
    """Import `module` (onnxruntime or openvino) or raise one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise RunnerError(
            f"this bundle runs on {module}, which cannot be imported ({one_line(error)}): "
            f"install it with pip install 'lapp-edge-runtime[{module}]'"
        ) from None


class Engine:
    """A compiled model: `infer` float32 N x C x H x W (N <= batch) -> float32 N x classes."""

    batch: int
    version: str
    description: str

    def infer(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OrtEngine(Engine):
    def __init__(self, bundle: Bundle, batch: int) -> None:
        ort = import_runtime("onnxruntime")
        settings = bundle.runtime["settings"]
        try:
            options = ort.SessionOptions()
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, str(settings["graph_optimization_level"]))
            options.intra_op_num_threads = int(settings["intra_op_num_threads"])
            options.inter_op_num_threads = int(settings["inter_op_num_threads"])
            options.execution_mode = getattr(ort.ExecutionMode, str(settings["execution_mode"]))
            options.log_severity_level = 3
            self.session = ort.InferenceSession(
                str(bundle.path(bundle.runtime["model"])), sess_options=options, providers=["CPUExecutionProvider"])
        except (KeyError, AttributeError, TypeError, ValueError) as error:
            raise RunnerError(f"bundle.json: runtime.settings are not onnxruntime session settings ({one_line(error)})") from None
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise RunnerError(f"onnxruntime cannot load {bundle.runtime['model']}: {one_line(error)}") from None
        self.input_name = str(bundle.manifest["model"]["input_name"])
        self.batch = batch
        self.version = str(ort.__version__)
        self.description = (f"onnxruntime {self.version}, {bundle.runtime['inference_precision']}, "
                            f"{options.intra_op_num_threads} thread(s)")

    def infer(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0])


class OpenVinoEngine(Engine):
    def __init__(self, bundle: Bundle, batch: int) -> None:
        ov = import_runtime("openvino")
        config: dict[str, Any] = dict(bundle.runtime["settings"])
        try:
            core = ov.Core()
            model = core.read_model(str(bundle.path(bundle.runtime["model"])))
            model.reshape({model.input(0).get_any_name(): [batch, *bundle.input_shape]})
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as error:  # noqa: BLE001 - openvino raises RuntimeError and its own types
            raise RunnerError(f"openvino cannot compile {bundle.runtime['model']}: {one_line(error)}") from None
        # the input is bound once to a buffer the request shares: `request.infer([batch])` wraps inputs and results in
        # Python objects on every call (about 45 us at batch 1 on an AVX-512 EPYC; what lapp-edge's builder measures
        # without, `openvino_cpu.StaticBatchRequest`)
        self.request = self.compiled.create_infer_request()
        self.batch = batch
        self.buffer = np.zeros((batch, *bundle.input_shape), dtype=np.float32)
        self.request.set_input_tensor(ov.Tensor(self.buffer, shared_memory=True))
        self.version = str(ov.get_version())
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        used = hint.to_string() if hasattr(hint, "to_string") else hint
        threads = self.compiled.get_property("INFERENCE_NUM_THREADS")
        self.description = (f"openvino {self.version}, {bundle.runtime['inference_precision']} "
                            f"(compiled inference precision {used}), {threads} thread(s)")

    def infer(self, images: np.ndarray) -> np.ndarray:
        count = len(images)
        if count > self.batch:
            raise ValueError(f"batch {count} exceeds the compiled static batch {self.batch}")
        self.buffer[:count] = images
        if count < self.batch:
            self.buffer[count:] = 0.0
        self.request.infer()
        return np.array(self.request.get_output_tensor(0).data[:count], dtype=np.float32)


def load_engine(bundle: Bundle, batch: int) -> Engine:
    """The bundle's artifact compiled by its runtime for batches of up to `batch` images."""
    if bundle.runtime["module"] == "onnxruntime":
        return OrtEngine(bundle, batch)
    return OpenVinoEngine(bundle, batch)


def infer_all(engine: Engine, images: np.ndarray) -> np.ndarray:
    """Outputs for all of `images` (float32 N x C x H x W), fed in chunks of `engine.batch`."""
    chunks = [engine.infer(images[start:start + engine.batch]) for start in range(0, len(images), engine.batch)]
    return np.concatenate(chunks, axis=0).astype(np.float32)
