"""The mission at a glance, from a bench report with a dense baseline (no torch): per target, what
precision was asked and compiled, dense and slim top-1 on that target, the slim network's measured
latency next to the latency its target's fit predicts from FLOPs and the latency its layer table
predicts (where this machine has one), and the speedup over the dense network measured side by side;
plus one plot, accuracy vs measured latency per target.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from lapp_edge.deploy.bench import budget_met, budget_verdict
from lapp_edge.fileio import atomic_write_bytes

# A lower precision that costs more top-1 than this against the package's own fp32 ONNX Runtime run (points) gets a
# line under the table: int8 on this model costs 0.0-0.2 points where it works (docs/RESULTS.md), and a kernel or
# quantization problem showed as 3.2 (full-range U8S8 weights on a CPU without VNNI, fixed since).
PRECISION_DROP_POINTS = 1.0


def mission_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target (its own variant: the first int8 route), from `asdict(BenchReport)`."""
    rows = []
    for target in report["targets"]:
        if target["status"] == "unavailable" or not target["variants"]:
            rows.append({"target": target["target"], "precision": target["precision"], "status": target["status"],
                         "message": target["message"]})
            continue
        variant_name, variant = next(iter(target["variants"].items()))
        latency = {s["batch"]: s["median_ms"] for s in variant["latency"]}
        baseline = variant.get("baseline") or {}
        prediction = {c["batch"]: c for c in variant.get("predicted_from_flops") or []}
        from_table = {c["batch"]: c for c in variant.get("predicted_from_table") or []}
        rows.append({
            "target": target["target"], "precision": target["precision"], "variant": variant_name, "status": target["status"],
            "message": target["message"], "used": variant["runner"]["precision_used"],
            "slim_top1": variant["accuracy"]["top1"], "dense_top1": baseline.get("top1"),
            "reference_top1": variant["accuracy"].get("reference_top1"),
            "slim_ms": latency, "dense_ms": {int(b): v for b, v in (baseline.get("baseline_median_ms") or {}).items()},
            "speedup": {int(b): v for b, v in (baseline.get("speedup") or {}).items()},
            "macs_ratio": baseline.get("macs_ratio"),
            "predicted_ms": predicted_ms(latency, prediction),
            "prediction_error_pct": {b: c["error_pct"] for b, c in prediction.items()},
            # the layer table's prediction, the same way (its ratio is to the table's dense reference)
            "table_predicted_ms": predicted_ms(latency, from_table),
            "table_error_pct": {b: c["error_pct"] for b, c in from_table.items()},
            "prediction_note": variant.get("prediction_note", ""),
            "budgets": [budget_row(check, baseline) for check in variant.get("budgets") or []],
        })
    return rows


def predicted_ms(latency_ms: dict[int, float], comparisons: dict[int, dict[str, Any]]) -> dict[int, float]:
    """Per batch, a prediction's ratio applied to what was measured interleaved (so ms and error agree):
    measured slim ms x predicted ratio / measured ratio to the dense model."""
    return {b: latency_ms[b] * c["predicted_ratio"] / c["measured_ratio"] for b, c in comparisons.items() if b in latency_ms}


