"""The latency model: fit arithmetic on synthetic data, the stored fit and its runtime-free reader,
the configuration draw, `lapp-edge calibrate-latency` end to end (ORT fp32, 4 configurations) and
its bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lapp_edge.resources import TARGETS_DIR
from lapp_edge import cli
from lapp_edge.deploy.measure import machine_key
from lapp_edge.errors import UserError
from lapp_edge.costs.latency_fit import (
    choose_fit, find_fit_file, fit_file_name, fit_from_dict, fit_linear, held_out_errors, load_fit, predict_linear, r_squared,
)

ROOT = Path(__file__).resolve().parents[2]
ORT_FP32 = TARGETS_DIR / "x86-ort-fp32.yaml"
RESNET20_DENSE = {f"layer{s}.{b}.conv1": w for s, w in ((1, 16), (2, 32), (3, 64)) for b in range(3)}


# --- fit arithmetic ----------------------------------------------------------------------

def test_linear_fit_recovers_exact_coefficients_with_r2_one_and_no_held_out_error() -> None:
    x = np.linspace(0.1, 1.0, 24)
    y = 0.27 + 0.74 * x
    coefficients = fit_linear(x, y)
    assert coefficients == pytest.approx([0.27, 0.74], abs=1e-12)
    assert r_squared(y, predict_linear(coefficients, x)) == pytest.approx(1.0)
    held = held_out_errors(x, y, splits=100)
    assert held.median_abs_pct < 1e-9 and held.max_abs_pct < 1e-9
    assert (held.fit_points, held.held_out_points) == (16, 8)
    assert held.mean_predictor_median_abs_pct > 10           # the no-model baseline is far off on a line with slope


def test_two_feature_fit_recovers_coefficients() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 1.0, (30, 2))
    y = 0.1 + 0.6 * x[:, 0] + 0.3 * x[:, 1]
    assert fit_linear(x, y) == pytest.approx([0.1, 0.6, 0.3], abs=1e-12)


def test_r_squared_and_held_out_error_follow_the_noise_level() -> None:
    rng = np.random.default_rng(2)
    x = rng.uniform(0.1, 1.0, 24)
    y = (0.3 + 0.7 * x) * (1 + rng.normal(0, 0.05, 24))         # 5% multiplicative noise
    coefficients = fit_linear(x, y)
    assert 0.8 < r_squared(y, predict_linear(coefficients, x)) < 1.0
    held = held_out_errors(x, y)
    assert 1.0 < held.median_abs_pct < 8.0                       # about the noise's median |error| (~3.4%)
    assert held.max_abs_pct >= held.median_abs_pct
    assert r_squared(y, np.full_like(y, y.mean())) == pytest.approx(0.0)


def test_held_out_is_deterministic_for_a_seed_and_refuses_too_few_points() -> None:
    x = np.linspace(0.1, 1.0, 12)
    y = 0.3 + 0.7 * x + 0.01 * np.sin(20 * x)
    assert held_out_errors(x, y, seed=3) == held_out_errors(x, y, seed=3)
    with pytest.raises(UserError):
        held_out_errors(x[:2], y[:2])


def _rows(count: int, seed: int) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    return [{"macs_ratio": m, "params_ratio": p, "activations_ratio": a}
            for m, p, a in rng.uniform(0.1, 1.0, (count, 3))]


def test_memory_term_is_kept_only_where_it_measurably_helps() -> None:
    rows = _rows(24, 4)
    macs = np.array([r["macs_ratio"] for r in rows])
    activations = np.array([r["activations_ratio"] for r in rows])
    chosen, candidates = choose_fit(rows, 0.2 + 0.5 * macs + 0.3 * activations)
    assert chosen.features == ["macs_ratio", "activations_ratio"] and len(candidates) == 3
    assert chosen.coefficients == pytest.approx([0.2, 0.5, 0.3], abs=1e-9)
    noise = 1 + 0.01 * np.random.default_rng(5).standard_normal(24)
    chosen, _ = choose_fit(rows, (0.3 + 0.7 * macs) * noise)       # memory terms explain only noise
    assert chosen.features == ["macs_ratio"]
    chosen, candidates = choose_fit(rows[:4], 0.3 + 0.7 * macs[:4])  # too few points for a second term
    assert chosen.features == ["macs_ratio"] and len(candidates) == 1


def test_two_extra_terms_are_tried_only_when_asked_and_must_beat_the_best_single_term() -> None:
    """A layer table's fit may take two extra terms (`max_extra_terms=2`, profile-layers): chosen where the
    latency holds both, not where one explains it; calibrate-latency's FLOPs fit keeps at most one."""
    rows = _rows(24, 4)
    macs, params, activations = (np.array([r[k] for r in rows]) for k in ("macs_ratio", "params_ratio", "activations_ratio"))
    both = 0.1 + 0.5 * macs + 0.2 * params + 0.3 * activations
    chosen, candidates = choose_fit(rows, both)
    assert len(candidates) == 3 and len(chosen.features) == 2                       # one extra term at most by default
    chosen, candidates = choose_fit(rows, both, max_extra_terms=2)
    assert len(candidates) == 4 and candidates[-1].features == ["macs_ratio", "params_ratio", "activations_ratio"]
    assert chosen.features == ["macs_ratio", "params_ratio", "activations_ratio"]
    assert chosen.coefficients == pytest.approx([0.1, 0.5, 0.2, 0.3], abs=1e-9)
    one = (0.2 + 0.5 * macs + 0.3 * activations) * (1 + 0.01 * np.random.default_rng(5).standard_normal(24))
    chosen, _ = choose_fit(rows, one, max_extra_terms=2)                           # the pair explains only noise beyond it
    assert chosen.features == ["macs_ratio", "activations_ratio"]
    chosen, candidates = choose_fit(rows[:8], both[:8], max_extra_terms=2)          # too few points for four coefficients
    assert len(candidates) == 3


