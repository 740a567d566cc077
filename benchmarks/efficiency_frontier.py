"""How much of "FLOPs went down, latency did not" is the allocation, and how much the hardware?

Of every width allocation of the model's prunable groups (multiples of the targets' channel
multiple) with a FLOPs ratio within --band of --flops-target, `lapp_edge.latency.frontier` ranks
them by efficiency (FLOPs ratio / latency ratio = measured speedup / FLOPs speedup) as each
target's layer table predicts it. This script then builds, with random weights (latency does not
depend on them), the table's best, median and worst allocations and the widths of each run given
with --runs (a LAPP run folder's architecture.json), and measures each on every target at
--batch as a latency ratio to the dense network compiled the same way, interleaved in one process
with load checks, the median over --compiles fresh compiles of both (`compile.ratio_over_compiles`:
a fresh compile of the same ONNX moves the ratio by a few percent). Efficiency = the network's deployed MACs ratio /
that measured ratio. The best allocation's measured efficiency is what the target allows at that
FLOPs ratio; a run's distance to it is what its allocation costs.

Writes frontier.json, frontier.md (a table) and frontier.png (the band's predicted efficiency,
with the measured networks marked) into --out.

    python benchmarks/efficiency_frontier.py --out bench-results/frontier --runs bench-results/groups/lapp
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lapp_edge.cli.profile_layers import parse_input_shape  # noqa: E402
from lapp_edge.costs.latency_table import load_table  # noqa: E402
from lapp_edge.deploy.compile import OnnxModel, dataset_calibration, ratio_over_compiles  # noqa: E402
from lapp_edge.deploy.measure import (  # noqa: E402
    RatioProtocol, cpu_model, cpu_snapshot, machine_key, other_cpu_share_since,
)
from lapp_edge.deploy.targets import channel_multiple_for, load_target, runtime_version  # noqa: E402
from lapp_edge.errors import UserError  # noqa: E402
from lapp_edge.export.onnx import INPUT_NAME  # noqa: E402
from lapp_edge.fileio import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from lapp_edge.lapp.controller import LappConfig, site_min_widths  # noqa: E402
from lapp_edge.lapp.flops import build_flops_cost, count_deployed_macs, deployed_layers  # noqa: E402
from lapp_edge.lapp.latency_cost import LatencyCost  # noqa: E402
from lapp_edge.latency.calibrate import NUM_CLASSES, build_fused, export_config  # noqa: E402
from lapp_edge.latency.frontier import DEFAULT_LIMIT, FrontierScan, scan_frontier  # noqa: E402
from lapp_edge.models import build_model, prunable_sites  # noqa: E402
from lapp_edge.models.spec import ArchitectureSpec  # noqa: E402
from lapp_edge.training.latency import check_table, find_table  # noqa: E402


@dataclass
class Network:
    """One measured network: where its widths came from, its MACs ratio, and per target the
    measured latency ratio to dense (median of interleaved blocks), the others' CPU share while
    measuring, and the table's prediction (NaN for a run's widths on another site layout)."""

    name: str
    source: str
    widths: dict[str, int]
    dense_widths: dict[str, int]     # the same sites at full width (what build_from_spec checks the widths against)
    coupled: bool
    macs_ratio: float
    measured: dict[str, float] = field(default_factory=dict)
    per_compile: dict[str, list[float]] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    others_cpu: dict[str, float] = field(default_factory=dict)

    def efficiency(self, target: str) -> float:
        return self.macs_ratio / self.measured[target]


def scan(model: str, shape: tuple[int, int, int], targets: list[str], batch: int, flops_target: float, band: float,
         multiple: int, limit: int, block_removal: bool = False,
         keep_blocks: int = 0) -> tuple[FrontierScan, dict[str, int], dict[str, LatencyCost]]:
    """The frontier scan over the model's coupled groups with each target's layer table (refused
    in one line where a table is missing or was measured elsewhere). `block_removal`: residual
    branches may also be removed (their inner width 0), as `lapp-edge train --block-removal` allows;
    `keep_blocks`: except the first N of each stage (`train --keep-blocks`)."""
    dense = build_model(model, shape[0], NUM_CLASSES, False, True)
    sites = prunable_sites(dense)
    layers = deployed_layers(dense, sites, shape)
    channels = [site.channels for site in sites]
    latency = {}
    for name in targets:
        profile = load_target(name)
        path = find_table(profile, model, shape)
        table = load_table(path)
        for line in check_table(table, path, profile, model, shape, batch):
            print(line, file=sys.stderr)
        latency[name] = LatencyCost(layers, channels, table.batch(batch), name)
    try:
        minimums = site_min_widths(sites, LappConfig(min_channels=multiple, block_removal=block_removal, keep_blocks=keep_blocks))
        result = scan_frontier(build_flops_cost(dense, sites, shape), latency, flops_target, band, multiple, minimums, limit=limit)
    except ValueError as error:
        raise UserError(str(error)) from None
    return result, {site.name: site.channels for site in sites}, latency


def run_networks(run_dirs: list[str]) -> list[tuple[str, ArchitectureSpec]]:
    """(name, spec) per run folder: the folder's name, or parent/name where two runs share a name."""
    found = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "architecture.json"
        if not path.is_file():
            raise UserError(f"--runs {run_dir}: no architecture.json (a LAPP run folder has one once it reached the slim phase)")
        found.append((Path(run_dir), ArchitectureSpec.from_dict(read_json(path), str(path))))
    names = [folder.name for folder, _ in found]
    return [(folder.name if names.count(folder.name) == 1 else f"{folder.parent.name}/{folder.name}", spec) for folder, spec in found]