def budget_row(check: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """A latency budget the package was shaped for on this target (bench's `BudgetCheck`, measured against
    the layer table's dense reference), with the same ratio measured against the dense *package* benched
    beside it (1 / speedup at the budget's batch; None without one): the two dense networks are the same
    architecture, so both ratios measure the same thing, each interleaved in one process."""
    speedup = (baseline.get("speedup") or {}).get(str(check["batch"])) or (baseline.get("speedup") or {}).get(check["batch"])
    side_by_side = 1.0 / speedup if speedup else None
    return {**check, "measured_vs_dense_package": side_by_side,
            "off_vs_dense_package_pct": 100 * (side_by_side / check["budget_ratio"] - 1) if side_by_side else None}


def table_batch(rows: list[dict[str, Any]]) -> int:
    """The batch the table and plot show: 1 where every measured target has it, else the smallest batch
    every measured target has (a profile may measure batch 32 only), else 1."""
    measured = [set(row["slim_ms"]) for row in rows if "slim_ms" in row]
    if not measured or all(1 in batches for batches in measured):
        return 1
    common = set.intersection(*measured)
    return min(common) if common else 1


def _ms(value: float | None) -> str:
    return f"{value:8.3f}" if value is not None else f"{'-':>8s}"


def _error(pct: float | None) -> str:
    return f"{(f'{pct:+6.1f}%' if pct is not None else '-'):>7s}"


def format_mission(rows: list[dict[str, Any]], batch: int = 1) -> str:
    """The table: one line per target at `batch` (speedups at every batch measured)."""
    header = (f"{'target':18s} {'asked':5s} {'ran':5s} {'dense top-1':>11s} {'slim top-1':>10s} {'slim ms':>8s} "
              f"{'FLOPs fit':>9s} {'error':>7s} {'table':>8s} {'error':>7s} {'dense ms':>8s} {'speedup (measured side by side)':s}")
    lines = [header, "-" * len(header)]
    for row in rows:
        if "slim_ms" not in row:
            lines.append(f"{row['target']:18s} {row['precision']:5s} {row['status']}: {row['message']}")
            continue
        speedups = ", ".join(f"{row['speedup'][b]:.2f}x b{b}" for b in sorted(row["speedup"]))
        dense_top1 = f"{row['dense_top1']:11.4f}" if row["dense_top1"] is not None else f"{'-':>11s}"
        lines.append(f"{row['target']:18s} {row['precision']:5s} {row['used']:5s} {dense_top1} {row['slim_top1']:10.4f} "
                     f"{_ms(row['slim_ms'].get(batch))} {_ms(row['predicted_ms'].get(batch)):>9s} "
                     f"{_error(row['prediction_error_pct'].get(batch))} {_ms(row['table_predicted_ms'].get(batch))} "
                     f"{_error(row['table_error_pct'].get(batch))} {_ms(row['dense_ms'].get(batch))} {speedups}")
    lines.append(f"latency: median ms at batch {batch}, one thread. FLOPs fit: the target's latency fit (a line in FLOPs) gives the "
                 "slim/dense latency ratio, applied to the dense model measured interleaved with the slim one; table: the same "
                 "from the target's layer latency table for this machine (lapp-edge profile-layers); error = "
                 "predicted / measured ratio - 1 (- where the target has no fit or table). dense ms = slim ms / the measured ratio. "
                 "speedup = dense / slim latency, measured interleaved in one process (robust to load from other processes)")
    for row in rows:
        if "slim_ms" in row and row["used"] != row["precision"] and row["precision"] != "int8":
            lines.append(f"{row['target']}: asked {row['precision']}, this CPU ran {row['used']} (no {row['precision']} kernels here)")
        drop_line = precision_drop_line(row)
        if drop_line:
            lines.append(drop_line)
        if row.get("prediction_note"):
            lines.append(f"{row['target']}: {row['prediction_note']}")
        for budget in row.get("budgets") or []:
            lines.append(budget_line(row["target"], budget))
    return "\n".join(lines)


def precision_drop_line(row: dict[str, Any]) -> str:
    """A line when a bf16/int8 target's slim top-1 is more than PRECISION_DROP_POINTS under the package's fp32
    ONNX Runtime run on the same images ("" otherwise, and for fp32 targets or rows without a reference)."""
    reference = row.get("reference_top1")
    if "slim_top1" not in row or reference is None or row["precision"] == "fp32":
        return ""
    drop = 100 * (reference - row["slim_top1"])
    if drop <= PRECISION_DROP_POINTS:
        return ""
    return (f"{row['target']}: {row['used']} loses {drop:.2f} points of top-1 against the package's fp32 ONNX Runtime run "
            f"({reference:.4f} -> {row['slim_top1']:.4f}; more than {PRECISION_DROP_POINTS:g}): check its kernels and "
            f"quantization before shipping (lapp-edge bench --target {row['target']} shows every int8 route)")


def budget_line(target: str, budget: dict[str, Any]) -> str:
    """One line: the latency budget, what was measured against the dense package and against the table's
    dense reference, and whether it landed within bench's tolerance."""
    measured = [(value, off, what) for value, off, what in (
        (budget.get("measured_vs_dense_package"), budget.get("off_vs_dense_package_pct"), "vs the dense package"),
        (budget.get("measured_ratio"), budget.get("off_pct"), "vs the table's dense reference")) if value is not None]
    ceiling = bool(budget.get("ceiling"))
    head = (f"{target}: shaped for a latency {'ceiling' if ceiling else 'budget'} of x{budget['budget_ratio']:.3f} of dense "
            f"at batch {budget['batch']}")
    if not measured:
        return f"{head}: not measured ({budget.get('note') or 'no dense network measured at that batch'})"
    landed = all(budget_met(off / 100, ceiling) for _, off, _ in measured)
    return (f"{head}: measured " + ", ".join(f"x{value:.3f} {what} ({off:+.1f}%)" for value, off, what in measured)
            + f": {budget_verdict(landed, ceiling)}")


def plot_mission(rows: list[dict[str, Any]], path: str | Path, batch: int = 1, title: str = "") -> None:
    """Top-1 vs measured latency at `batch`, one colour per target: dense (hollow) -> slim (filled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, row in enumerate(r for r in rows if "slim_ms" in r and batch in r["slim_ms"]):
        colour = colours[index % len(colours)]
        slim = (row["slim_ms"][batch], row["slim_top1"])
        label = f"{row['target']} ({row['used']})"
        axes.scatter(*slim, color=colour, marker="o", s=50, label=label, zorder=3)
        if row["dense_top1"] is not None and batch in row["dense_ms"]:
            dense = (row["dense_ms"][batch], row["dense_top1"])
            axes.scatter(*dense, facecolors="none", edgecolors=colour, marker="s", s=50, zorder=3)
            axes.annotate("", xy=slim, xytext=dense, arrowprops={"arrowstyle": "->", "color": colour, "alpha": 0.6})
    axes.set_xlabel(f"measured latency, batch {batch} (ms, median, one thread)")
    axes.set_ylabel("top-1 on the test split")
    axes.set_title(title or "accuracy vs measured latency per target: dense (squares) -> slim (dots)", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())
