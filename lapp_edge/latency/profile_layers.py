"""`lapp-edge profile-layers`: measure a target's layer latency table for a model family.

    lapp-edge profile-layers --target NAME --model resnet20 [--input 1x28x28] [--configs 24]
        [--batch 1 --batch 32] [--channel-multiple N] [--no-groups] [--out latency-data/]

1. The dense family member (coupled groups on, as LAPP trains it) is built and its deployed convs
   listed with the prunable site each width comes from (`lapp.flops.deployed_layers`).
2. Each distinct layer shape (`costs.latency_table.layer_signature`) is measured on the target
   over the grid of widths it takes: every allowed width of the sites that prune it (multiples of
   the target's channel multiple, `deploy.targets.channel_multiple_for`; at most `max_grid` per
   axis, evenly spread, where a site is wide), fixed widths as they are. Each point is one ONNX
   model (Conv with bias, then ReLU: what the fused export deploys; built with onnx.helper, random
   weights) compiled through `deploy.compile.compile_runner` and timed with `measure_latency`, as
   the extra cost of parallel copies of the layer (`profile_point`: the layer's cost inside a
   network, without the per-model overhead a layer alone pays). A reference layer is timed next to
   every point; points are scaled by its drift, and the drift's median is the table's noise.
3. `configs` whole networks at random widths (`latency.calibrate.draw_configs`, the dense one
   first) are exported and measured as latency ratios to the dense network, interleaved in this
   process with load checks (`quiet_block_ratios`, DEPLOY_NOTES' protocol); each ratio is the median
   over `network_compiles` fresh compiles of the network and the dense one.
4. latency_ratio = a + b * table_ratio (+ c * conv MACs or output-element ratio, kept only where it
   lowers the held-out error measurably: `costs.latency_fit.choose_fit`) is fitted on all of them,
   or, where conv MACs alone predict them measurably better held out, a + c * MACs ratio with b = 0;
   its held-out error (median over 500 random 2/3 : 1/3 splits) is recorded next to the FLOPs fit's
   (MACs, + output elements where that helps: what calibrate-latency fits) on the same splits, and
   next to the raw table sum (no fit). Recorded beside them, not used: the fits that may also take the
   off-block output elements (`costs.latency_table.off_block_share`, one or two extra terms), for the
   table and for FLOPs. On the AMX Xeon they cut the held-out error on these random networks (OpenVINO
   bf16 at batch 32: 7.7% -> 2.9%; f32 3.4% -> 1.8%) but predicted the networks LAPP trains there worse
   (OpenVINO f32, `--keep-blocks 1` packages at batch 1: -10.1% against -0.4%; an OpenVINO bf16 fit
   predicted 0.21 of dense latency for a network that measured 0.53; docs/RESULTS.md, "The off-block
   term"), so the fit a run trains against keeps the one-term rule.
5. `in_network` (`--in-network`): before the fit, calibration networks (other draws) are profiled node by node by
   the runtime's own profiler and every layer point corrected to what it costs inside them; kept unless the fit is
   measurably better without (`latency.node_profile`, `fit_keeping_what_helps`).
The table is written atomically as JSON into `--out` (with the dense reference ONNX beside it,
unless one is there already), named by target, model, input and machine (`table_file_name`).
"""

from __future__ import annotations

import datetime
import functools
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.costs.latency_fit import CandidateFit, choose_fit, measurably_better, measurably_lower
from lapp_edge.costs.latency_table import (
    EXTRA_FEATURES, FITTED_FEATURES, TABLE_FORMAT, BatchTable, LatencyTable, LayerTable, dense_normalisers, feature_sums,
    load_table, table_file_name, write_table_json,
)
from lapp_edge.deploy.backends import NodeProfileUnavailable, Runner, get_backend
from lapp_edge.deploy.compile import OnnxModel, compile_runner, dataset_calibration
from lapp_edge.deploy.measure import (
    COMPILES_PER_RATIO, LatencyProtocol, RatioProtocol, cpu_model, cpu_snapshot, measure_latency, other_cpu_share_since,
    quiet_block_ratios,
)
from lapp_edge.deploy.targets import TargetProfile, channel_multiple_for, load_target, runtime_version, target_machine_key
from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_bytes, check_output_location
from lapp_edge.lapp.flops import DeployedLayer, FlopsCost
from lapp_edge.lapp.widths import allowed_widths

MAX_GRID = 12                  # widths per axis measured for one layer shape (wider sites: evenly spread)
REFERENCE_EVERY = 16           # a progress line every this many points
LAYER_PROTOCOL = LatencyProtocol(warmup_iterations=10, min_iterations=20, min_seconds=0.06, max_seconds=2.0)
MIN_CONFIGS = 6                # a 2-coefficient fit with held-out points needs a few
COPIES = 3                     # parallel copies of a layer whose extra cost is the layer's cost in a network
MIN_SHARE = 0.02               # a layer point never counts less than this share of the layer alone (timing noise)
# Where a network's ratio moves this much between fresh compiles, held-out errors of a few % are partly the measurement's:
# ResNet-20 on OpenVINO bf16 (AVX-512 EPYC without AVX-VNNI) spread 6% over 3 compiles; measured again over 5, the
# table's held-out error went 3.21% -> 2.01% at batch 32, the FLOPs fit's 5.10% -> 5.56% (docs/RESULTS.md).
NOISY_COMPILE_SPREAD_PCT = 5.0
NOISY_COMPILES_HINT = (": noisy; `--reuse-layers THIS_TABLE --network-compiles 5` measures the whole networks again "
                       "(the layer points kept) for a fit and held-out errors less bent by compile noise")