def table_prediction(spec: ArchitectureSpec, dense_widths: dict[str, int], latency: dict[str, LatencyCost]) -> dict[str, float]:
    """Per target, the table's latency ratio for a run's widths, where the run's sites are the scan's
    (coupled groups); empty for a run on other sites (`--no-groups`), which the tables do not describe."""
    if not spec.coupled or list(spec.widths) != list(dense_widths):
        return {}
    counts = np.array([float(spec.widths[name]) for name in dense_widths])
    return {name: float(cost.ratio(counts)) for name, cost in latency.items()}


def measure_all(networks: list[Network], dense_widths: dict[str, int], model: str, shape: tuple[int, int, int],
                targets: list[str], batch: int, work: Path, protocol: RatioProtocol, compiles: int) -> None:
    """Build, export and measure every network against dense on every target, each ratio the median over
    `compiles` fresh compiles of both (`deploy.compile.ratio_over_compiles`; fills `measured`)."""
    import torch

    torch.manual_seed(0)
    dense = build_fused(model, dense_widths, dense_widths, shape, NUM_CLASSES, True)
    dense_path = export_config(dense, shape, work / "dense.onnx")
    dense_macs = count_deployed_macs(dense, shape)
    paths = {}
    for net in networks:
        fused = build_fused(model, net.widths, net.dense_widths, shape, NUM_CLASSES, net.coupled)
        net.macs_ratio = count_deployed_macs(fused, shape) / dense_macs
        paths[net.name] = export_config(fused, shape, work / f"{len(paths)}.onnx")
    data = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    dense_model = OnnxModel(dense_path, INPUT_NAME, shape)
    for name in targets:
        profile = load_target(name)
        calibration = dataset_calibration(profile)          # int8: quantized as bench does; else None
        for net in networks:
            ratio = ratio_over_compiles(OnnxModel(paths[net.name], INPUT_NAME, shape), dense_model, profile, batch,
                                        work / f"{paths[net.name].stem}-{name}", data, compiles, protocol, calibration)
            net.measured[name] = ratio.median
            net.per_compile[name] = ratio.per_compile
            net.others_cpu[name] = ratio.other_cpu_share
            print(f"{name} {net.name}: latency ratio {net.measured[name]:.3f} (per compile "
                  f"{', '.join(f'{r:.3f}' for r in ratio.per_compile)}), MACs ratio {net.macs_ratio:.3f}, "
                  f"efficiency {net.efficiency(name):.3f} (others' CPU {ratio.other_cpu_share:.2f})", flush=True)


