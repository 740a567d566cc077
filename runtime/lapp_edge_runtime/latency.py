"""Latency on the device, with the protocol the bundle records from its target profile.

The protocol is lapp-edge's (`lapp_edge.backends.measure.measure_latency`, after
benchmark_app and onnxruntime_perf_test): `warmup_iterations` untimed calls, then
synchronous timed calls until at least `min_iterations` calls AND `min_seconds` have
passed (or `max_seconds`, whichever comes first); median, p90 and p99 in milliseconds.
The input is the bundle's sample images tiled to the batch size, the same data the
builder measured with.

Expected latency comes from, in this order: a file given on the command line, the
bundle's own `expected_latency.json` member, or the sidecar `<bundle>.latency.json`
beside the archive written when it was built (taken only if it names this archive's
sha256).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge_runtime.bundle import LATENCY_KIND, MAX_JSON_BYTES, Bundle, RunnerError, one_line
from lapp_edge_runtime.engines import Engine

SIDECAR_SUFFIX = ".latency.json"


@dataclass
class Protocol:
    warmup_iterations: int
    min_iterations: int
    min_seconds: float
    max_seconds: float


@dataclass
class Stats:
    batch: int
    iterations: int
    seconds: float
    median_ms: float
    p90_ms: float
    p99_ms: float
    throughput_ips: float      # images per second at the median latency (one synchronous stream)


def protocol_of(bundle: Bundle) -> Protocol:
    p = bundle.manifest["target"]["latency_protocol"]
    return Protocol(int(p["warmup_iterations"]), int(p["min_iterations"]), float(p["min_seconds"]), float(p["max_seconds"]))


def measure(engine: Engine, batch: np.ndarray, protocol: Protocol) -> Stats:
    """Warm-up, then timed `engine.infer(batch)` calls until the protocol is met."""
    data = np.ascontiguousarray(batch, dtype=np.float32)
    for _ in range(protocol.warmup_iterations):
        engine.infer(data)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        tick = time.perf_counter()
        engine.infer(data)
        times.append(time.perf_counter() - tick)
        elapsed = time.perf_counter() - start
        if (len(times) >= protocol.min_iterations and elapsed >= protocol.min_seconds) or elapsed >= protocol.max_seconds:
            break
    ms = np.array(times) * 1e3
    median = float(np.median(ms))
    return Stats(len(data), len(ms), float(elapsed), median, float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                 len(data) * 1e3 / median)


def tiled(images: np.ndarray, batch: int) -> np.ndarray:
    """`batch` images: `images` repeated in order (N x C x H x W -> batch x C x H x W)."""
    repeats = -(-batch // len(images))
    return np.ascontiguousarray(np.concatenate([images] * repeats, axis=0)[:batch])


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (/proc/cpuinfo), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _read_expected(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise RunnerError(f"expected-latency file {path} is larger than {MAX_JSON_BYTES} bytes")
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunnerError(f"expected-latency file {path} does not exist") from None
    except RecursionError:
        raise RunnerError(f"expected-latency file {path} nests too deep") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RunnerError(f"expected-latency file {path} is not valid JSON: {one_line(error)}") from None
    if not isinstance(payload, dict) or payload.get("kind") != LATENCY_KIND or not isinstance(payload.get("batches"), list):
        raise RunnerError(f"{path} is not a lapp-edge expected-latency file")
    return payload


def expected_latency(bundle: Bundle, explicit: str | None) -> tuple[dict[str, Any] | None, str]:
    """(expected-latency record or None, where it came from / why there is none)."""
    if explicit:
        return _read_expected(Path(explicit)), explicit
    member = bundle.manifest.get("expected_latency")
    if member:
        return _read_expected(bundle.path(member)), f"{member} in the bundle"
    sidecar = Path(str(bundle.archive) + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return None, f"none recorded (no {member or 'expected_latency.json'} in the bundle, no {sidecar.name} beside it)"
    payload = _read_expected(sidecar)
    digest = hashlib.sha256(bundle.archive.read_bytes()).hexdigest()
    if payload.get("bundle_sha256") != digest:
        return None, f"{sidecar.name} is for another build of this bundle (its bundle_sha256 differs); ignored"
    return payload, sidecar.name


def compare(stats: Stats, expected: dict[str, Any] | None) -> str:
    """One phrase comparing measured with expected median latency at the same batch."""
    if expected is None:
        return "no expected latency"
    for row in expected.get("batches", []):
        if isinstance(row, dict) and row.get("batch") == stats.batch and isinstance(row.get("median_ms"), (int, float)):
            ratio = stats.median_ms / float(row["median_ms"]) if row["median_ms"] else float("inf")
            word = "slower" if ratio > 1 else "faster"
            return (f"expected median {float(row['median_ms']):.3f} ms on {expected.get('cpu_model', '?')}: "
                    f"x{ratio:.2f} ({abs(ratio - 1) * 100:.0f}% {word})")
    return f"no expected latency at batch {stats.batch}"