@dataclass(frozen=True)
class ModelLayers:
    """The deployed convs of a dense model and the widths each site may take on the target."""

    layers: list[DeployedLayer]
    site_grids: list[list[int]]     # per site: widths measured
    site_channels: list[int]
    site_names: list[str]
    flops: FlopsCost                # the same model's FLOPs cost (for the FLOPs fit it is compared with)
    site_removable: list[bool]      # per site: may keep zero channels (a residual branch, `--block-removal`)

    def dense_triples(self) -> list[tuple[str, float, float]]:
        """The dense network's (signature, c_in, c_out) per deployed conv (`layer_triples` at every site's full width)."""
        return layer_triples(self.layers, np.array(self.site_channels, dtype=np.float64))


def spread(values: np.ndarray, limit: int) -> list[int]:
    """At most `limit` of the sorted `values`, evenly spread, always keeping the first and last."""
    if len(values) <= limit:
        return [int(v) for v in values]
    picks = np.unique(np.round(np.linspace(0, len(values) - 1, limit)).astype(int))
    return [int(values[i]) for i in picks]


def layer_triples(layers: list[DeployedLayer], counts: np.ndarray | list[float]) -> list[tuple[str, float, float]]:
    """(signature, c_in, c_out) of every conv for per-site widths `counts` (the classifier excluded)."""
    triples = []
    for layer in layers:
        if layer.kind != "conv":
            continue
        c_in = counts[layer.in_site] if layer.in_site is not None else layer.in_fixed
        c_out = counts[layer.out_site] if layer.out_site is not None else layer.out_fixed
        triples.append((layer.signature, float(c_in), float(c_out)))
    return triples


def grid_points(model_layers: ModelLayers) -> dict[str, tuple[list[int], list[int], bool]]:
    """Per layer shape: the c_in grid, the c_out grid, and whether the two are tied (depthwise)."""
    grids: dict[str, tuple[set[int], set[int], bool]] = {}
    for layer in model_layers.layers:
        if layer.kind != "conv":
            continue
        c_in = set(model_layers.site_grids[layer.in_site]) if layer.in_site is not None else {layer.in_fixed}
        c_out = set(model_layers.site_grids[layer.out_site]) if layer.out_site is not None else {layer.out_fixed}
        if layer.depthwise:
            c_out |= c_in
            c_in = {0}
        entry = grids.setdefault(layer.signature, (set(), set(), layer.depthwise))
        entry[0].update(c_in)
        entry[1].update(c_out)
    return {name: (sorted(i), sorted(o), tied) for name, (i, o, tied) in grids.items()}