def test_a_term_with_a_negative_slope_is_never_chosen() -> None:
    """A second term that lowers the held-out error a lot but enters with a negative slope (here the
    latency truly falls as activations grow, which no cost does) is refused: trained against, the fit
    would reward a larger cost. The line in the base term is kept."""
    rows = _rows(24, 4)
    macs = np.array([r["macs_ratio"] for r in rows])
    activations = np.array([r["activations_ratio"] for r in rows])
    chosen, candidates = choose_fit(rows, 0.6 + 0.5 * macs - 0.3 * activations, extras=("activations_ratio",))
    negative = candidates[1]
    assert negative.features == ["macs_ratio", "activations_ratio"] and negative.coefficients[2] < 0
    assert negative.held_out.median_abs_pct < 0.5 * candidates[0].held_out.median_abs_pct   # better held out, still refused
    assert chosen.features == ["macs_ratio"]


# --- configurations ----------------------------------------------------------------------------

def test_draw_configs_dense_uniform_then_seeded_random_multiples_of_8() -> None:
    from lapp_edge.latency.calibrate import draw_configs

    configs = draw_configs(RESNET20_DENSE, 24, seed=0)
    assert len(configs) == 24 and len({tuple(c.widths.values()) for c in configs}) == 24
    assert configs[0].name == "dense" and configs[0].widths == RESNET20_DENSE
    assert configs[2].widths["layer3.0.conv1"] == 32 and configs[2].widths["layer1.0.conv1"] == 8   # uniform x0.5
    for config in configs:
        for site, width in config.widths.items():
            assert width % 8 == 0 and 8 <= width <= RESNET20_DENSE[site]
    assert [c.widths for c in draw_configs(RESNET20_DENSE, 24, seed=0)] == [c.widths for c in configs]
    assert [c.widths for c in draw_configs(RESNET20_DENSE, 24, seed=1)] != [c.widths for c in configs]
    with pytest.raises(UserError):
        draw_configs(RESNET20_DENSE, 2, seed=0)


def test_draw_configs_with_removable_branches_removes_only_those_and_keeps_the_widths_drawn() -> None:
    """profile-layers --block-removal: about half the random networks remove residual branches (only
    removable sites go to 0), from their own generator, so every other width is what the plain draw gave."""
    from lapp_edge.latency.calibrate import draw_configs

    removable = [site for site in RESNET20_DENSE if site.endswith("conv1")]
    plain = draw_configs(RESNET20_DENSE, 24, seed=0)
    with_removal = draw_configs(RESNET20_DENSE, 24, seed=0, removable=removable)
    removing = [c for c in with_removal if 0 in c.widths.values()]
    assert 6 <= len(removing) <= 14
    assert any(sum(w == 0 for w in c.widths.values()) >= 4 for c in removing)       # plans that remove half the branches
    assert any(sum(w == 0 for w in c.widths.values()) <= 2 for c in removing)       # and plans that remove one or two
    for config in with_removal:
        assert all(site in removable for site, width in config.widths.items() if width == 0)
    assert with_removal[4].widths == plain[4].widths                                # the first random one removes nothing
    assert all(w in (0, plain[5].widths[site]) for site, w in with_removal[5].widths.items())   # the second: same widths, some removed
    assert [c.widths for c in draw_configs(RESNET20_DENSE, 24, seed=0, removable=removable)] == [c.widths for c in with_removal]
    with pytest.raises(ValueError, match="not sites"):
        draw_configs(RESNET20_DENSE, 24, seed=0, removable=["fc"])


