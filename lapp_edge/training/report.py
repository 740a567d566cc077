"""The pruning report of a run: JSON, a printed table, and a plot of kept ratios."""

from __future__ import annotations

import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lapp_edge.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from lapp_edge.lapp.flops import count_deployed_macs, count_deployed_params
from lapp_edge.models import rebuild_model
from lapp_edge.models.fuse import fuse_model

from lapp_edge.training.landing import landing_lines
from lapp_edge.training.run_dir import RunState

REPORT_JSON = "report.json"
REPORT_TEXT = "report.txt"
REPORT_PLOT = "kept_ratio.png"


def independent_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    """FLOPs of the deployed (fused) model by torch.utils.flop_counter.FlopCounterMode,
    which counts 2 FLOPs per multiply-accumulate of convs and matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    fused = fuse_model(model).cpu()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fused(torch.zeros(1, *input_shape))
    return float(counter.get_total_flops())


@dataclass
class RunSummary:
    """What a run's report is built from: its settings, its state and its (slim) model."""

    config: dict[str, Any]             # the TrainConfig as a dict
    state: RunState
    model: torch.nn.Module             # the slim (or dense) model, unfused
    input_shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    dense_widths: dict[str, int]
    cost_name: str                     # what LAPP constrained ("flops" or "latency")
    shaped_for: list[dict[str, Any]] = field(default_factory=list)   # latency runs: per target, table and budget
    latency_ratios: dict[str, float] = field(default_factory=dict)  # latency runs: per target, the ratio its table predicts

    def build(self) -> dict[str, Any]:
        return build_report(self)