def conv_onnx(c_in: int, c_out: int, layer: DeployedLayer, seed: int = 0, copies: int = 1) -> bytes:
    """`copies` parallel copies of one layer as deployed (Conv with bias) on the same input, summed,
    then ReLU; input N x c_in x H x W with a dynamic batch. One copy is the layer alone; the
    difference between COPIES copies and one is the layer's cost inside a network (`profile_point`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    groups = c_in if layer.depthwise else layer.groups
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    for copy in range(copies):
        weight = rng.standard_normal((c_out, c_in // groups, *layer.kernel)).astype(np.float32) * 0.1
        bias = rng.standard_normal(c_out).astype(np.float32) * 0.1
        initializers += [numpy_helper.from_array(weight, f"weight{copy}"), numpy_helper.from_array(bias, f"bias{copy}")]
        nodes.append(helper.make_node("Conv", ["input", f"weight{copy}", f"bias{copy}"], [f"conv{copy}"],
                                      kernel_shape=list(layer.kernel), strides=list(layer.stride),
                                      pads=[*layer.padding, *layer.padding], group=groups))
    if copies > 1:
        nodes.append(helper.make_node("Sum", [f"conv{c}" for c in range(copies)], ["summed"]))
    nodes.append(helper.make_node("Relu", ["summed" if copies > 1 else "conv0"], ["output"]))
    h, w = layer.in_hw
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c_in, h, w])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", c_out, None, None])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass
class Reference:
    """The reference layer every point is timed next to: its runner, input and baseline median (ms)."""

    runner: Runner
    data: np.ndarray
    baseline_ms: float

    def now_ms(self) -> float:
        return measure_latency(self.runner, self.data, LAYER_PROTOCOL).median_ms


def profile_point(layer: DeployedLayer, c_in: int, c_out: int, batch: int, profile: TargetProfile, work: Path,
                  rng: np.random.Generator, reference: Reference, seed: int = 0, int8: bool = False) -> tuple[float, str, float]:
    """A layer's latency in ms as it costs inside a network, the precision the runtime compiled, and
    the reference's drift at that moment (now / baseline).

    Cost inside a network: (t(COPIES parallel copies) - t(one copy)) / (COPIES - 1). A layer measured
    alone also pays the call overhead and the input/output layout reorders (NCHW <-> the runtime's
    blocked layout) that a network pays once; at batch 1 those dominate a small conv, and a table of
    isolated layers predicted whole networks worse than FLOPs (7.7% vs 2.7% held-out median, ORT fp32,
    ResNet-20, this machine). Extra copies add only the conv (and its fused add), as in a network.
    Both models and the reference are timed twice, in turn; the point is scaled by baseline / reference
    now, so load that comes and goes on a shared machine (the other core's work slows this one) does not
    bend the table."""
    shape = (c_in, *layer.in_hw)
    data = rng.standard_normal((batch, *shape)).astype(np.float32)
    target = replace(profile, input_shape=shape)
    runners = []
    for copies in (1, COPIES):
        path = work.with_name(f"{work.name}-x{copies}.onnx")
        atomic_write_bytes(path, conv_onnx(c_in, c_out, layer, seed, copies))
        runners.append(compile_runner(OnnxModel(path, "input", shape), target, batch, work.parent, data if int8 else None))
    try:
        times: list[list[float]] = [[], [], []]
        for _ in range(2):
            times[2].append(reference.now_ms())
            for index, runner in enumerate(runners):
                times[index].append(measure_latency(runner, data, LAYER_PROTOCOL).median_ms)
        one, many, drift = float(np.median(times[0])), float(np.median(times[1])), float(np.median(times[2])) / reference.baseline_ms
        return max((many - one) / (COPIES - 1), MIN_SHARE * one) / drift, runners[0].info.precision_used, drift
    finally:
        for runner in runners:
            runner.close()


def _fit_record(fit: CandidateFit) -> dict[str, Any]:
    """A fit as the table's validation stores it: its terms, coefficients, R^2 and held-out errors (%)."""
    return {"features": fit.features, "coefficients": fit.coefficients, "r2": fit.r2,
            "median_abs_pct": fit.held_out.median_abs_pct, "max_abs_pct": fit.held_out.max_abs_pct}


def compile_noise_floor_pct(compile_ratios: np.ndarray) -> float | None:
    """The held-out median error (%) that compile noise alone puts under any fit: what a predictor exact to
    every network's expected latency ratio would still show against the measured medians.

    `compile_ratios`: networks x fresh compiles, each entry a network's latency ratio to dense in one compile.
    The compile-to-compile standard deviation s is pooled over networks (deviations from each network's mean,
    relative, N (k - 1) degrees of freedom); the median of k normal draws has standard deviation m_k s
    (`median_sd_factor`: 0.67 for k = 3, 0.54 for 5), and the median |error| of a normal variable is 0.6745 of
    its standard deviation. A lower bound: the fit's own estimation error (16 noisy points) comes on top.
    None with fewer than 3 compiles per network (no spread worth pooling).
    """
    ratios = np.asarray(compile_ratios, dtype=np.float64)
    if ratios.ndim != 2 or ratios.shape[1] < 3 or ratios.shape[0] < 2:
        return None
    networks, compiles = ratios.shape
    relative = ratios / ratios.mean(axis=1, keepdims=True) - 1.0
    pooled_sd = float(np.sqrt(np.sum(relative ** 2) / (networks * (compiles - 1))))
    return 100.0 * 0.6745 * median_sd_factor(compiles) * pooled_sd


@functools.lru_cache(maxsize=None)
def median_sd_factor(k: int) -> float:
    """Standard deviation of the median of k standard normal draws (seeded simulation, 200 000 medians; the
    asymptotic 1.2533 / sqrt(k) is 5-8% high at the 3-5 compiles profile-layers takes)."""
    draws = np.random.default_rng(0).standard_normal((200_000, k))
    return float(np.std(np.median(draws, axis=1)))


def fit_whole_network(described: ModelLayers, table: BatchTable, configs: list[tuple[str, np.ndarray]], measured: list[float],
                      macs_ratio: list[float], seed: int = 0, compile_ratios: list[list[float]] | None = None,
                      ) -> tuple[float, float, dict[str, float], dict[str, float], dict[str, Any]]:
    """Fit latency_ratio = a + b * table_ratio (+ one extra term, conv MACs or output elements, where it helps)
    to whole-network measurements, or a + c * conv MACs ratio (b = 0) where that line is measurably better held
    out than every fit with the table's sum (`costs.latency_fit.measurably_better`). `configs`: name and
    per-site widths; `measured`: latency ratios to dense; `macs_ratio`: FlopsCost ratios, for the FLOPs fit
    compared with; `compile_ratios`: per configuration, its ratio in each fresh compile (stored, and the
    compile-noise floor under the held-out errors computed from them: `compile_noise_floor_pct`). Returns a, b,
    the extra terms, their
    dense normalisers (`costs.latency_table.dense_normalisers`), and the validation record: every
    configuration with its feature ratios, and the held-out errors of the table fit, of the FLOPs fit, and
    of both allowed the off-block term too (recorded, not used: module docstring)."""
    y = np.array(measured)
    dense_triples = described.dense_triples()
    dense_sum = table.dense_table_ms
    dense_features = dense_normalisers(feature_sums(dense_triples))
    rows = []
    for _, widths in configs:
        triples = layer_triples(described.layers, widths)
        rows.append({"table_ratio": float(table.sum_ms(triples)) / dense_sum,
                     **{k: float(v) / dense_features[k] for k, v in feature_sums(triples).items()}})
    chosen, candidates = choose_fit(rows, y, seed, base="table_ratio", extras=FITTED_FEATURES)
    # where the layer sum predicts these networks measurably worse than conv MACs alone (measured: MobileNetV2
    # on OpenVINO at batch 1, 5.8% against 2.6%; docs/RESULTS.md), the MACs line stands in: scale 0, the table's
    # sum carries no weight, so training against the table is never steered by a worse predictor than FLOPs
    macs_line, _ = choose_fit(rows, y, seed, base="macs_ratio", extras=("activations_ratio",))
    if measurably_better(macs_line, chosen):
        chosen = macs_line
    # recorded, not used: the off-block term (one or two extra terms) held out on these networks; it fitted
    # width-only draws better on AVX-512 / AMX but predicted the networks LAPP trains worse (module docstring)
    off_block, _ = choose_fit(rows, y, seed, base="table_ratio", extras=EXTRA_FEATURES, max_extra_terms=2)
    flops_rows = [{"macs_ratio": m, "activations_ratio": r["activations_ratio"],
                   "off_block_activations_ratio": r["off_block_activations_ratio"]} for m, r in zip(macs_ratio, rows)]
    flops_fit, _ = choose_fit(flops_rows, y, seed, base="macs_ratio", extras=("activations_ratio",))
    # the FLOPs fit given the same off-block term the table may take: whether the table, not the term, is what helps
    flops_off_block, _ = choose_fit(flops_rows, y, seed, base="macs_ratio",
                                    extras=("activations_ratio", "off_block_activations_ratio"), max_extra_terms=2)
    if chosen.features[0] == "table_ratio":
        a, b, *rest = chosen.coefficients
        extra = dict(zip(chosen.features[1:], rest))
    else:                                   # the MACs line: a + c * macs_ratio (+ activations)
        a, b = chosen.coefficients[0], 0.0
        extra = dict(zip(chosen.features, chosen.coefficients[1:]))
    raw = 100.0 * np.abs(np.array([r["table_ratio"] for r in rows]) / y - 1.0)
    per_compile = compile_ratios if compile_ratios is not None else [None] * len(configs)
    validation = {
        "configurations": [{"name": name, "widths": [int(v) for v in widths], "measured_ratio": m, **row,
                            "macs_ratio_with_classifier": f, **({"compile_ratios": list(c)} if c is not None else {})}
                           for (name, widths), m, row, f, c in zip(configs, measured, rows, macs_ratio, per_compile)],
        "table_fit": _fit_record(chosen),
        "table_candidates": [{"features": c.features, "median_abs_pct": c.held_out.median_abs_pct,
                              "max_abs_pct": c.held_out.max_abs_pct} for c in candidates],
        "flops_fit": _fit_record(flops_fit),
        "table_fit_off_block": _fit_record(off_block),
        "flops_fit_off_block": _fit_record(flops_off_block),
        "raw_table_sum": {"median_abs_pct": float(np.median(raw)), "max_abs_pct": float(raw.max())},
        "compile_noise_floor_pct": compile_noise_floor_pct(np.array(compile_ratios)) if compile_ratios is not None else None,
        "held_out": f"median over {chosen.held_out.splits} random splits, {chosen.held_out.fit_points} fit / "
                    f"{chosen.held_out.held_out_points} held out; FLOPs fit: MACs (+ output elements where it helps), "
                    "as calibrate-latency fits it",
    }
    return float(a), float(b), {k: float(v) for k, v in extra.items()}, {k: dense_features[k] for k in extra}, validation


def fit_keeping_what_helps(described: ModelLayers, table: BatchTable, configs: list[tuple[str, np.ndarray]],
                           measured: list[float], macs_ratio: list[float], seed: int,
                           compile_ratios: list[list[float]] | None, in_network_record: dict[str, Any] | None,
                           ) -> tuple[float, float, dict[str, float], dict[str, float], dict[str, Any]]:
    """`fit_whole_network`, and where `in_network_record` says the table's in-network corrections were just measured:
    the fit without them too. The corrections stay unless the table fits the whole networks measurably better
    without them (`costs.latency_fit.measurably_lower`: the rule every extra term passes); the record says which,
    with both held-out errors. Dropped corrections are removed from `table` (in place)."""
    from lapp_edge.latency.node_profile import apply_corrections

    fitted = fit_whole_network(described, table, configs, measured, macs_ratio, seed, compile_ratios)
    if in_network_record is None:
        return fitted
    dense_triples = described.dense_triples()
    corrections = {signature: layer.in_network for signature, layer in table.layers.items()}
    apply_corrections(table, None, dense_triples)
    plain = fit_whole_network(described, table, configs, measured, macs_ratio, seed, compile_ratios)
    with_pct, without_pct = (f[4]["table_fit"]["median_abs_pct"] for f in (fitted, plain))
    kept = not measurably_lower(without_pct, with_pct)
    in_network_record.update(kept=kept, table_fit_with_pct=with_pct, table_fit_without_pct=without_pct)
    if not kept:
        return plain
    apply_corrections(table, corrections, dense_triples)   # type: ignore[arg-type]
    return fitted


def stored_compile_ratios(configurations: list[dict[str, Any]]) -> list[list[float]] | None:
    """The per-compile ratios a table's configurations store, or None where any is missing, not a list of
    positive finite numbers, or of another length than the rest (a table measured before they were stored,
    or an edited one: the refit then records no floor rather than failing)."""
    stored = [c.get("compile_ratios") for c in configurations]
    if not all(isinstance(r, list) and r and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 and np.isfinite(v) and v > 0 for v in r) for r in stored):
        return None
    return [[float(v) for v in r] for r in stored] if len({len(r) for r in stored}) == 1 else None