# --- the stored fit and its reader ---------------------------------------------------------------

def _stored_fit(path: Path) -> Path:
    """A fit written the way calibrate-latency writes one (through LatencyFit/BatchFit), synthetic numbers."""
    from lapp_edge.costs.latency_fit import FIT_FORMAT, BatchFit, LatencyFit, write_fit_json

    rows = _rows(12, 6)
    y = np.array([0.25 + 0.75 * r["macs_ratio"] for r in rows])
    chosen, candidates = choose_fit(rows, y)
    fit = LatencyFit(
        format=FIT_FORMAT, target="x86-test", model="resnet20", backend="onnxruntime-cpu", precision_requested="fp32",
        precision_used="fp32", threads=1, input_shape=[1, 28, 28], dense_widths=RESNET20_DENSE,
        dense={"macs": 31.0e6, "params": 270e3, "activations": 60e3}, batches={1: BatchFit(1, chosen, candidates, 0.6)},
    )
    path.write_bytes(write_fit_json(fit))
    return path


def test_stored_fit_round_trips_and_predicts(tmp_path: Path) -> None:
    fit = load_fit(_stored_fit(tmp_path / "fit.json"))
    assert fit.batches[1].chosen.features == ["macs_ratio"]
    assert fit.predict_ratio(1, fit.ratios_of(macs=15.5e6, params=100e3, activations=30e3)) == pytest.approx(0.25 + 0.75 * 0.5)
    with pytest.raises(UserError, match="no batch 32"):
        fit.predict_ratio(32, {"macs_ratio": 0.5})
    with pytest.raises(UserError, match="needs macs_ratio"):
        fit.predict_ratio(1, {})


def test_fit_lookup_prefers_this_machines_fit_then_the_unkeyed_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # one fit per machine: the same profile runs other kernels on an AVX2, an AVX-512 or an AMX CPU
    monkeypatch.chdir(tmp_path)
    here, there = "Test CPU; avx2", "Test CPU; avx512f"
    assert fit_file_name("x86-test", "resnet20", here) == "latency-fit-x86-test-resnet20-test-cpu-avx2.json"
    assert find_fit_file("x86-test", "resnet20", here) is None
    data = tmp_path / "latency-data"
    data.mkdir()
    unkeyed = _stored_fit(data / fit_file_name("x86-test", "resnet20"))
    assert find_fit_file("x86-test", "resnet20", here) == unkeyed             # the fits shipped before the key
    mine = _stored_fit(data / fit_file_name("x86-test", "resnet20", here))
    _stored_fit(data / fit_file_name("x86-test", "resnet20", there))
    assert find_fit_file("x86-test", "resnet20", here) == mine
    assert find_fit_file("x86-test", "resnet20", "Other CPU; sse4") == unkeyed