def build_report(summary: RunSummary) -> dict[str, Any]:
    """The run report (a JSON-able dict): per-layer kept widths, MACs and params dense vs slim
    (cross-checked with FlopCounterMode), test top-1, median epoch times per phase, the history."""
    config, state, model, input_shape = summary.config, summary.state, summary.model, summary.input_shape
    dense_reference = rebuild_model(config["model"], input_shape[0], summary.num_classes, False, input_size=input_shape[1])
    dense_macs, slim_macs = count_deployed_macs(dense_reference, input_shape), count_deployed_macs(model, input_shape)
    freeze = state.freeze or {}
    layers = []
    for name, total in summary.dense_widths.items():
        kept = state.widths.get(name, total)
        layers.append({
            "name": name, "total": total, "kept": kept, "kept_ratio": kept / total,
            "learned": freeze.get("unrounded", {}).get(name), "readded": freeze.get("readded", {}).get(name),
        })
    history = state.history
    phases = [p for p in ("dense", "pruning", "slim") if any(h["phase"] == p for h in history)]
    phase_seconds = {p: statistics.median([h["seconds"] for h in history if h["phase"] == p]) for p in phases}
    phase_cpu_seconds = {p: statistics.median([h["cpu_seconds"] for h in history if h["phase"] == p]) for p in phases}
    return {
        "model": config["model"],
        "dataset": config["dataset"],
        "mode": "dense" if config["dense"] else "lapp",
        "constraint": summary.cost_name,
        "flops_target": None if config["dense"] or summary.shaped_for else config["flops_target"],
        "max_flops": (config.get("max_flops") or None) if summary.shaped_for else None,   # a FLOPs bound beside the latency budget
        "land_on_flops": bool(config.get("land_on_flops")) if summary.shaped_for else None,  # that bound landed on, latencies ceilings
        "shaped_for": summary.shaped_for,
        "latency_predicted_ratio": summary.latency_ratios,
        "landing": freeze.get("landing"),
        # the constrained cost's ratio of the widths LAPP learned, before the freeze's rounding and width search
        "learned_cost_ratio": freeze.get("learned_cost_ratio"),
        "bypass_merged_at_freeze": freeze.get("bypass_merged"),     # units merged (--merge-bypass-at-freeze), else None
        "freeze_seconds": ({"wall": freeze["seconds"], "cpu": freeze["cpu_seconds"]} if "seconds" in freeze else None),
        "channel_multiple": config["channel_multiple"],
        "input_shape": list(input_shape),
        "flops": {
            "unit": "MACs of convs and linear layers of the deployed network (BN and bypass folded)",
            "dense_macs": dense_macs,
            "slim_macs": slim_macs,
            "ratio": slim_macs / dense_macs,
            "independent_counter": "torch.utils.flop_counter.FlopCounterMode (FLOPs = 2 x MACs)",
            "independent_dense_flops": independent_flops(dense_reference, input_shape),
            "independent_slim_flops": independent_flops(model, input_shape),
        },
        "params": {
            "unit": "parameters of the deployed network (BN and bypass folded)",
            "dense": count_deployed_params(dense_reference),
            "slim": count_deployed_params(model),
        },
        "accuracy": {"test_top1": history[-1]["test_top1"] if history else None},
        "layers": layers,
        "epoch_seconds_median": phase_seconds,
        "epoch_cpu_seconds_median": phase_cpu_seconds,
        "epochs": history,
        "config": dict(config),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a human table (per-layer widths, MACs, params, top-1, epoch times)."""
    lines = [f"{report['mode'].upper()} {report['model']} on {report['dataset']}"]
    if report["mode"] == "lapp":
        lines.append(f"{'layer':28s} {'kept':>5s} {'total':>5s} {'ratio':>6s} {'learned':>7s}")
        for layer in report["layers"]:
            learned = "" if layer["learned"] is None else str(layer["learned"])
            lines.append(f"{layer['name']:28s} {layer['kept']:5d} {layer['total']:5d} {layer['kept_ratio']:6.2f} {learned:>7s}")
        removed = [layer["name"].rsplit(".", 1)[0] for layer in report["layers"] if layer["kept"] == 0]
        if removed:
            lines.append(f"blocks removed (--block-removal; their residual branch is gone): {', '.join(removed)}")
    flops, params = report["flops"], report["params"]
    lines.append(f"MACs    dense {flops['dense_macs'] / 1e6:9.3f} M   slim {flops['slim_macs'] / 1e6:9.3f} M   "
                 f"ratio {flops['ratio']:.4f}" + (f" (target {report['flops_target']})" if report["flops_target"] else "")
                 + (f" ({'target' if report.get('land_on_flops') else 'at most'} {report['max_flops']}, beside the latency budget)"
                    if report.get("max_flops") else ""))
    for entry in report.get("shaped_for") or []:
        lines.append(f"latency on {entry['target']} (batch {entry['batch']}): predicted {report['latency_predicted_ratio'][entry['target']]:.4f} "
                     f"of dense (budget {entry['budget_ratio']:.4f} = {entry['budget_ms']:.3f} ms; table {entry['table']})")
    if report.get("learned_cost_ratio") is not None:
        moved = sum(abs(layer["kept"] - layer["learned"]) for layer in report["layers"] if layer["learned"] is not None)
        lines.append(f"learned widths (before the freeze's rounding and width search): {report['constraint']} ratio "
                     f"{report['learned_cost_ratio']:.4f}; the freeze moved {moved} of "
                     f"{sum(layer['total'] for layer in report['layers'])} prunable channels")
    if report.get("landing"):
        lines += landing_lines(report["landing"])
    if report.get("bypass_merged_at_freeze") is not None:
        lines.append(f"bypass: {report['bypass_merged_at_freeze']} unit(s) merged into their kxk conv at freeze; "
                     "the slim phase trained without the branch")
    lines.append(f"FlopCounterMode check: dense {flops['independent_dense_flops'] / 2e6:.3f} M MACs, "
                 f"slim {flops['independent_slim_flops'] / 2e6:.3f} M MACs")
    lines.append(f"params  dense {params['dense'] / 1e3:9.1f} k   slim {params['slim'] / 1e3:9.1f} k   "
                 f"ratio {params['slim'] / params['dense']:.4f}")
    lines.append(f"test top-1 {report['accuracy']['test_top1']:.4f}")
    seconds = report["epoch_seconds_median"]
    lines.append("median epoch seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if report.get("freeze_seconds"):
        lines.append(f"freeze: {report['freeze_seconds']['wall']:.1f} s ({report['freeze_seconds']['cpu']:.1f} s CPU), outside the epochs")
    return "\n".join(lines)


def plot_kept_ratios(state: RunState, dense_widths: dict[str, int]) -> bytes | None:
    if not state.trace_steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dense_widths)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for index, name in enumerate(names):
        ratios = [widths[index] / dense_widths[name] for widths in state.trace_widths]
        axes.plot(state.trace_steps, ratios, label=name, linewidth=1.2)
    axes.set_xlabel("training step (pruning phase)")
    axes.set_ylabel("kept channels / total")
    axes.set_ylim(0, 1.05)
    axes.set_title("LAPP: kept ratio of each prunable layer")
    axes.legend(fontsize=6, ncol=2 if len(names) > 12 else 1, loc="lower left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_report(out: Path, report: dict[str, Any], state: RunState) -> None:
    """report.json, report.txt and kept_ratio.png, each written atomically."""
    atomic_write_json(out / REPORT_JSON, report)
    atomic_write_text(out / REPORT_TEXT, format_report(report) + "\n")
    png = plot_kept_ratios(state, {layer["name"]: layer["total"] for layer in report["layers"]})
    if png is not None:
        atomic_write_bytes(out / REPORT_PLOT, png)