def refit_table(path: str | Path, out: str | Path | None = None, seed: int = 0, in_network: bool = False,
                progress: bool = False) -> Path:
    """Fit a table's whole-network model again from the measurements it stores: after a change to the fit, or
    to check one. Without `in_network` nothing is measured and the in-network corrections the table carries are
    kept; with it, calibration networks are profiled node by node on this machine first and the corrections set
    from them (`measure_in_network`; the table must be this machine's, on this runtime version, else UserError).
    Writes `out` (default: over `path`, atomically)."""
    from lapp_edge.costs.latency_table import load_table

    table = load_table(path)
    described = describe_model(table.model, tuple(table.input_shape), table.coupled_groups, table.channel_multiple)  # type: ignore[arg-type]
    for batch, batch_table in table.batches.items():
        configurations = batch_table.validation.get("configurations") or []
        if len(configurations) < MIN_CONFIGS:
            raise UserError(f"{path}: batch {batch} stores {len(configurations)} whole-network measurements; a fit needs {MIN_CONFIGS}")
    records = {batch: t.validation.get("in_network") for batch, t in table.batches.items()}
    if in_network:
        records = measure_in_network_for_table(table, described, path, seed, progress)
    for batch, batch_table in table.batches.items():
        configurations = batch_table.validation["configurations"]
        configs = [(c["name"], np.array(c["widths"], dtype=np.float64)) for c in configurations]
        macs = [float(c.get("macs_ratio_with_classifier", c.get("macs_ratio"))) for c in configurations]
        a, b, extra, dense_features, validation = fit_keeping_what_helps(
            described, batch_table, configs, [float(c["measured_ratio"]) for c in configurations], macs, seed,
            stored_compile_ratios(configurations), records.get(batch) if in_network else None)
        if records.get(batch) is not None:
            validation["in_network"] = records[batch]
        batch_table.constant, batch_table.scale, batch_table.extra = a, b, extra
        batch_table.dense_features, batch_table.validation = dense_features, validation
    target = Path(out or path)
    atomic_write_bytes(target, write_table_json(table))
    return target


