"""PyTorch on an NVIDIA GPU ("torch-cuda"): fp32, fp16 and bf16.

The runner does not interpret the ONNX graph: it rebuilds the same network in PyTorch from
the package files that sit next to model.onnx (`architecture.json` + `slim_model.pt`, via
`lapp_edge.models.spec.load_slim_model`; the package manifest's sha256 covers all three files),
fuses it exactly as the export did (`lapp_edge.models.fuse.fuse_model`: BN and bypass branches
folded into plain convs), and runs it `.eval()`, channels_last, with weights in the
requested dtype. `torch.backends.cudnn.benchmark` is switched on (process-wide) so cuDNN
picks its fastest kernels for each shape.

Execution: one CUDA graph per batch size, captured on first use after three warm-up calls
on the runner's stream; it holds the whole forward pass from the float32 NCHW device input
(cast to the dtype and channels_last inside the graph) to float32 logits, so the H2D and D2H
copies outside it are plain memcpys, as with TensorRT's float32 I/O. If capture fails the
runner falls back to eager calls and says so: `info.details["execution"]` is
"cuda-graph" or "eager" and `details["fallback_reason"]` holds the first line of the error.
torch.compile is not used: its compile time (and Triton) is not worth it for a network this
small, and CUDA graphs already remove the per-kernel launch cost that dominates it.

fp32 note: cuDNN may run fp32 convolutions as TF32 where `torch.backends.cudnn.allow_tf32`
is set (PyTorch's default); the runner reports precision_used "tf32" then.

Not run here: no machine this was written on has a CUDA GPU (docs/GPU.md).

Errors: BackendUnavailable (one line) when torch sees no CUDA GPU or the GPU lacks bf16;
UserError when the package lacks architecture.json / slim_model.pt or they do not match
the request's input shape; ValueError when a batch exceeds the runner's batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.deploy.backends.base import Backend, BackendUnavailable, LoadRequest, Runner, RunnerInfo
from lapp_edge.deploy.backends.gpu_measure import CudaDevice, GpuLatencyProtocol, cuda_event_step, cuda_torch, time_iterations
from lapp_edge.errors import UserError

NAME = "torch-cuda"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
WARMUP_CALLS = 3


class TorchCudaRunner(Runner):
    """infer(batch): float32 N x C x H x W (N <= batch) -> float32 N x classes logits.
    gpu_latency(batch): trtexec-style GPU timing (see gpu_measure), a dict in milliseconds."""

    def __init__(self, torch: Any, model: Any, dtype: Any, input_shape: tuple[int, int, int], max_batch: int,
                 info: RunnerInfo, use_graphs: bool = True) -> None:
        self.torch, self.model, self.dtype = torch, model, dtype
        self.input_shape, self.max_batch, self.use_graphs = input_shape, max_batch, use_graphs
        self.stream = torch.cuda.Stream()
        self.device_in = torch.zeros((max_batch, *input_shape), dtype=torch.float32, device="cuda")
        self.host_in = torch.empty((max_batch, *input_shape), dtype=torch.float32, pin_memory=True)
        with torch.no_grad(), torch.cuda.stream(self.stream):
            classes = int(self._forward(1).shape[1])
        self.stream.synchronize()
        self.host_out = torch.empty((max_batch, classes), dtype=torch.float32, pin_memory=True)
        self._entries: dict[int, tuple[Any, Any]] = {}     # batch -> (graph or None, its static output)
        self._eager_out: Any = None
        self.info = info
        self.info.details["execution"] = "cuda-graph" if use_graphs else "eager"

    def _forward(self, count: int) -> Any:
        """float32 NCHW device input -> model in dtype, channels_last -> float32 logits."""
        x = self.device_in[:count].to(self.dtype).contiguous(memory_format=self.torch.channels_last)
        return self.model(x).float()

    def _graph(self, count: int) -> Any:
        """The CUDA graph for `count` images (captured once), or None in eager mode."""
        if count in self._entries:
            return self._entries[count][0]
        torch = self.torch
        if not self.use_graphs:
            return None
        try:
            with torch.no_grad():
                with torch.cuda.stream(self.stream):
                    for _ in range(WARMUP_CALLS):
                        self._forward(count)
                self.stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    output = self._forward(count)
            self._entries[count] = (graph, output)
            return graph
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager calls
            torch.cuda.synchronize()
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self.use_graphs = False
            self._entries.clear()
            self.info.details.update(execution="eager", fallback_reason=message[:200])
            return None

    def _compute(self, count: int) -> Any:
        """Enqueue the forward pass for `count` images on the current stream; its float32 output."""
        graph = self._graph(count)
        if graph is not None:
            graph.replay()
            return self._entries[count][1]
        with self.torch.no_grad():
            self._eager_out = self._forward(count)
        return self._eager_out

    def _load_host(self, batch: np.ndarray) -> int:
        count = len(batch)
        if count > self.max_batch or count <= 0:
            raise ValueError(f"batch {count} is outside this runner's range 1..{self.max_batch}")
        self.host_in[:count].copy_(self.torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        return count

    def infer(self, batch: np.ndarray) -> np.ndarray:
        count = self._load_host(batch)
        self._graph(count)                            # capture (if needed) outside the copy sequence
        with self.torch.cuda.stream(self.stream):
            self.device_in[:count].copy_(self.host_in[:count], non_blocking=True)
            output = self._compute(count)
            self.host_out[:count].copy_(output, non_blocking=True)
        self.stream.synchronize()
        return self.host_out[:count].numpy().copy()

    def gpu_latency(self, batch: np.ndarray, protocol: GpuLatencyProtocol = GpuLatencyProtocol()) -> dict[str, Any]:
        """trtexec-style latency of `batch` (float32 N x C x H x W): GPU compute, H2D and D2H
        times in ms (median/p90/p95/p99/mean/min/max), iterations, whether a CUDA graph ran."""
        count = self._load_host(batch)
        graph = self._graph(count)
        holder: list[Any] = [None]

        def h2d() -> None:
            self.device_in[:count].copy_(self.host_in[:count], non_blocking=True)

        def compute() -> None:
            holder[0] = self._compute(count)

        def d2h() -> None:
            self.host_out[:count].copy_(holder[0], non_blocking=True)

        result = time_iterations(cuda_event_step(self.torch, self.stream, h2d, compute, d2h), protocol)
        median = result["compute_ms"]["median"]
        result.update(batch=count, cuda_graph=graph is not None, execution=self.info.details["execution"],
                      throughput_ips=count * 1e3 / median if median > 0 else 0.0)
        return result


class TorchCuda(CudaDevice, Backend):
    name = NAME
    runtime_modules = ("torch",)
    needs_cuda_gpu = True
    precisions = ("fp32", "fp16", "bf16")

    def reference_model_path(self, onnx_path: Path, architecture: dict[str, Any], work_dir: Path) -> Path:
        """A package-like folder under `work_dir` (a copy of the ONNX, `architecture.json` and a
        `slim_model.pt` of seeded random weights) that `load` rebuilds the network from. Needs torch,
        not a GPU; UserError for a spec the family cannot build."""
        import shutil

        import torch

        from lapp_edge.fileio import atomic_write_json
        from lapp_edge.models.spec import SLIM_SPEC, SLIM_WEIGHTS, ArchitectureSpec, build_from_spec
        from lapp_edge.torch_io import atomic_torch_save

        spec = ArchitectureSpec.from_dict(architecture, f"reference model {onnx_path.name}")
        folder = Path(work_dir) / f"torch-reference-{onnx_path.stem}"
        folder.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):     # seeded weights without touching the caller's RNG state
            torch.manual_seed(0)
            model = build_from_spec(spec, f"reference model {onnx_path.name}")
        atomic_write_json(folder / SLIM_SPEC, spec.to_dict())
        atomic_torch_save(folder / SLIM_WEIGHTS, model.state_dict())
        shutil.copyfile(onnx_path, folder / "model.onnx")
        return folder / "model.onnx"

    def load(self, request: LoadRequest) -> Runner:
        self.check_request(request)
        torch = cuda_torch(NAME)
        if request.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise BackendUnavailable(f"backend {NAME} is unavailable for bf16: {torch.cuda.get_device_name()} has no bf16 support")
        from lapp_edge.models.fuse import fuse_model
        from lapp_edge.models.spec import load_slim_model

        directory = Path(request.onnx_path).parent
        model, spec = load_slim_model(directory)
        shape = (spec.in_channels, spec.input_size, spec.input_size)
        if shape != tuple(request.input_shape):
            raise UserError(f"{directory}: the architecture spec takes inputs {list(shape)}, the request {list(request.input_shape)}")
        dtype = getattr(torch, DTYPES[request.precision])
        fused = fuse_model(model).eval().to(device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
        tf32 = bool(torch.backends.cudnn.allow_tf32)
        parameter_dtype = str(next(fused.parameters()).dtype).replace("torch.", "")
        used = {"float32": "tf32" if tf32 else "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(parameter_dtype, parameter_dtype)
        info = RunnerInfo(
            backend=NAME, runtime_version=str(torch.__version__), precision_requested=request.precision,
            precision_used=used, threads=request.threads, batch=request.batch, model_path=str(directory),
            details={
                "gpu": str(torch.cuda.get_device_name()), "cuda": str(torch.version.cuda),
                "cudnn": str(torch.backends.cudnn.version()), "cudnn_benchmark": True, "cudnn_allow_tf32": tf32,
                "parameter_dtype": parameter_dtype, "memory_format": "channels_last", "fused": True,
                "source": "architecture.json + slim_model.pt (not the ONNX graph)",
            },
        )
        return TorchCudaRunner(torch, fused, dtype, request.input_shape, request.batch, info)


BACKEND = TorchCuda()
