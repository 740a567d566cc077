"""Batch-1 ONNX Runtime CPU latency: the fused slim model vs the same slim model exported with
its bypass branches left as separate convs (BN folded in both: the exporter folds BN anyway).

Protocol (docs of the project, "Measuring on a shared 2-core machine"): both sessions live in
this one process with 1 intra-op thread each; warm-up; BLOCKS blocks of CALLS calls
alternating A and B, the order reversed every block; the figure is the median over blocks of
the per-block ratio unfused/fused (each block's time is the median of its calls, each
call timed alone). Other processes' CPU use is read from /proc/stat during
every block; a block measured while they used more than --max-other-cores is measured again
(up to --retries times) and the figure says how many blocks were retried.

    .venv/bin/python benchmarks/export_fused_vs_unfused.py --run runs/NAME [--out bench-results/export]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lapp_edge.deploy.measure import cpu_model
from lapp_edge.data.torch_data import load_dataset, normalize
from lapp_edge.errors import UserError
from lapp_edge.export.onnx import OPSET, export_onnx  # noqa: E402
from lapp_edge.export.package_writer import read_run_report, run_dataset, versions  # noqa: E402
from lapp_edge.export.verify import ort_session  # noqa: E402
from lapp_edge.fileio import atomic_write_json, atomic_write_text
from lapp_edge.models.fuse import fuse_model
from lapp_edge.models import ConvBN
from lapp_edge.models.spec import load_slim_model


@dataclass
class Block:
    order: str                 # "AB" or "BA"
    fused_ms: float            # median per call over the block
    unfused_ms: float
    ratio: float               # unfused / fused
    other_cores: float         # CPU cores other processes used during the block
    retried: int = 0


@dataclass
class BenchResult:
    run: str
    model: str
    conv_nodes: dict[str, int]
    max_abs_diff_vs_torch: dict[str, float]
    threads: int
    blocks: list[Block] = field(default_factory=list)
    warmup_calls: int = 0
    calls_per_block: int = 0
    median_fused_ms: float = 0.0
    median_unfused_ms: float = 0.0
    p90_fused_ms: float = 0.0
    p90_unfused_ms: float = 0.0
    speedup_median: float = 0.0          # median over blocks of unfused/fused: > 1 means fused is faster
    speedup_min: float = 0.0
    speedup_max: float = 0.0
    retried_blocks: int = 0
    opset: int = OPSET
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as stream:
        values = [float(v) for v in stream.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)
    return sum(values) - idle, sum(values)


def time_calls(session: Any, feed: dict[str, np.ndarray], calls: int) -> float:
    """Median milliseconds per call over `calls` calls, each timed alone (a call that was
    preempted by another process moves a median far less than a mean)."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def measure_block(fused: Any, unfused: Any, feed: dict[str, np.ndarray], calls: int, reverse: bool) -> Block:
    cores = os.cpu_count() or 1
    busy0, total0 = cpu_times()
    wall0, own0 = time.perf_counter(), time.process_time()
    if reverse:
        unfused_ms, fused_ms = time_calls(unfused, feed, calls), time_calls(fused, feed, calls)
    else:
        fused_ms, unfused_ms = time_calls(fused, feed, calls), time_calls(unfused, feed, calls)
    busy1, total1 = cpu_times()
    wall, own = time.perf_counter() - wall0, time.process_time() - own0
    machine_cores = (busy1 - busy0) / max(1.0, total1 - total0) * cores
    other = max(0.0, machine_cores - own / max(wall, 1e-9))
    return Block("BA" if reverse else "AB", fused_ms, unfused_ms, unfused_ms / fused_ms, other)


