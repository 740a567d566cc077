"""Runtime backends: one module per runtime behind the interface in `base.py`.

`get_backend(name)` imports that backend's module only; the runtime itself is imported
when a model is loaded, so a missing runtime fails one target with one line and leaves
the others running.
"""

from __future__ import annotations

import importlib

from lapp_edge.backends.base import Backend, BackendUnavailable, LoadRequest, Runner, RunnerInfo, run_batched
from lapp_edge.errors import UserError

BACKEND_MODULES: dict[str, str] = {
    "onnxruntime-cpu": "lapp_edge.backends.onnxruntime_cpu",
    "openvino-cpu": "lapp_edge.backends.openvino_cpu",
}
BACKEND_PRECISIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime-cpu": ("fp32", "int8"),
    "openvino-cpu": ("fp32", "bf16", "int8"),
}


def get_backend(name: str) -> Backend:
    if name not in BACKEND_MODULES:
        raise UserError(f"unknown backend '{name}'; choose one of: {', '.join(BACKEND_MODULES)}")
    module = importlib.import_module(BACKEND_MODULES[name])
    backend: Backend = module.BACKEND
    return backend


__all__ = [
    "BACKEND_MODULES", "BACKEND_PRECISIONS", "Backend", "BackendUnavailable", "LoadRequest", "Runner", "RunnerInfo",
    "get_backend", "run_batched",
]