def check_node_profiler(profile: TargetProfile) -> None:
    """Raise NodeProfileUnavailable (one line) unless `profile`'s backend reports per-node times (before any measuring)."""
    if not get_backend(profile.backend).node_profiler:
        raise NodeProfileUnavailable(f"--in-network: backend {profile.backend} of {profile.name} reports no per-node times "
                                     "(ONNX Runtime and OpenVINO do); drop --in-network")


def measure_in_network_for_table(table: LatencyTable, described: ModelLayers, path: str | Path, seed: int = 0,
                                 progress: bool = False) -> dict[int, dict[str, Any]]:
    """Set a stored table's in-network corrections by profiling calibration networks on this machine (every batch),
    in place; returns each batch's record. Raises UserError where the table was measured on another machine, target
    runtime version or precision, and NodeProfileUnavailable where the backend has no per-node profiler."""
    profile = load_target(table.target)
    check_node_profiler(profile)
    here = {"machine": target_machine_key(profile.backend), "runtime": runtime_version(profile.backend),
            "precision": profile.precision}
    theirs = {"machine": table.machine, "runtime": table.runtime, "precision": table.precision}
    differ = [f"{key} ({theirs[key]!r} there, {here[key]!r} here)" for key in here if here[key] != theirs[key]]
    if differ:
        raise UserError(f"--in-network: {path} was measured with another {', '.join(differ)}; its layer points cannot "
                        "be corrected by this machine's profile (measure a table here with profile-layers)")
    shape: tuple[int, int, int] = tuple(table.input_shape)  # type: ignore[assignment]
    count = len(next(iter(table.batches.values())).validation["configurations"])
    records = {}
    with tempfile.TemporaryDirectory(prefix="lapp-in-network-") as temporary:
        work = Path(temporary)
        networks = calibration_networks(described, table.model, shape, table.coupled_groups, table.channel_multiple,
                                        count, seed, work)
        calibration = dataset_calibration(profile)
        for batch, batch_table in table.batches.items():
            records[batch] = measure_in_network(batch_table, networks, described, profile, batch, work, calibration, seed)
            if progress:
                print(f"batch {batch}: {in_network_summary(records[batch])}", file=sys.stderr, flush=True)
    return records


CALIBRATION_SEED_OFFSET = 1000       # calibration networks are drawn with seed + this: none is one of the fit's networks


def calibration_networks(described: ModelLayers, model: str, shape: tuple[int, int, int], coupled: bool, multiple: int,
                         count: int, seed: int, work: Path) -> list[OnnxModel]:
    """The networks whose node profiles correct a table's points (`latency.node_profile`): the dense one and
    `count - 1` random ones drawn with another seed than the fit's networks (the uniform fractions, which every
    draw shares, left out), exported as ONNX into `work`."""
    from lapp_edge.latency.calibrate import INPUT_NAME, build_fused, draw_configs, export_config

    dense_widths = dict(zip(described.site_names, described.site_channels))
    drawn = draw_configs(dense_widths, count + 8, seed + CALIBRATION_SEED_OFFSET, multiple)
    chosen = [drawn[0]] + [c for c in drawn[1:] if not c.name.startswith("uniform")][: count - 1]
    networks = []
    for config in chosen:
        fused = build_fused(model, config.widths, dense_widths, shape, coupled=coupled)
        networks.append(OnnxModel(export_config(fused, shape, work / f"calibration-{config.name}.onnx"), INPUT_NAME, shape))
    return networks


def measure_in_network(table: BatchTable, networks: list[OnnxModel], described: ModelLayers, profile: TargetProfile,
                       batch: int, work: Path, calibration: np.ndarray | None, seed: int = 0) -> dict[str, Any]:
    """Profile `networks` node by node on `profile`'s runtime at `batch` and set `table`'s in-network corrections
    from them, in place (`latency.node_profile`). Returns what the table records. Raises NodeProfileUnavailable
    (a UserError) where the target's backend has no per-node profiler."""
    from lapp_edge.latency.node_profile import apply_corrections, in_network_corrections, profile_layer_times

    observations = []
    start = cpu_snapshot()
    for index, network in enumerate(networks):
        observations += profile_layer_times(network, profile, batch, work / f"in-network-b{batch}-{index}", calibration,
                                            seed=seed)
    corrections = in_network_corrections(table, observations)
    apply_corrections(table, corrections.corrections, described.dense_triples())
    return {**corrections.record(), "networks": len(networks), "other_cpu_share": other_cpu_share_since(start),
            "method": "the runtime's per-node profile of the dense network and random ones drawn with seed + "
                      f"{CALIBRATION_SEED_OFFSET} (none of the fit's networks), one compile each"}


def in_network_summary(record: dict[str, Any]) -> str:
    """One line on a batch's in-network corrections (and whether the fit kept them)."""
    verdict = ""
    if "kept" in record:
        verdict = (f"{'kept' if record['kept'] else 'dropped'} (table fit held out {record['table_fit_with_pct']:.2f}% with, "
                   f"{record['table_fit_without_pct']:.2f}% without); ")
    return (f"in-network corrections {verdict}from {record['networks']} networks: {record['observed_points']} of "
            f"{record['total_points']} points observed, unit {record['unit']:.2f}"
            + (f", others' CPU share {record['other_cpu_share']:.2f}" if "other_cpu_share" in record else "")
            + "; per layer shape (median) "
            + ", ".join(f"{sig.removeprefix('conv ')} x{v:.2f}" for sig, v in record["signature_medians"].items()))