def run_benchmark(run_dir: Path, blocks: int, calls: int, warmup: int, max_other_cores: float, retries: int) -> BenchResult:
    report = read_run_report(run_dir)
    model, spec = load_slim_model(run_dir)
    dataset_name, data_dir = run_dataset(run_dir, report)
    data = load_dataset(dataset_name, data_dir)
    input_shape = (spec.in_channels, spec.input_size, spec.input_size)
    bypasses = sum(1 for m in model.modules() if isinstance(m, ConvBN) and m.bypass_conv is not None)
    if bypasses == 0:
        raise UserError(f"{run_dir}'s slim model has no bypass branch (trained with --no-bypass, or merged into its conv at "
                        "freeze, the default): fused and unfused exports are the same graph; train with "
                        "--keep-bypass-after-freeze")

    fused_bytes = export_onnx(fuse_model(model), input_shape)
    unfused_bytes = export_onnx(model, input_shape)
    fused, unfused = ort_session(fused_bytes, threads=1), ort_session(unfused_bytes, threads=1)

    images = normalize(data.test.images[:64], data.info)  # type: ignore[attr-defined]
    with torch.no_grad():
        expected = model(images).numpy()
    diffs = {
        name: float(np.abs(session.run(None, {"input": images.numpy()})[0] - expected).max())
        for name, session in (("fused", fused), ("unfused", unfused))
    }
    import onnx

    conv_nodes = {
        name: sum(1 for n in onnx.load_from_string(data_bytes).graph.node if n.op_type == "Conv")
        for name, data_bytes in (("fused", fused_bytes), ("unfused", unfused_bytes))
    }

    feed = {"input": images[:1].numpy()}
    for _ in range(warmup):
        fused.run(None, feed)
        unfused.run(None, feed)
    result = BenchResult(str(run_dir), spec.model, conv_nodes, diffs, threads=1, warmup_calls=warmup, calls_per_block=calls)
    for index in range(blocks):
        block = measure_block(fused, unfused, feed, calls, reverse=index % 2 == 1)
        tries = 0
        while block.other_cores > max_other_cores and tries < retries:
            tries += 1
            time.sleep(0.5)
            block = measure_block(fused, unfused, feed, calls, reverse=index % 2 == 1)
        block.retried = tries
        result.blocks.append(block)

    ratios = [b.ratio for b in result.blocks]
    fused_ms, unfused_ms = [b.fused_ms for b in result.blocks], [b.unfused_ms for b in result.blocks]
    result.median_fused_ms, result.median_unfused_ms = statistics.median(fused_ms), statistics.median(unfused_ms)
    result.p90_fused_ms = float(np.percentile(fused_ms, 90))
    result.p90_unfused_ms = float(np.percentile(unfused_ms, 90))
    result.speedup_median, result.speedup_min, result.speedup_max = statistics.median(ratios), min(ratios), max(ratios)
    result.retried_blocks = sum(1 for b in result.blocks if b.retried)
    result.machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                      "ort_provider": "CPUExecutionProvider", "graph_optimization": "ORT_ENABLE_ALL",
                      "intra_op_threads": 1, "batch": 1, "precision": "fp32"}
    result.versions = versions()
    return result


def format_table(result: BenchResult) -> str:
    lines = [
        f"{result.model} from {result.run}: ONNX Runtime CPU fp32, batch 1, 1 thread, "
        f"{len(result.blocks)} blocks x {result.calls_per_block} calls (A/B interleaved)",
        f"{'variant':10s} {'Conv nodes':>10s} {'median ms':>10s} {'p90 ms':>8s} {'max|diff| vs torch':>19s}",
        f"{'fused':10s} {result.conv_nodes['fused']:10d} {result.median_fused_ms:10.4f} {result.p90_fused_ms:8.4f} "
        f"{result.max_abs_diff_vs_torch['fused']:19.2e}",
        f"{'unfused':10s} {result.conv_nodes['unfused']:10d} {result.median_unfused_ms:10.4f} {result.p90_unfused_ms:8.4f} "
        f"{result.max_abs_diff_vs_torch['unfused']:19.2e}",
        f"speedup of fused (median of per-block unfused/fused): {result.speedup_median:.3f}x "
        f"(blocks {result.speedup_min:.3f}..{result.speedup_max:.3f}; {result.retried_blocks} blocks re-measured for load)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True,
                        help="a finished training run whose slim model kept its bypass (--keep-bypass-after-freeze)")
    parser.add_argument("--out", default="bench-results/export")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--calls", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--max-other-cores", type=float, default=1.2, help="re-measure a block when other processes used more (one busy neighbour on a 2-core machine is 1.0)")
    parser.add_argument("--retries", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        result = run_benchmark(Path(args.run), args.blocks, args.calls, args.warmup, args.max_other_cores, args.retries)
    except UserError as error:
        print(f"export_fused_vs_unfused: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    table = format_table(result)
    atomic_write_json(out / "fused_vs_unfused.json", asdict(result))
    atomic_write_text(out / "fused_vs_unfused.txt", table + "\n")
    print(table)
    print(f"written to {out / 'fused_vs_unfused.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
