"""The latency-efficiency frontier scan (lapp_edge.latency.frontier) on ResNet-20's coupled groups
with the shipped ONNX Runtime layer table, and the benchmark's bad input."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from lapp_edge.costs.latency_table import load_table
from lapp_edge.deploy.targets import load_target
from lapp_edge.lapp.flops import build_flops_cost, deployed_layers
from lapp_edge.lapp.latency_cost import LatencyCost
from lapp_edge.lapp.widths import allowed_widths
from lapp_edge.latency.frontier import _positions, allocation_count, scan_frontier
from lapp_edge.models import build_model, prunable_sites

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (1, 28, 28)
MULTIPLE = 16      # ResNet-20 at multiple 16: 1 * 2^4 * 4^4 = 4096 allocations, exhaustive in milliseconds


def costs() -> tuple:
    model = build_model("resnet20", 1, 10, False, True)
    sites = prunable_sites(model)
    layers = deployed_layers(model, sites, SHAPE)
    table = load_table(next(ROOT.glob("lapp_edge/resources/latency/layer-table-x86-ort-fp32-resnet20-*.json")))
    latency = LatencyCost(layers, [s.channels for s in sites], table.batch(32), "x86-ort-fp32")
    return build_flops_cost(model, sites, SHAPE), {"x86-ort-fp32": latency}


def test_positions_enumerate_every_allocation_once_in_order() -> None:
    options = [np.array([8, 16]), np.array([8, 16, 24]), np.array([4])]
    chunks = list(_positions(options, limit=100, seed=0))
    got = [tuple(options[s][p[s]] for s in range(3)) for chunk in chunks for p in chunk]
    assert got == list(itertools.product(*options))
    assert allocation_count(options) == 6


def test_positions_sample_when_there_are_more_than_the_limit() -> None:
    options = [np.arange(10)] * 6                        # a million allocations
    first = np.concatenate(list(_positions(options, limit=1000, seed=3)))
    again = np.concatenate(list(_positions(options, limit=1000, seed=3)))
    assert first.shape == (1000, 6) and (first == again).all()
    assert first.min() == 0 and first.max() == 9


def test_scan_ranks_every_allocation_in_the_band() -> None:
    flops, latency = costs()
    result = scan_frontier(flops, latency, 0.5, 0.05, MULTIPLE)
    options = [allowed_widths(c, MULTIPLE, 1) for c in flops.site_channels]
    grid = np.array(list(itertools.product(*options)), dtype=np.float64)
    ratios = flops.ratio(grid)
    inside = grid[(ratios >= 0.45) & (ratios <= 0.55)]
    assert result.exhaustive and result.total == result.evaluated == len(grid)
    assert result.in_band == len(inside) > 3
    efficiency = flops.ratio(inside) / latency["x86-ort-fp32"].ratio(inside)
    best, median, worst = (result.picks[k] for k in ("best", "median", "worst"))
    assert best.predicted_efficiency("x86-ort-fp32") == pytest.approx(efficiency.max())
    assert worst.predicted_efficiency("x86-ort-fp32") == pytest.approx(efficiency.min())
    assert worst.predicted_efficiency("x86-ort-fp32") <= median.predicted_efficiency("x86-ort-fp32") <= best.predicted_efficiency("x86-ort-fp32")
    for pick in result.picks.values():
        assert 0.45 <= pick.flops_ratio <= 0.55
        assert all(w % MULTIPLE == 0 for w in pick.widths)
    q = result.quantiles["x86-ort-fp32"]
    assert q == sorted(q) and q[-1] == pytest.approx(efficiency.max())


def test_scan_refuses_an_empty_band_no_target_and_a_bad_band() -> None:
    flops, latency = costs()
    with pytest.raises(ValueError, match="no allocation"):
        scan_frontier(flops, latency, 0.01, 0.001, MULTIPLE)     # below the smallest network
    with pytest.raises(ValueError, match="no target"):
        scan_frontier(flops, {}, 0.5, 0.05, MULTIPLE)
    with pytest.raises(ValueError, match="band"):
        scan_frontier(flops, latency, 0.5, 0.0, MULTIPLE)


@pytest.mark.parametrize("argv, message", [
    (["--input", "1x28"], "must be CxHxW"),
    (["--targets", ","], "names no target"),
    (["--runs", "no-such-run"], "no architecture.json"),
])
def test_benchmark_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import efficiency_frontier
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert efficiency_frontier.main(argv + ["--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert not (tmp_path / "out").exists()


def test_benchmark_predicts_a_run_on_the_scans_sites_only() -> None:
    """A run's widths get the table's prediction where its sites are the coupled groups the scan ranks;
    an inner-conv run (`--no-groups`) has other sites, which the table does not describe: none."""
    from lapp_edge.models.spec import ArchitectureSpec

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import efficiency_frontier
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    flops, latency = costs()
    model = build_model("resnet20", 1, 10, False, True)
    dense = {s.name: s.channels for s in prunable_sites(model)}
    half = {name: max(8, width // 2) for name, width in dense.items()}
    spec = ArchitectureSpec("resnet20", 1, 10, 28, False, half, dense, coupled=True)
    predicted = efficiency_frontier.table_prediction(spec, dense, latency)
    counts = np.array([float(w) for w in half.values()])
    assert predicted == {"x86-ort-fp32": pytest.approx(float(latency["x86-ort-fp32"].ratio(counts)))}
    assert 0.2 < predicted["x86-ort-fp32"] < 0.6
    inner = {s.name: s.channels for s in prunable_sites(build_model("resnet20", 1, 10, False, False))}
    assert efficiency_frontier.table_prediction(ArchitectureSpec("resnet20", 1, 10, 28, False, inner, inner), dense, latency) == {}


def test_benchmark_names_runs_that_share_a_folder_name_by_their_parent(tmp_path: Path) -> None:
    import json

    from lapp_edge.models.spec import ArchitectureSpec

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import efficiency_frontier
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    dense = {s.name: s.channels for s in prunable_sites(build_model("resnet20", 1, 10, False, True))}
    for folder in ("seed0/lapp", "seed1/lapp", "seed1/other"):
        (tmp_path / folder).mkdir(parents=True)
        spec = ArchitectureSpec("resnet20", 1, 10, 28, False, dense, dense, coupled=True)
        (tmp_path / folder / "architecture.json").write_text(json.dumps(spec.to_dict()))
    runs = efficiency_frontier.run_networks([str(tmp_path / f) for f in ("seed0/lapp", "seed1/lapp", "seed1/other")])
    assert [name for name, _ in runs] == ["seed0/lapp", "seed1/lapp", "other"]


def test_ratio_over_compiles_compiles_afresh_each_time(tmp_path: Path) -> None:
    """A model against itself on ONNX Runtime over 2 compiles: one ratio per compile, each near 1,
    each compile in its own work folder; fewer than one compile is refused."""
    from lapp_edge.deploy.compile import OnnxModel, ratio_over_compiles
    from lapp_edge.deploy.measure import RatioProtocol
    from lapp_edge.deploy.targets import load_target
    from tests.tiny_package import tiny_onnx_bytes

    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_onnx_bytes())
    import onnx

    graph_input = onnx.load(str(path)).graph.input[0]
    shape = tuple(d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:])
    model = OnnxModel(path, graph_input.name, shape)  # type: ignore[arg-type]
    data = np.zeros((1, *shape), dtype=np.float32)
    fast = RatioProtocol(blocks=6, calls_batch1=200, warmup=50, retries=0)   # ~0.1 ms calls: enough of them per block
    ratio = ratio_over_compiles(model, model, load_target("x86-ort-fp32"), 1, tmp_path / "work", data, 2, fast)
    assert len(ratio.per_compile) == 2 and all(0.5 < r < 2.0 for r in ratio.per_compile)
    assert ratio.median == pytest.approx(float(np.median(ratio.per_compile)))
    assert sorted(p.name for p in (tmp_path / "work").iterdir() if p.is_dir()) == [
        "compile-0-a", "compile-0-b", "compile-1-a", "compile-1-b"]
    with pytest.raises(ValueError, match="at least 1"):
        ratio_over_compiles(model, model, load_target("x86-ort-fp32"), 1, tmp_path / "work", data, 0, fast)


def test_scan_with_block_removal_ranks_allocations_that_remove_branches() -> None:
    # per-site minimums: 0 lets a block's inner site (its residual branch) go, as train --block-removal does
    flops, latency = costs()
    sites = prunable_sites(build_model("resnet20", 1, 10, False, True))
    minimums = [0 if site.removal is not None else MULTIPLE for site in sites]
    with_removal = scan_frontier(flops, latency, 0.4, 0.02, MULTIPLE, minimums)
    options = [allowed_widths(c, MULTIPLE, low) for c, low in zip(flops.site_channels, minimums)]
    assert with_removal.total == allocation_count(options) > 4096
    best = with_removal.picks["best"]
    removable = [i for i, low in enumerate(minimums) if low == 0]
    assert any(best.widths[i] == 0 for i in removable)
    assert all(best.widths[i] > 0 for i in range(len(sites)) if i not in removable)
    # the table prices a removed branch at 0 ms: the best allocation at 0.4 with removal is more efficient than the
    # best without at 0.5 (at multiple 16 ResNet-20's narrowest network keeps 0.46 of the FLOPs: 0.4 needs removal)
    without = scan_frontier(flops, latency, 0.5, 0.05, MULTIPLE).picks["best"]
    assert best.predicted_efficiency("x86-ort-fp32") > without.predicted_efficiency("x86-ort-fp32")


def test_benchmark_measures_int8_targets_quantized_as_bench_does(tmp_path: Path) -> None:
    """Bug: every int8 target failed in measure_all (no calibration set passed: "states no mean/std").
    Each int8 profile is measured here, quantized with its own calibration set, on one network."""
    from lapp_edge.deploy.backends import runtime_available
    from lapp_edge.deploy.measure import RatioProtocol
    from lapp_edge.resources import profile_names

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import efficiency_frontier
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    model = build_model("resnet20", 1, 10, False, True)
    dense = {s.name: s.channels for s in prunable_sites(model)}
    half = {name: max(8, width // 2) for name, width in dense.items()}
    int8 = [name for name in profile_names() if (profile := load_target(name)).precision == "int8"
            and profile.backend in ("onnxruntime-cpu", "openvino-cpu") and runtime_available(profile.backend)]
    assert "x86-ort-int8" in int8
    network = efficiency_frontier.Network("half", "test", half, dense, True, 0.0)
    efficiency_frontier.measure_all([network], dense, "resnet20", (1, 28, 28), int8, 1, tmp_path,
                                    RatioProtocol(blocks=3, calls_batch1=5, warmup=2, retries=0), compiles=1)
    assert set(network.measured) == set(int8) and 0.2 < network.macs_ratio < 0.4
    assert all(0.1 < ratio < 1.2 for ratio in network.measured.values())