def test_bad_fit_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_fit(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        load_fit(tmp_path / "broken.json")
    with pytest.raises(UserError, match="not a latency fit"):
        fit_from_dict({"format": "other"})
    payload = json.loads(_stored_fit(tmp_path / "fit.json").read_text())
    del payload["batches"]["1"]["chosen"]
    with pytest.raises(UserError, match="malformed"):
        fit_from_dict(payload)


def test_fit_reader_imports_no_runtime_and_no_torch(tmp_path: Path) -> None:
    path = _stored_fit(tmp_path / "fit.json")
    code = (
        "import sys\n"
        "from lapp_edge.costs.latency_fit import load_fit\n"
        f"fit = load_fit({str(path)!r})\n"
        "print(round(fit.predict_ratio(1, {'macs_ratio': 0.5}), 6))\n"
        "print(sorted(m for m in ('onnxruntime', 'openvino', 'nncf', 'onnx', 'tensorrt', 'torch', 'lapp_edge.deploy.backends') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [str(round(0.25 + 0.75 * 0.5, 6)), "[]"]


# --- calibrate-latency: bad input and a tiny real run ---------------------------------------------

@pytest.mark.parametrize(("extra", "message"), [
    (["--target", "no-such-target"], "does not exist"),
    (["--target", str(ORT_FP32), "--configs", "2"], "--configs must be at least 3"),
    (["--target", str(ORT_FP32), "--model", "resnet7"], "unknown model 'resnet7'"),
    (["--target", str(ORT_FP32), "--max-other-cpu", "0"], "--max-other-cpu"),
])
def test_calibrate_latency_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    code = cli.main(["calibrate-latency", *extra, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_calibrate_latency_end_to_end_on_ort_fp32_and_bench_prediction(tmp_path: Path) -> None:
    from lapp_edge.deploy.bench import compare_with_fit
    from lapp_edge.deploy.compile import OnnxModel, compile_runner
    from lapp_edge.deploy.measure import RatioProtocol
    from lapp_edge.deploy.package import ModelPackage
    from lapp_edge.deploy.targets import load_target
    from lapp_edge.latency.calibrate import build_fused, calibrate, export_config

    result = calibrate(ORT_FP32, "resnet20", configs=4, seed=0, out=tmp_path / "latency", batches=[1],
                       options=RatioProtocol(blocks=5, calls_batch1=15, warmup=5, retries=0), progress=False)
    # keyed by the machine it was measured on: the same profile runs other kernels on another CPU
    assert result.json_path == tmp_path / "latency" / fit_file_name("x86-ort-fp32", "resnet20", machine_key())
    assert result.json_path.name.startswith("latency-fit-x86-ort-fp32-resnet20-") and load_fit(result.json_path).load["machine"] == machine_key()
    assert result.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fit = load_fit(result.json_path)
    assert fit.precision_used == "fp32" and fit.threads == 1 and fit.backend == "onnxruntime-cpu"
    assert (tmp_path / "latency" / fit.dense_reference).is_file()          # what bench measures packages against
    assert [m["name"] for m in fit.measurements] == ["dense", "uniform-x0.25", "uniform-x0.5", "uniform-x0.75"]
    ratios = {m["name"]: m["latency_ratio"]["1"] for m in fit.measurements}
    assert 0.8 < ratios["dense"] < 1.25                      # the dense model against its own second session
    assert ratios["uniform-x0.25"] < ratios["dense"]         # a quarter-width network is faster, whatever the load
    assert fit.batches[1].chosen.features == ["macs_ratio"] and 0 < fit.batches[1].chosen.coefficients[1]
    assert {"torch", "onnxruntime"} <= set(fit.versions) and fit.created and fit.load["cpu_count"] >= 1

    # The bench's figure: a "package" of the x0.5 network, predicted from FLOPs vs measured against dense.
    profile = load_target(ORT_FP32)
    half = fit.measurements[2]
    package = ModelPackage(tmp_path, {"input": {"shape": [1, 28, 28]}, "flops": {"ratio": half["macs_ratio"]}})
    onnx_path = export_config(build_fused("resnet20", half["widths"], fit.dense_widths, (1, 28, 28)), (1, 28, 28), tmp_path / "half.onnx")
    with compile_runner(OnnxModel(onnx_path, "input", (1, 28, 28)), profile, 1, tmp_path) as runner:
        [comparison] = compare_with_fit(fit, str(result.json_path), tmp_path / "latency" / fit.dense_reference, package,
                                        profile, {1: runner}, {1: 0.5}, tmp_path, None, "", compiles=1)  # the package is a stand-in
    assert comparison.features["macs_ratio"] == pytest.approx(half["macs_ratio"])
    assert comparison.predicted_ratio == pytest.approx(fit.predict_ratio(1, comparison.features))
    assert comparison.predicted_ms == pytest.approx(comparison.predicted_ratio * comparison.dense_median_ms)
    assert 0.2 < comparison.measured_ratio < 1.2


def test_draw_configs_draws_every_network_asked_for_a_model_with_many_sites() -> None:
    """MobileNetV2's 25 coupled groups: the count of width combinations overflowed numpy's int64 and
    profile-layers measured 4 whole networks instead of 24. A product of any size draws them all."""
    from lapp_edge.latency.calibrate import draw_configs

    many = {f"site{i}": 960 for i in range(25)}             # 120 widths each: 120**25 combinations
    configs = draw_configs(many, 24, seed=0, multiple=8)
    assert len(configs) == 24 and len({tuple(c.widths.values()) for c in configs}) == 24