def describe_model(model: str, input_shape: tuple[int, int, int], coupled: bool, multiple: int,
                   max_grid: int = MAX_GRID) -> ModelLayers:
    """Build the dense model (random weights, no bypass) and list its deployed convs and site grids.
    Raises UserError for an unknown model or one with no prunable site."""
    from lapp_edge.lapp.flops import build_flops_cost, deployed_layers
    from lapp_edge.latency.calibrate import NUM_CLASSES
    from lapp_edge.models import build_model, prunable_sites

    network = build_model(model, input_shape[0], NUM_CLASSES, False, coupled, input_size=input_shape[1])
    sites = prunable_sites(network)
    if not sites:
        raise UserError(f"model {model} has no prunable layer: there is nothing to profile")
    grids = [spread(allowed_widths(site.channels, multiple, multiple), max_grid) for site in sites]
    return ModelLayers(deployed_layers(network, sites, input_shape), grids, [site.channels for site in sites],
                       [site.name for site in sites], build_flops_cost(network, sites, input_shape),
                       [site.removal is not None for site in sites])


def profile_layers(target: str | Path, model: str = "resnet20", input_shape: tuple[int, int, int] | None = None,
                   configs: int = 24, batches: list[int] | None = None, channel_multiple: int = 0, coupled: bool = True,
                   out: str | Path = "latency-data", seed: int = 0, max_grid: int = MAX_GRID,
                   ratio_protocol: RatioProtocol | None = None, command: str = "", progress: bool = True,
                   reuse_layers: str | Path | None = None, network_compiles: int = COMPILES_PER_RATIO,
                   block_removal: bool = False, in_network: bool = False) -> Path:
    """Measure and write the layer latency table of `model` on `target` (see the module docstring).
    Each whole network's latency ratio is the median over `network_compiles` fresh compiles of it
    and the dense network (one compile moves a ratio by a few percent, docs/RESULTS.md); the
    spread over compiles is recorded in the table's `load`.
    `block_removal`: about half the random networks also remove residual branches (inner width 0,
    `latency.calibrate.draw_configs`), so the fit sees the plans `train --block-removal` ends with.
    `reuse_layers`: an earlier table of the same target, model, input, groups, channel multiple and
    batches on this machine whose layer points are kept (only the whole networks are measured and
    fitted again). `in_network`: before the fit, calibration networks are profiled node by node on the target's
    runtime and every layer point corrected to what it costs inside them (`latency.node_profile`); without it no
    point is corrected (a reused table's corrections are dropped). Returns the table's path. Raises UserError for a bad target, model, input, batch,
    count or reused table before anything is measured, and BackendUnavailable where the target's
    runtime is missing."""
    from lapp_edge.latency.calibrate import (
        DENSE, INPUT_NAME, cpu_count, build_fused, dense_reference_name, draw_configs, export_config,
    )

    profile = load_target(target)
    shape = tuple(input_shape or profile.input_shape)
    if configs < MIN_CONFIGS:
        raise UserError(f"--configs must be at least {MIN_CONFIGS} (a fitted line and held-out points), not {configs}")
    batch_sizes = sorted(set(batches or profile.batch_sizes))
    if any(b <= 0 or b > 4096 for b in batch_sizes):
        raise UserError("--batch must lie in [1, 4096]")
    if max_grid < 2:
        raise UserError(f"--max-grid must be at least 2, not {max_grid}")
    if network_compiles < 1:
        raise UserError(f"--network-compiles must be at least 1, not {network_compiles}")
    check_output_location(out, "--out", "dir")
    if in_network:
        check_node_profiler(profile)
    multiple = channel_multiple or channel_multiple_for(profile)
    described = describe_model(model, shape, coupled, multiple, max_grid)  # type: ignore[arg-type]
    removable = [name for name, can in zip(described.site_names, described.site_removable) if can] if block_removal else []
    if block_removal and not removable:
        from lapp_edge.models import BLOCK_REMOVAL_MODELS   # models imports torch: only where it is said

        raise UserError(f"--block-removal: {model} has no residual branch that can be removed ({BLOCK_REMOVAL_MODELS} have); "
                        "drop --block-removal")
    points = grid_points(described)
    reused = None
    if reuse_layers is not None:
        reused = load_table(reuse_layers)
        mismatch = [what for what, ours, theirs in (
            ("target", profile.name, reused.target), ("model", model, reused.model),
            ("input", list(shape), list(reused.input_shape)), ("groups", coupled, reused.coupled_groups),
            ("channel multiple", multiple, reused.channel_multiple), ("machine", target_machine_key(profile.backend), reused.machine),
            ("batches", batch_sizes, sorted(reused.batches)),
            ("layer shapes", sorted(points), sorted(reused.batches[min(reused.batches)].layers))) if ours != theirs]
        if mismatch:
            raise UserError(f"--reuse-layers {reuse_layers}: its {', '.join(mismatch)} differ from this run's")
    ratio_protocol = ratio_protocol or RatioProtocol()
    layer_profile = replace(profile, latency=LAYER_PROTOCOL)
    calibration = dataset_calibration(profile)          # None unless int8
    total_points = sum(len(i) * len(o) for i, o, _ in points.values()) * len(batch_sizes)
    started = time.perf_counter()

    def say(message: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    say(f"profile-layers: {model} {'x'.join(map(str, shape))} on {profile.name}, channel multiple {multiple}: "
        f"{len(points)} layer shapes, {total_points} layer points, then {configs} whole networks, batches {batch_sizes}")
    rng = np.random.default_rng(seed)
    load_start = cpu_snapshot()
    with tempfile.TemporaryDirectory(prefix="lapp-profile-") as temporary:
        work = Path(temporary)
        # --- 2. layer tables -------------------------------------------------------------------
        layer_of = {layer.signature: layer for layer in described.layers if layer.kind == "conv"}
        tables: dict[int, dict[str, LayerTable]] = {b: {} for b in batch_sizes}
        noise: dict[int, list[float]] = {b: [] for b in batch_sizes}
        precision_used = ""
        done = 0
        # the reference: the largest layer point (a tiny one drifts tens of % on timer and cache effects alone)
        work_of = {name: max(i or [1]) * max(o) * layer_of[name].kernel[0] * layer_of[name].kernel[1] * layer_of[name].out_elements
                   for name, (i, o, _) in points.items()}
        reference_name = max(work_of, key=work_of.__getitem__)
        for batch in batch_sizes:
            if reused is not None:           # the layer points of an earlier run, with the noise it recorded
                tables[batch] = {sig: replace(layer, in_network=None) for sig, layer in reused.batches[batch].layers.items()}
                noise[batch] = [reused.batches[batch].noise_pct]
                precision_used = reused.precision_used
                say(f"batch {batch}: {len(tables[batch])} layer tables reused from {reuse_layers}")
                continue
            ref_layer = layer_of[reference_name]
            ref_in, ref_out = max(points[reference_name][0]), max(points[reference_name][1])
            ref_in = ref_out if points[reference_name][2] else ref_in
            path = work / f"reference-{batch}.onnx"
            atomic_write_bytes(path, conv_onnx(ref_in, ref_out, ref_layer, seed))
            reference_data = rng.standard_normal((batch, ref_in, *ref_layer.in_hw)).astype(np.float32)
            reference_runner = compile_runner(OnnxModel(path, "input", (ref_in, *ref_layer.in_hw)),
                                              replace(layer_profile, input_shape=(ref_in, *ref_layer.in_hw)), batch, work,
                                              reference_data if calibration is not None else None)
            measure_latency(reference_runner, reference_data, LAYER_PROTOCOL)          # a cold start: not counted
            reference = Reference(reference_runner, reference_data,
                                  float(np.median([measure_latency(reference_runner, reference_data, LAYER_PROTOCOL).median_ms
                                                   for _ in range(3)])))
            for signature, (c_in_grid, c_out_grid, tied) in points.items():
                layer = layer_of[signature]
                ms = np.zeros((1 if tied else len(c_in_grid), len(c_out_grid)))
                for i, c_in in enumerate([0] if tied else c_in_grid):
                    for o, c_out in enumerate(c_out_grid):
                        channels_in = c_out if tied else c_in
                        ms[i, o], precision_used, drift = profile_point(
                            layer, channels_in, c_out, batch, layer_profile, work / f"layer-{done}", rng, reference, seed,
                            calibration is not None)
                        noise[batch].append(100.0 * abs(drift - 1.0))
                        done += 1
                        if done % REFERENCE_EVERY == 0:
                            say(f"  layers {done}/{total_points} (reference drift now {100 * (drift - 1):+.1f}%, corrected)")
                tables[batch][signature] = LayerTable(signature, [0] if tied else list(c_in_grid), list(c_out_grid),
                                                      ms.tolist(), tied)
            reference_runner.close()
            say(f"batch {batch}: {len(tables[batch])} layer tables measured")

        # --- 3. whole networks -----------------------------------------------------------------
        dense_widths = dict(zip(described.site_names, described.site_channels))
        width_configs = draw_configs(dense_widths, configs, seed, multiple, removable)
        flops = described.flops
        onnx_models: dict[str, OnnxModel] = {}
        counts: dict[str, np.ndarray] = {}
        for index, config in enumerate(width_configs):
            vector = np.array([config.widths[name] for name in described.site_names], dtype=np.float64)
            counts[config.name] = vector
            fused = build_fused(model, config.widths, dense_widths, shape, coupled=coupled)  # type: ignore[arg-type]
            onnx_models[config.name] = OnnxModel(export_config(fused, shape, work / f"{config.name}.onnx"), INPUT_NAME, shape)  # type: ignore[arg-type]
            say(f"network {index + 1}/{len(width_configs)} built: {config.name}, MACs x{float(flops.ratio(vector)):.3f}")
        dense_onnx = OnnxModel(work / f"{DENSE}.onnx", INPUT_NAME, shape)  # type: ignore[arg-type]
        calibration_nets = (calibration_networks(described, model, shape, coupled, multiple, configs, seed, work)  # type: ignore[arg-type]
                            if in_network else [])
        batch_tables: dict[int, BatchTable] = {}
        shares = []
        compile_spreads: list[float] = []
        for batch in batch_sizes:
            data = rng.standard_normal((batch, *shape)).astype(np.float32)
            macs_ratio = [float(flops.ratio(counts[config.name])) for config in width_configs]
            rounds: list[list[float]] = []           # per fresh compile of every network: its ratios to dense
            for round_index in range(network_compiles):
                folder = work / f"networks-b{batch}-compile-{round_index}"
                with compile_runner(dense_onnx, profile, batch, folder, calibration) as reference:
                    if round_index == 0:
                        dense_ms = measure_latency(reference, data, profile.latency).median_ms
                    ratios = []
                    for config, macs in zip(width_configs, macs_ratio):
                        with compile_runner(onnx_models[config.name], profile, batch, folder, calibration) as runner:
                            quiet = quiet_block_ratios(runner, reference, data, ratio_protocol)
                        shares.append(quiet.other_cpu_share)
                        ratios.append(float(np.median(quiet.block_ratios)))
                        say(f"  b{batch} compile {round_index + 1}/{network_compiles} {config.name:12s} measured x{ratios[-1]:.3f}  "
                            f"MACs x{macs:.3f}  (others' CPU {quiet.other_cpu_share:.2f})")
                rounds.append(ratios)
            per_config = np.array(rounds)                                   # compiles x configs
            measured = [float(v) for v in np.median(per_config, axis=0)]
            if network_compiles > 1:
                compile_spreads += list(100.0 * (per_config.max(axis=0) - per_config.min(axis=0)) / np.median(per_config, axis=0))
            dense_triples = described.dense_triples()
            dense_sum = float(BatchTable(batch, tables[batch], 0.0, 1.0, 1.0, dense_ms, 0.0).sum_ms(dense_triples))
            partial = BatchTable(batch, tables[batch], 0.0, 1.0, dense_sum, dense_ms, 0.0)
            in_network_record = None
            if in_network:
                in_network_record = measure_in_network(partial, calibration_nets, described, profile, batch, work,
                                                       calibration, seed)
                say(f"batch {batch}: {in_network_summary(in_network_record)}")
            a, b, extra, dense_features, validation = fit_keeping_what_helps(
                described, partial, [(c.name, counts[c.name]) for c in width_configs], measured, macs_ratio, seed,
                per_config.T.tolist(), in_network_record)
            if in_network_record is not None:
                validation["in_network"] = in_network_record
            batch_tables[batch] = BatchTable(batch, tables[batch], a, b, partial.dense_table_ms, dense_ms,
                                             float(np.median(noise[batch])) if noise[batch] else 0.0, validation, extra,
                                             dense_features)
            say(f"batch {batch}: held-out median error: table ({' + '.join(validation['table_fit']['features'])}) "
                f"{validation['table_fit']['median_abs_pct']:.2f}%, FLOPs fit {validation['flops_fit']['median_abs_pct']:.2f}%")
        dense_bytes = dense_onnx.onnx_path.read_bytes()
    table = LatencyTable(
        format=TABLE_FORMAT, target=profile.name, backend=profile.backend, precision=profile.precision,
        precision_used=precision_used, threads=profile.threads,
        runtime=runtime_version(profile.backend), machine=target_machine_key(profile.backend), cpu_model=cpu_model(),
        model=model, coupled_groups=coupled, input_shape=list(shape), channel_multiple=multiple, batches=batch_tables,
        dense_reference=dense_reference_name(model, shape),  # type: ignore[arg-type]
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), command=command,
        load={"other_cpu_share_median": float(np.median(shares)), "other_cpu_share_max": float(np.max(shares)),
              "other_cpu_share_over_all_measuring": other_cpu_share_since(load_start), "cpu_count": cpu_count(),
              "network_compiles": network_compiles,
              "network_compile_spread_median_pct": float(np.median(compile_spreads)) if compile_spreads else None},
    )
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / table_file_name(profile.name, model, shape, table.machine)  # type: ignore[arg-type]
    atomic_write_bytes(path, write_table_json(table))
    if not (directory / table.dense_reference).is_file():
        atomic_write_bytes(directory / table.dense_reference, dense_bytes)
    return path


