"""ONNX variants that carry their precision in the graph itself, for runtimes that build
strongly typed networks (TensorRT 10 with STRONGLY_TYPED, TensorRT 11 always).

TensorRT 11 removed the FP16/BF16/INT8 builder flags and the implicit INT8 calibrators:
a float32 ONNX builds a float32 engine, so lower precision has to be written into the
ONNX before the build. Both producers here need only `onnx`, ONNX Runtime's quantization
tools and (fp16) `onnxconverter-common`; none imports TensorRT or needs a GPU, so they are
tested on the CPU.

fp16  `onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)`: every
      float initializer and activation becomes float16, the graph input and output stay
      float32 (one Cast after the input, one before the output), so runners keep feeding
      float32 NCHW and reading float32 logits.

int8  Explicit Q/DQ by `onnxruntime.quantization.quantize_static` (QDQ format, MinMax over
      the calibration set), with the settings TensorRT's explicit quantization accepts:
        - activations QInt8 with ActivationSymmetric=True: zero point 0, int8. TensorRT only
          implements symmetric quantization and rejects a non-zero zero point.
        - weights QInt8, per channel, WeightSymmetric=True: zero point 0, values in
          [-127, 127] (TensorRT's weight range).
        - QuantizeBias=False: biases stay float32. ORT otherwise stores them as int32 behind
          a DequantizeLinear, and TensorRT's parser rejects a DequantizeLinear fed by int32
          ("only activation types allowed as input to this layer").
        - only Conv and Add are quantized (op_types_to_quantize): convolutions run int8 and
          the residual Add can fuse into them; the classifier Gemm (and pooling) stays float32.
          With ORT's default op list (Gemm too) top-1 agreement with fp32 on Fashion-MNIST
          test images fell to 0.966-0.968 on a briefly trained ResNet-20; with Conv + Add it
          was 0.984 (U8S8 with everything quantized: 0.978), top-1 unchanged within 0.2 points.
        - opset imports that no node uses (ORT's optimizer adds com.microsoft & co.) are
          dropped, so the file names only the default ONNX domain.
      The ONNX Runtime CPU route (`onnxruntime_cpu.qdq_model`, U8S8) cannot serve TensorRT
      as is: its activations are uint8 with non-zero zero points (asymmetric), its biases are
      int32 DequantizeLinear inputs, and ORT drops the Relu nodes that asymmetric ranges
      make redundant. The symmetric variant keeps Relu (symmetric ranges do not absorb it).
      ORT CPU still runs the symmetric file (as float Conv between Q/DQ pairs or S8S8
      kernels), which is how it is checked here without a GPU.

Errors: `BackendUnavailable` (one line) when onnxconverter-common or ONNX Runtime's
quantization tools cannot be imported; `UserError` when the converted model fails
onnx.checker.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.deploy.backends.base import import_runtime
from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_bytes

GPU_HINT = "'pip install onnxconverter-common' (or lapp-edge[gpu])"
QUANTIZED_OPS = ["Conv", "Add"]
SYMMETRIC_QDQ_OPTIONS: dict[str, Any] = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
}


def _check(model: Any, what: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise UserError(f"the {what} ONNX model fails onnx.checker: {str(error).splitlines()[0][:200]}") from None


def fp16_model(onnx_path: Path, work_dir: Path, backend: str = "tensorrt") -> Path:
    """The float16 copy of `onnx_path` with float32 input/output (cached in `work_dir` by content).

    Shapes are unchanged (input N x C x H x W float32, output N x classes float32); weights and
    activations inside are float16. Values beyond the fp16 range are clamped by the converter
    (max finite 1e4, min positive 1e-7; its warnings are silenced, the count is not needed).
    Raises BackendUnavailable (one line, naming `backend`) without onnxconverter-common.
    """
    float16 = import_runtime("onnxconverter_common.float16", backend, GPU_HINT)
    import onnx

    data = Path(onnx_path).read_bytes()
    work_dir.mkdir(parents=True, exist_ok=True)
    output = work_dir / f"{Path(onnx_path).stem}.fp16.{hashlib.sha256(data).hexdigest()[:12]}.onnx"
    if output.is_file():
        return output
    model = onnx.load_from_string(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    _check(converted, "fp16")
    atomic_write_bytes(output, converted.SerializeToString())
    return output


def drop_unused_opsets(model: Any) -> None:
    """Remove opset imports of domains no node uses (keeps the default domain)."""
    used = {node.domain or "" for node in model.graph.node} | {""}
    kept = [opset for opset in model.opset_import if (opset.domain or "") in used or opset.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def qdq_symmetric_model(onnx_path: Path, input_name: str, calibration: np.ndarray, work_dir: Path,
                        backend: str = "tensorrt") -> Path:
    """The S8S8 symmetric per-channel Q/DQ model of `onnx_path` (cached in `work_dir`).

    `calibration`: float32 N x C x H x W, normalised like the model's inputs; fed in batches of
    32 to MinMax calibration. Input and output stay float32 with the original names and shapes.
    Raises BackendUnavailable (one line, naming `backend`) without ONNX Runtime's quantization
    tools, UserError when the result fails onnx.checker.
    """
    from lapp_edge.deploy.backends.onnxruntime_cpu import static_qdq

    def finish(model: Any) -> None:
        drop_unused_opsets(model)
        _check(model, "int8 Q/DQ")

    return static_qdq(onnx_path, input_name, calibration, work_dir, "qdq-s8s8", "QInt8", backend,
                      op_types=list(QUANTIZED_OPS), extra_options=dict(SYMMETRIC_QDQ_OPTIONS), postprocess=finish)
