"""Runtime backends: one module per runtime behind the interface in `base.py`.

The registry is built from the backend classes themselves: each backend declares its name,
its precisions and its int8 routes, and target profiles are validated against that (one
table, here). Backend modules import their runtime only when a model is loaded, so
importing this registry imports no runtime, and a missing runtime fails one target with
one line (`BackendUnavailable`) and leaves the others running.

Adding a backend: one module in this package defining a `Backend` subclass, listed in
`BACKEND_CLASSES` below, plus its profiles in `lapp_edge/resources/targets/`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lapp_edge.deploy.backends.base import (
    Backend, BackendUnavailable, LoadRequest, NodeProfileUnavailable, NodeTime, Runner, RunnerInfo, run_batched,
)
from lapp_edge.deploy.backends.onnxruntime_cpu import OnnxRuntimeCpu
from lapp_edge.deploy.backends.openvino_cpu import OpenVinoCpu
from lapp_edge.deploy.backends.tensorrt import TensorRt
from lapp_edge.deploy.backends.torch_cuda import TorchCuda
from lapp_edge.errors import UserError

BACKEND_CLASSES: tuple[type[Backend], ...] = (OnnxRuntimeCpu, OpenVinoCpu, TensorRt, TorchCuda)
BACKENDS: dict[str, Backend] = {cls.name: cls() for cls in BACKEND_CLASSES}


def get_backend(name: str) -> Backend:
    """The backend registered as `name`; UserError naming the known ones otherwise."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def nvidia_gpu_visible() -> bool:
    """Whether the NVIDIA driver shows a GPU here (/proc/driver/nvidia/gpus, /dev/nvidia0), read without
    importing torch or a CUDA library."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def runtime_available(name: str) -> tuple[bool, str]:
    """Whether backend `name` can run here: its runtime modules can be found (without importing them)
    and, for a CUDA backend, an NVIDIA GPU is visible; and why not."""
    backend = get_backend(name)
    missing = [module for module in backend.runtime_modules if importlib.util.find_spec(module) is None]
    if missing:
        return False, f"{', '.join(missing)} not installed"
    if backend.needs_cuda_gpu and not nvidia_gpu_visible():
        return False, "no CUDA GPU visible"
    return True, ""


__all__ = [
    "BACKENDS", "BACKEND_CLASSES", "Backend", "BackendUnavailable", "LoadRequest", "NodeProfileUnavailable", "NodeTime",
    "Runner", "RunnerInfo",
    "get_backend", "run_batched", "runtime_available",
]