def format_table_summary(table: LatencyTable, path: Path) -> str:
    """What a profile-layers run found, as a human table: per batch the held-out errors."""
    lines = [f"layer latency table: {path}",
             f"{table.target} ({table.runtime}, {table.precision} -> {table.precision_used}, {table.threads} thread(s)) on "
             f"{table.machine}; model {table.model} {'x'.join(map(str, table.input_shape))}, channel multiple {table.channel_multiple}; "
             f"others' CPU share median {table.load.get('other_cpu_share_median', 0):.2f}",
             f"{'batch':>5s} {'shapes':>6s} {'dense ms':>9s} {'noise %':>7s} {'table fit %':>11s} {'FLOPs fit %':>11s} "
             f"{'off-block: table / FLOPs %':>26s} {'raw sum %':>9s} {'a':>7s} {'b':>6s}  extra terms"]
    for batch, bt in sorted(table.batches.items()):
        v = bt.validation
        table_off, flops_off = v.get("table_fit_off_block"), v.get("flops_fit_off_block")
        lines.append(f"{batch:5d} {len(bt.layers):6d} {bt.dense_ms:9.3f} {bt.noise_pct:7.2f} "
                     f"{v['table_fit']['median_abs_pct']:5.2f}/{v['table_fit']['max_abs_pct']:5.2f} "
                     f"{v['flops_fit']['median_abs_pct']:5.2f}/{v['flops_fit']['max_abs_pct']:5.2f} "
                     + (f"{table_off['median_abs_pct']:12.2f} / {flops_off['median_abs_pct']:11.2f} " if table_off and flops_off
                        else f"{'-':>26s} ")
                     + f"{v['raw_table_sum']['median_abs_pct']:9.2f} {bt.constant:7.3f} {bt.scale:6.3f}  "
                     + (", ".join(f"{name} {value:.3f}" for name, value in bt.extra.items()) or "none"))
    lines.append("held-out error: median / worst held-out point, median over random splits (%); off-block: the table "
                 "and FLOPs fits allowed the off-block output-elements term too (recorded, not used: latency.profile_layers)")
    compiles, spread_pct = table.load.get("network_compiles"), table.load.get("network_compile_spread_median_pct")
    if compiles and spread_pct is not None:
        lines.append(f"whole networks: median of {compiles} fresh compiles each; their spread (max - min) has median "
                     f"{spread_pct:.1f}%" + (NOISY_COMPILES_HINT if spread_pct > NOISY_COMPILE_SPREAD_PCT and compiles < 5 else ""))
    floors = {batch: bt.validation.get("compile_noise_floor_pct") for batch, bt in sorted(table.batches.items())}
    if any(floor is not None for floor in floors.values()):
        lines.append("compile-noise floor (the held-out median error an exact predictor would still show, from compile noise "
                     "alone): " + ", ".join(f"batch {batch} {floor:.2f}%" for batch, floor in floors.items() if floor is not None)
                     + "; fits this close to it cannot be told apart")
    for batch, bt in sorted(table.batches.items()):
        if bt.validation.get("in_network"):
            lines.append(f"batch {batch}: {in_network_summary(bt.validation['in_network'])}")
    return "\n".join(lines)
