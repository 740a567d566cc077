"""Latency measurement the way the runtimes' own tools do it (benchmark_app,
onnxruntime_perf_test): warm-up, then synchronous calls until both a minimum number of
iterations and a minimum time are reached; median, p90, p99 and throughput.

On a shared 2-core machine absolute times drift 1-8% between processes, so regression
checks use `interleaved_ratio`: two runners measured in one process, in blocks that
alternate A/B with the order reversed every block, and the median of the per-block
ratios. `other_cpu_share` reads /proc/stat so a caller can retry when another process is
loading the machine. Plain numpy and the standard library: no runtime is imported here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lapp_edge.deploy.backends.base import Runner


@dataclass(frozen=True)
class LatencyProtocol:
    """Warm-up calls, then calls until both `min_iterations` and `min_seconds` are reached
    (or `max_seconds` passed), as benchmark_app and onnxruntime_perf_test do."""
    warmup_iterations: int = 20
    min_iterations: int = 100
    min_seconds: float = 2.0
    max_seconds: float = 30.0


COMPILES_PER_RATIO = 3
"""Fresh compiles behind each latency ratio that is compared with a prediction or a baseline (median
taken): the default of `bench --compiles`, `baseline --compiles`, run-all's `compiles` and
`profile-layers --network-compiles`. A network's ratio moved by a median 3.3-8.2% between fresh compiles
(ORT / OpenVINO, ResNet-20 and MobileNetV2, docs/RESULTS.md "Latency-aware LAPP"); three is the fewest
whose median ignores one outlying compile."""


@dataclass
class LatencyStats:
    """Latency of one runner at one batch, in milliseconds per call (synchronous, one stream)."""
    batch: int
    iterations: int
    seconds: float
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_ips: float          # images per second at the median latency (one stream, synchronous)


def measure_latency(runner: Runner, batch: np.ndarray, protocol: LatencyProtocol = LatencyProtocol()) -> LatencyStats:
    """Measure `runner.infer(batch)` (float32 N x C x H x W) under `protocol`."""
    data = np.ascontiguousarray(batch, dtype=np.float32)
    for _ in range(protocol.warmup_iterations):
        runner.infer(data)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        tick = time.perf_counter()
        runner.infer(data)
        times.append(time.perf_counter() - tick)
        elapsed = time.perf_counter() - start
        if (len(times) >= protocol.min_iterations and elapsed >= protocol.min_seconds) or elapsed >= protocol.max_seconds:
            break
    ms = np.array(times) * 1e3
    median = float(np.median(ms))
    return LatencyStats(
        batch=len(data), iterations=len(ms), seconds=float(elapsed), median_ms=median,
        p90_ms=float(np.percentile(ms, 90)), p99_ms=float(np.percentile(ms, 99)), mean_ms=float(ms.mean()),
        min_ms=float(ms.min()), throughput_ips=len(data) * 1e3 / median,
    )


def _median_call_seconds(runner: Runner, data: np.ndarray, calls: int) -> float:
    times = []
    for _ in range(calls):
        tick = time.perf_counter()
        runner.infer(data)
        times.append(time.perf_counter() - tick)
    return float(np.median(times))


def interleaved_ratio(runner_a: Runner, runner_b: Runner, batch: np.ndarray, protocol: "RatioProtocol | None" = None) -> float:
    """Median over blocks of (median latency of A) / (median latency of B), measured interleaved
    with `protocol`'s blocks, calls per block (by batch size) and warm-up; no load retries."""
    protocol = protocol or RatioProtocol()
    return float(np.median(interleaved_block_ratios(runner_a, runner_b, batch, protocol.blocks,
                                                    protocol.calls_for(len(batch)), protocol.warmup)))


def interleaved_block_ratios(
    runner_a: Runner, runner_b: Runner, batch: np.ndarray, blocks: int = 12, calls: int = 25, warmup: int = 20
) -> list[float]:
    """Every block's (median latency of A) / (median latency of B), A/B order reversed each block;
    their spread says how noisy the measurement was."""
    data = np.ascontiguousarray(batch, dtype=np.float32)
    for _ in range(warmup):
        runner_a.infer(data)
        runner_b.infer(data)
    ratios = []
    for block in range(blocks):
        if block % 2 == 0:
            a = _median_call_seconds(runner_a, data, calls)
            b = _median_call_seconds(runner_b, data, calls)
        else:
            b = _median_call_seconds(runner_b, data, calls)
            a = _median_call_seconds(runner_a, data, calls)
        ratios.append(a / b)
    return ratios


def _cpu_jiffies() -> tuple[int, int]:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values[:8]), idle


