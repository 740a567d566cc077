"""The one small interface every runtime backend implements (after Polygraphy's split).

A *loader* (`Backend.load`) compiles an ONNX model for one precision, with a calibration
set where the precision needs one, and returns a *runner*. A runner has one job:
`infer(batch) -> logits` on float32 NCHW numpy arrays, plus `info`, which says what the
runtime actually compiled (precision used, threads, kernels), not what was asked.

Runtimes are imported lazily inside each backend module, through `import_runtime`, so a
missing runtime is one clear line (`BackendUnavailable`) for that backend only. Nothing
here imports the training side (lapp_edge.training.trainer, lapp_edge.lapp).
"""

from __future__ import annotations

import hashlib
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from lapp_edge.errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class BackendUnavailable(UserError):
    """The runtime a backend needs cannot be imported (not installed, or broken)."""


def import_runtime(module: str, backend: str, install_hint: str) -> ModuleType:
    """Import a runtime module or raise one line naming the backend and how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise BackendUnavailable(
            f"backend {backend} is unavailable: cannot import {module} ({str(error).splitlines()[0] if str(error) else 'ImportError'}); "
            f"install it with {install_hint}"
        ) from None


def runtime_refused(backend: str, path: Path | str, error: BaseException) -> UserError:
    """A runtime's refusal to load or compile a model (a package can hold an ONNX file that
    parses but that the runtime cannot run) as one line, not a traceback."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return UserError(f"backend {backend} cannot load {path}: {first[:300]}")


@dataclass(frozen=True)
class LoadRequest:
    """What to compile: one ONNX model (input NCHW, dynamic batch) for one precision."""

    onnx_path: Path
    input_name: str
    input_shape: tuple[int, int, int]          # C, H, W
    precision: str                             # fp32 | bf16 | int8
    threads: int
    batch: int                                 # the batch the runner is compiled for (static where it helps)
    work_dir: Path                             # where quantized / optimized artifacts are written
    calibration: np.ndarray | None = None      # float32 N x C x H x W, normalised; int8 only
    int8_route: str = ""                       # backend-specific int8 recipe; "" = the backend's default
    profile_nodes: bool = False                # turn the runtime's per-node profiler on (`Runner.node_times`)
    channel_multiple: int = 0                  # the target's kernel block on this CPU; >1: a backend may pad narrow channels to it


@dataclass
class RunnerInfo:
    """What the runtime reports it compiled: the precision actually used, threads, kernels."""

    backend: str
    runtime_version: str
    precision_requested: str
    precision_used: str
    threads: int
    batch: int
    int8_route: str = ""
    model_path: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class NodeProfileUnavailable(UserError):
    """The backend has no per-node profiler this project reads (or the runner was not loaded with one)."""


@dataclass(frozen=True)
class NodeTime:
    """One node of the graph a runtime executes, as its own profiler reports it: the op type the runtime
    runs (after its fusions: ORT "Conv" with a fused activation, OpenVINO "Convolution" with post-ops),
    its input shapes (logical NCHW on OpenVINO; on ORT the shapes of its NCHWc graph, channels padded to
    the block), its first output's shape, and its median time per inference in microseconds."""

    name: str
    op: str
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...]
    us: float


class Runner(ABC):
    """A compiled model: `infer` a float32 NCHW batch, get float32 logits back.

    A runner holds runtime resources (sessions, compiled models, GPU engines and device
    memory): `close()` releases them, and a runner is a context manager that closes itself."""

    info: RunnerInfo

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits (float32, N x classes) for `batch` (float32 N x C x H x W; any N up to the
        compiled batch for static-batch runners)."""

    def node_times(self, batch: np.ndarray, runs: int) -> list[NodeTime]:
        """Run `batch` `runs` times and return every executed node's median time per run, from the runtime's
        own profiler (`LoadRequest.profile_nodes` must have been set). Raises NodeProfileUnavailable where
        the backend has none."""
        raise NodeProfileUnavailable(f"backend {self.info.backend} reports no per-node times")

    def close(self) -> None:
        """Release the runtime's resources (idempotent). Subclasses holding more override it."""
        for name in ("session", "compiled", "request"):
            if hasattr(self, name):
                setattr(self, name, None)

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(ABC):
    """A runtime: its registry name, the precisions and int8 routes it offers (the one table
    profiles are validated against), and the Python modules it needs at load time."""

    name: str
    precisions: tuple[str, ...]
    int8_routes: tuple[str, ...] = ()
    runtime_modules: tuple[str, ...] = ()
    needs_cuda_gpu: bool = False          # runs only where an NVIDIA GPU is visible (backends.runtime_available)
    node_profiler: bool = False           # its runners report per-node times (LoadRequest.profile_nodes, Runner.node_times)

    def device_name(self) -> str:
        """The accelerator this backend runs on, for keying latency records ("NVIDIA H200"); "" for a
        CPU backend, keyed by the CPU alone (measure.machine_key)."""
        return ""

    def device_versions(self) -> dict[str, str]:
        """Versions of the accelerator stack a latency record depends on (torch, CUDA, cuDNN); none for a CPU backend."""
        return {}

    @abstractmethod
    def load(self, request: LoadRequest) -> Runner:
        """Compile `request.onnx_path` for `request.precision` and return a runner."""

    def reference_model_path(self, onnx_path: Path, architecture: dict[str, Any], work_dir: Path) -> Path:
        """The file to load for a latency reference model that exists only as ONNX plus its architecture
        spec (`architecture.json` fields, random weights will do: latency does not depend on them).
        Backends that compile the ONNX graph use it as it is; one that rebuilds the network from
        the spec (torch-cuda) writes what it needs under `work_dir` and returns that."""
        return onnx_path

    def check_request(self, request: LoadRequest) -> None:
        """UserError for a precision, int8 route, thread count or batch this backend cannot take."""
        if request.precision not in self.precisions:
            raise UserError(f"backend {self.name} does not support precision {request.precision} (it supports: {', '.join(self.precisions)})")
        if request.precision == "int8":
            if request.calibration is None or len(request.calibration) == 0:
                raise UserError(f"backend {self.name}: int8 needs a calibration set")
            if request.int8_route and request.int8_route not in self.int8_routes:
                raise UserError(f"backend {self.name}: unknown int8 route '{request.int8_route}' (choose: {', '.join(self.int8_routes)})")
        if request.threads <= 0 or request.batch <= 0:
            raise UserError(f"backend {self.name}: threads and batch must be positive")


def content_digest(onnx_path: Path, calibration: np.ndarray) -> str:
    """The content key of a derived artifact (quantized model): sha256 of the model bytes and
    the calibration data. Recorded in the artifact's sidecar (`deploy/artifacts.py`)."""
    digest = hashlib.sha256(Path(onnx_path).read_bytes())
    digest.update(np.ascontiguousarray(calibration, dtype=np.float32).tobytes())
    return digest.hexdigest()


def artifact_key(onnx_path: Path, calibration: np.ndarray) -> str:
    """The short form of `content_digest` that names the artifact's files in the work directory.
    Anyone holding the package can compute it: a file found under that name is reused only
    if its authenticated sidecar and its own sha256 check out (`deploy/artifacts.py`)."""
    return content_digest(onnx_path, calibration)[:12]


def run_batched(runner: Runner, images: np.ndarray, batch: int) -> np.ndarray:
    """Logits for all of `images`, fed in chunks of `batch` (the last one may be short)."""
    outputs = [runner.infer(images[start : start + batch]) for start in range(0, len(images), batch)]
    return np.concatenate(outputs, axis=0)
