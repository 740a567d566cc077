"""GPU latency the way trtexec measures it, for the GPU runners (TensorRT, torch-cuda).

trtexec's defaults: warm up for 200 ms, then run until at least 10 iterations AND 3 s have
passed; time each iteration on the GPU with CUDA events; report the GPU compute time
(median, p90, p95, p99) apart from the host-to-device and device-to-host copies, which it
also times with events. Here every iteration is one synchronized sequence on one CUDA
stream:

    event0  H2D copy (pinned host -> device input)  event1
            compute (CUDA graph replay, or the plain enqueue)  event2
            D2H copy (device output -> pinned host)  event3   (then wait for event3)

so compute = event1..event2, H2D = event0..event1, D2H = event2..event3, all in
milliseconds of GPU time; wall-clock time only decides when to stop. Unlike trtexec the
iterations are not overlapped (no multiple streams, no spin-wait options): each sample is
one batch's latency, not a throughput figure.

`time_iterations` holds the protocol and the statistics and takes the iteration as a
callable, so it is tested without a GPU; `cuda_event_step` builds that callable from torch
CUDA events (torch is imported by the caller, which already needs it for the buffers), and
`cuda_torch` is the shared "is there a CUDA GPU" check (one line when there is none).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lapp_edge.deploy.backends.base import BackendUnavailable, import_runtime

Step = Callable[[], tuple[float, float, float]]   # one synchronized iteration -> (h2d ms, compute ms, d2h ms)


@dataclass(frozen=True)
class GpuLatencyProtocol:
    warmup_ms: float = 200.0        # trtexec --warmUp default
    min_iterations: int = 10        # trtexec --iterations default
    min_seconds: float = 3.0        # trtexec --duration default
    max_seconds: float = 60.0       # safety stop (a step slower than 6 s still gets 10 iterations)


def summarize_ms(samples: Sequence[float]) -> dict[str, float]:
    """median / p90 / p95 / p99 / mean / min / max of `samples` (milliseconds); empty -> {}."""
    if len(samples) == 0:
        return {}
    values = np.asarray(samples, dtype=np.float64)
    return {
        "median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
        "p95": float(np.percentile(values, 95)), "p99": float(np.percentile(values, 99)),
        "mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
    }


def time_iterations(step: Step, protocol: GpuLatencyProtocol = GpuLatencyProtocol(),
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Warm up for `protocol.warmup_ms` of wall time (at least one step), then run `step` until
    both `min_iterations` and `min_seconds` are reached (or `max_seconds`, once `min_iterations`
    are in). Returns per-phase summaries in ms: compute_ms, h2d_ms, d2h_ms, end_to_end_ms (their
    sum per iteration), plus iterations, warmup_iterations, seconds and the protocol."""
    warmup_iterations = 0
    start = clock()
    while True:
        step()
        warmup_iterations += 1
        if (clock() - start) * 1e3 >= protocol.warmup_ms:
            break
    h2d: list[float] = []
    compute: list[float] = []
    d2h: list[float] = []
    start = clock()
    while True:
        a, b, c = step()
        h2d.append(a)
        compute.append(b)
        d2h.append(c)
        elapsed = clock() - start
        enough = len(compute) >= protocol.min_iterations
        if enough and (elapsed >= protocol.min_seconds or elapsed >= protocol.max_seconds):
            break
    total = [a + b + c for a, b, c in zip(h2d, compute, d2h)]
    return {
        "iterations": len(compute), "warmup_iterations": warmup_iterations, "seconds": float(elapsed),
        "compute_ms": summarize_ms(compute), "h2d_ms": summarize_ms(h2d), "d2h_ms": summarize_ms(d2h),
        "end_to_end_ms": summarize_ms(total), "protocol": asdict(protocol),
    }


def cuda_event_step(torch: Any, stream: Any, h2d: Callable[[], None], compute: Callable[[], None],
                    d2h: Callable[[], None]) -> Step:
    """A `Step` that enqueues h2d, compute and d2h on `stream` between four timing events and
    waits for the last one. The callables must enqueue on the current stream (they are called
    inside `torch.cuda.stream(stream)`)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]

    def step() -> tuple[float, float, float]:
        with torch.cuda.stream(stream):
            events[0].record(stream)
            h2d()
            events[1].record(stream)
            compute()
            events[2].record(stream)
            d2h()
            events[3].record(stream)
        events[3].synchronize()
        return (float(events[0].elapsed_time(events[1])), float(events[1].elapsed_time(events[2])),
                float(events[2].elapsed_time(events[3])))

    return step


class CudaDevice:
    """Mixin for the backends that run on an NVIDIA GPU through torch's CUDA runtime: the GPU's name and
    the torch / CUDA / cuDNN versions, for keying and recording latency baselines."""

    def device_name(self) -> str:
        """The first CUDA GPU's name as torch reports it ("NVIDIA H200"); "no CUDA GPU" where torch is missing or sees none."""
        torch = _torch_or_none()
        return str(torch.cuda.get_device_name(0)) if torch is not None and torch.cuda.is_available() else "no CUDA GPU"

    def device_versions(self) -> dict[str, str]:
        """{"torch", "cuda", "cudnn"} versions as torch reports them; none where torch is missing."""
        torch = _torch_or_none()
        if torch is None:
            return {}
        return {"torch": str(torch.__version__), "cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version())}


def _torch_or_none() -> Any:
    """torch where it is installed (imported on first use: the deploy side does not need it), else None."""
    try:
        return import_runtime("torch", "torch-cuda", "'pip install torch' (a CUDA build)")
    except BackendUnavailable:
        return None


def cuda_torch(backend: str) -> Any:
    """torch with a usable CUDA device, or one line (BackendUnavailable, naming `backend`) saying why not."""
    torch = import_runtime("torch", backend, "'pip install torch' (a CUDA build)")
    if not torch.cuda.is_available():
        build = torch.version.cuda or "none (CPU-only build)"
        raise BackendUnavailable(f"backend {backend} is unavailable: no CUDA GPU is visible to torch {torch.__version__} (CUDA {build})")
    return torch