def format_markdown(result: FrontierScan, networks: list[Network], targets: list[str], header: dict[str, str]) -> str:
    lines = [f"- {key}: {value}" for key, value in header.items()]
    lines.append(f"- allocations: {result.total:,} ({'all' if result.exhaustive else f'{result.evaluated:,} sampled'}), "
                 f"{result.in_band:,} with a FLOPs ratio in [{result.band[0]:.3f}, {result.band[1]:.3f}]")
    for name in targets:
        q = result.quantiles[name]
        lines.append(f"- {name}: predicted efficiency over the band: min {q[0]:.3f}, p10 {q[1]:.3f}, median {q[2]:.3f}, "
                     f"p90 {q[3]:.3f}, max {q[4]:.3f}")
    lines += ["", "| network | widths | MACs ratio | " + " | ".join(f"{t} latency ratio (predicted) | {t} efficiency" for t in targets) + " |",
              "|---" * (3 + 2 * len(targets)) + "|"]
    for net in networks:
        cells = []
        for t in targets:
            predicted = net.predicted.get(t, float("nan"))
            cells.append(f"{net.measured[t]:.3f} ({'-' if math.isnan(predicted) else f'{predicted:.3f}'})")
            cells.append(f"**{net.efficiency(t):.3f}**")
        lines.append(f"| {net.name} | {'/'.join(str(w) for w in net.widths.values())} | {net.macs_ratio:.3f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(result: FrontierScan, networks: list[Network], targets: list[str], path: Path, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 3.8), squeeze=False)
    for axis, target in zip(axes[0], targets):
        q = result.quantiles[target]
        axis.axvspan(q[1], q[3], color="0.85", label="table: p10-p90 of the band")
        axis.axvline(q[4], color="0.5", linestyle="--", label="table: best allocation")
        for i, net in enumerate(networks):
            axis.plot([net.efficiency(target)], [i], "o")
            axis.annotate(net.name, (net.efficiency(target), i), fontsize=7, xytext=(4, 2), textcoords="offset points")
        axis.set_yticks([])
        axis.set_xlabel(f"measured speedup / FLOPs speedup ({target}, batch {batch})")
        axis.grid(alpha=0.3, axis="x")
        axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results/frontier")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--input", default="1x28x28", help="CxHxW the layer tables were measured at")
    parser.add_argument("--targets", default="x86-ort-fp32,x86-openvino-bf16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--flops-target", type=float, default=0.4)
    parser.add_argument("--band", type=float, default=0.005, help="FLOPs ratios within +-band of --flops-target are ranked")
    parser.add_argument("--multiple", type=int, default=0, help="channel multiple (0: the targets' multiple on this CPU)")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="enumerate at most this many allocations, else sample")
    parser.add_argument("--compiles", type=int, default=3, help="each ratio is the median over this many fresh compiles of both networks")
    parser.add_argument("--runs", default="", help="comma-separated run folders whose widths are measured too")
    parser.add_argument("--block-removal", action="store_true", help="allocations may also remove residual branches (inner width 0)")
    parser.add_argument("--keep-blocks", type=int, default=0, help="with --block-removal: never remove the first N branches of a stage")
    args = parser.parse_args(argv)
    try:
        if args.keep_blocks < 0 or (args.keep_blocks and not args.block_removal):
            raise UserError(f"--keep-blocks must be >= 0 and needs --block-removal, got {args.keep_blocks}")
        if args.compiles < 1:
            raise UserError(f"--compiles must be at least 1, got {args.compiles}")
        shape = parse_input_shape(args.input)
        targets = [t for t in args.targets.split(",") if t]
        if not targets:
            raise UserError("--targets names no target")
        multiple = args.multiple or math.lcm(*(channel_multiple_for(load_target(t)) for t in targets))
        runs = run_networks([r for r in args.runs.split(",") if r])
        print(f"scanning {args.model} width allocations at FLOPs {args.flops_target} +- {args.band} (multiple {multiple})", flush=True)
        result, dense_widths, latency = scan(args.model, shape, targets, args.batch, args.flops_target, args.band, multiple, args.limit,
                                               args.block_removal, args.keep_blocks)
    except UserError as error:
        print(f"efficiency_frontier: error: {error}", file=sys.stderr)
        return 2
    networks = [Network(f"table-{role}", "frontier scan", dict(zip(dense_widths, pick.widths)), dense_widths, True, pick.flops_ratio,
                        predicted=dict(pick.predicted))
                for role, pick in result.picks.items()]
    for name, spec in runs:
        if spec.model != args.model:
            print(f"efficiency_frontier: error: --runs {name} is a {spec.model}, not {args.model}", file=sys.stderr)
            return 2
        networks.append(Network(name, "run", dict(spec.widths), dict(spec.dense_widths), spec.coupled, 0.0,
                                predicted=table_prediction(spec, dense_widths, latency)))
    start = cpu_snapshot()
    with tempfile.TemporaryDirectory(prefix="lapp-frontier-") as temporary:
        measure_all(networks, dense_widths, args.model, shape, targets, args.batch, Path(temporary), RatioProtocol(), args.compiles)
    header = {"machine": f"{cpu_model()} ({machine_key()})", "runtimes": ", ".join(runtime_version(load_target(t).backend) for t in targets),
              "others' CPU share while measuring": f"{other_cpu_share_since(start):.2f}",
              "latency": f"batch {args.batch}, ratio to the dense {args.model} measured interleaved in one process, median over "
                         f"{args.compiles} fresh compiles of both, random weights; "
                         f"efficiency = MACs ratio / latency ratio",
              "command": "python benchmarks/efficiency_frontier.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "frontier.json", {"settings": vars(args), "header": header, "scan": asdict(result),
                                              "networks": [asdict(n) for n in networks]})
    table = format_markdown(result, networks, targets, header)
    atomic_write_text(out / "frontier.md", table + "\n")
    plot(result, networks, targets, out / "frontier.png", args.batch)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
