"""Top-1 against measured speedup on one target, one series per method, from dense_vs_slim results.

Reads one or more `dense_vs_slim.json` files (`benchmarks/dense_vs_slim_latency.py`: each slim package's
speedup over dense measured interleaved, and its run's test top-1) and plots, for --target at --batch,
every slim network as a point (x: dense latency / slim latency, y: test top-1), its series named by the
run folder it was exported from (the method: `lapp`, `lapp-latency`, `lapp-latency-blocks`, ... across
seeds and budgets), the dense network at 1.0x. Writes the PNG to --out and prints the points as a table.

    .venv/bin/python benchmarks/accuracy_vs_latency_plot.py bench-results/dense_vs_slim-blocks/dense_vs_slim.json \\
        --target x86-ort-fp32 --batch 32 --out docs/img/blocks-accuracy-vs-latency.png
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lapp_edge.fileio import atomic_write_bytes  # noqa: E402


def points(results: list[dict[str, Any]], target: str, batch: int) -> tuple[dict[str, list[tuple[float, float, str]]], float | None]:
    """Per method (run folder name), (speedup, top-1, package name) of every slim row at target/batch
    (a package measured in several files: the first file's figure); and the dense top-1 (the first
    file's). Raises ValueError where no row matches."""
    series: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    seen: set[str] = set()
    dense_top1 = None
    for result in results:
        models = {m["name"]: m for m in result["models"]}
        dense_top1 = dense_top1 if dense_top1 is not None else next(
            (m.get("test_top1") for m in result["models"] if m["role"] == "dense"), None)
        for row in result["slim_rows"]:
            if row["target"] == target and row["batch"] == batch and row["slim"] not in seen:
                seen.add(row["slim"])
                model = models[row["slim"]]
                method = Path(model.get("source_run") or model["name"]).name
                series[method].append((row["speedup"]["median"], model["test_top1"], model["name"]))
    if not series:
        raise ValueError(f"no slim row for {target} at batch {batch}")
    return dict(series), dense_top1


def plot(series: dict[str, list[tuple[float, float, str]]], dense_top1: float | None, target: str, batch: int) -> bytes:
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for method, values in sorted(series.items()):
        axes.scatter([v[0] for v in values], [100 * v[1] for v in values], label=method, s=36)
    if dense_top1 is not None:
        axes.scatter([1.0], [100 * dense_top1], marker="*", s=120, color="black", label="dense")
    axes.set_xlabel(f"measured speedup over dense ({target}, batch {batch})")
    axes.set_ylabel("test top-1 (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="dense_vs_slim.json files")
    parser.add_argument("--target", default="x86-ort-fp32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default="bench-results/accuracy-vs-latency.png")
    args = parser.parse_args(argv)
    try:
        results = [json.loads(Path(path).read_text()) for path in args.results]
        series, dense_top1 = points(results, args.target, args.batch)
    except (OSError, ValueError, KeyError) as error:
        print(f"accuracy_vs_latency_plot: error: {error}", file=sys.stderr)
        return 2
    for method, values in sorted(series.items()):
        for speedup, top1, name in sorted(values):
            print(f"{method:24s} {name:28s} {speedup:6.3f}x  top-1 {top1:.4f}")
    atomic_write_bytes(Path(args.out), plot(series, dense_top1, args.target, args.batch))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