@dataclass(frozen=True)
class CpuSnapshot:
    """Machine-wide CPU jiffies (total, idle) and this process's own CPU seconds at one moment
    (with its finished, waited-for children's where `with_children`)."""

    total: int
    idle: int
    own_seconds: float
    with_children: bool = False


def cpu_snapshot(with_children: bool = False) -> CpuSnapshot | None:
    """A snapshot for `other_cpu_share_since` (None where /proc/stat does not exist). `with_children`:
    count this process's finished child processes as its own (a caller that runs its work in subprocesses)."""
    if not Path("/proc/stat").is_file():
        return None
    total, idle = _cpu_jiffies()
    times = os.times()
    own = times.user + times.system + (times.children_user + times.children_system if with_children else 0.0)
    return CpuSnapshot(total, idle, own, with_children)


def other_cpu_share_since(start: CpuSnapshot | None) -> float:
    """Fraction of the machine's CPU time used by other processes since `start` (0 where unknown).
    Taken around a measurement, it says how loaded the machine was while measuring."""
    end = cpu_snapshot(start.with_children) if start is not None else None
    if start is None or end is None:
        return 0.0
    total = end.total - start.total
    if total <= 0:
        return 0.0
    busy_other = (total - (end.idle - start.idle)) - (end.own_seconds - start.own_seconds) * os.sysconf("SC_CLK_TCK")
    return max(0.0, min(1.0, busy_other / total))


def other_cpu_share(seconds: float = 0.5) -> float:
    """Fraction of the machine's CPU time used by other processes over `seconds` (0 where unknown)."""
    start = cpu_snapshot()
    time.sleep(seconds)
    return other_cpu_share_since(start)


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (/proc/cpuinfo), for result files."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


# Instruction-set features that change which kernels a CPU runtime picks (and so its latency ratios).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel lists them (/proc/cpuinfo; empty where unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_key(device: str = "") -> str:
    """The machine as latency baselines, layer tables and fits are keyed. CPU targets: the CPU's model
    name and the ISA flags that pick kernels ("AMD EPYC; avx2 avx512_bf16 avx512f"): two machines with
    the same model name can differ. A target on an accelerator passes its `device` name (the backend's
    `device_name()`): "NVIDIA H200; host Intel(R) Xeon(R) ...; avx2 ...", since a GPU latency ratio
    depends on the GPU, and on the host through kernel-launch overhead at small batches.
    `deploy.targets.target_machine_key` picks the right one for a target."""
    flags = cpu_flags()
    cpu = f"{cpu_model()}; {' '.join(sorted(flags & set(ISA_FLAGS))) or 'no listed ISA flags'}"
    return f"{device}; host {cpu}" if device else cpu


@dataclass
class QuietRatios:
    """Block ratios A/B from the quietest of up to `retries + 1` attempts."""

    block_ratios: list[float]
    other_cpu_share: float           # other processes' share of the machine during that attempt
    attempts: int
    flagged: bool                    # even the quietest attempt was above the allowed share


@dataclass(frozen=True)
class RatioProtocol:
    """How an A/B latency ratio is measured: interleaved blocks, and retries while other
    processes load the machine (DEPLOY_NOTES: 12 blocks of ~25 calls at batch 1)."""

    blocks: int = 12
    calls_batch1: int = 25
    calls_large_batch: int = 8
    warmup: int = 20
    max_other_cpu: float = 0.5        # others' share of the whole machine (2 cores: 0.5 = one full core)
    retries: int = 2
    retry_pause_s: float = 2.0

    def calls_for(self, batch: int) -> int:
        """Calls per block: more at batch 1, where one call is short and noisy."""
        return self.calls_batch1 if batch == 1 else self.calls_large_batch


def quiet_block_ratios(runner_a: Runner, runner_b: Runner, data: np.ndarray, protocol: RatioProtocol) -> QuietRatios:
    """Interleaved A/B block ratios, measured again (after a pause) while other processes load
    the machine beyond `protocol.max_other_cpu`; the quietest attempt is kept and flagged if
    still loaded."""
    calls = protocol.calls_for(len(data))
    best: tuple[list[float], float] | None = None
    attempts = 0
    for attempt in range(protocol.retries + 1):
        attempts = attempt + 1
        start = cpu_snapshot()
        ratios = interleaved_block_ratios(runner_a, runner_b, data, protocol.blocks, calls, protocol.warmup)
        share = other_cpu_share_since(start)
        if best is None or share < best[1]:
            best = (ratios, share)
        if share <= protocol.max_other_cpu:
            break
        if attempt < protocol.retries:
            time.sleep(protocol.retry_pause_s)
    assert best is not None
    return QuietRatios(best[0], best[1], attempts, best[1] > protocol.max_other_cpu)
