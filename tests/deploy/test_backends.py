"""CPU backends on a small trained model: fp32 agreement with PyTorch, int8 accuracy on real
Fashion-MNIST for both runtimes, the missing-runtime path, bad target profiles, and a
latency-ratio regression check against the profiles' baselines (marker `latency`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from lapp_edge.resources import TARGETS_DIR
from lapp_edge.deploy.backends import BackendUnavailable, LoadRequest, Runner, get_backend, run_batched
from lapp_edge.deploy.bench import load_test_set
from lapp_edge.deploy.calibration_set import CalibrationSet, draw_calibration, load_definition
from lapp_edge.cli import main
from lapp_edge.data.torch_data import Dataset
from lapp_edge.deploy.package import ModelPackage
from lapp_edge.models.spec import load_slim_model
from lapp_edge.deploy.targets import load_target
from lapp_edge.deploy.tolerance import RUNTIME_FP32, compare_logits

from tests.deploy.conftest import changed_profile, int8_weight_range

ROOT = Path(__file__).resolve().parents[2]
TARGETS = TARGETS_DIR
CALIBRATION = "fashion-mnist-train-512"
TEST_IMAGES = 5000          # half the test split: 0.5 points = 25 images


@pytest.fixture(scope="module")
def test_images(package: ModelPackage) -> tuple[np.ndarray, np.ndarray]:
    test = load_test_set(package, None)
    return test.images[:TEST_IMAGES], test.labels[:TEST_IMAGES]


@pytest.fixture(scope="module")
def calibration(package: ModelPackage, fmnist: Dataset) -> CalibrationSet:
    mean, std = package.manifest["input"]["mean"], package.manifest["input"]["std"]
    return draw_calibration(load_definition(CALIBRATION), mean, std, dataset=fmnist)


def load(package: ModelPackage, backend: str, precision: str, work: Path, batch: int = 32, threads: int = 2,
         calibration: CalibrationSet | None = None, route: str = "") -> Runner:
    request = LoadRequest(package.onnx_path, package.input_name, package.input_shape, precision, threads, batch, work,
                          None if calibration is None else calibration.images, route)
    return get_backend(backend).load(request)


def test_calibration_set_is_fixed_and_seeded(package: ModelPackage, fmnist: Dataset, calibration: CalibrationSet) -> None:
    definition = load_definition(CALIBRATION)
    again = draw_calibration(definition, package.manifest["input"]["mean"], package.manifest["input"]["std"], dataset=fmnist)
    assert calibration.images.shape == (definition.count, 1, 28, 28) == (512, 1, 28, 28)
    assert len(set(calibration.indices.tolist())) == 512
    assert again.fingerprint == calibration.fingerprint
    assert np.array_equal(again.images, calibration.images)


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "openvino-cpu"])
def test_fp32_matches_pytorch(package: ModelPackage, trained_run: Path, test_images: tuple[np.ndarray, np.ndarray],
                              backend: str, tmp_path: Path) -> None:
    model, _ = load_slim_model(trained_run)
    images = test_images[0][:500]
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    runner = load(package, backend, "fp32", tmp_path)
    logits = run_batched(runner, images, 32)          # 500 = 15 x 32 + 20: the last batch is padded on OpenVINO
    assert runner.info.precision_used == "fp32"
    check = compare_logits(logits, expected, RUNTIME_FP32)     # |diff| <= 1e-4 + 1e-4 * max|logit| per image
    assert check.passed and check.max_rel_diff <= 1e-5, check
    assert np.array_equal(logits.argmax(1), expected.argmax(1))


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin offers bf16 here (AVX512-BF16 or AMX; not on AVX2-only CPUs)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_openvino_bf16_reports_the_precision_it_really_runs(package: ModelPackage, test_images: tuple[np.ndarray, np.ndarray],
                                                            tmp_path: Path) -> None:
    """bf16 kernels where the CPU has them; where it has not, OpenVINO falls back to f32 and the
    runner says fp32 (the bench then reports the fallback instead of claiming bf16)."""
    images = test_images[0][:1000]
    reference = run_batched(load(package, "onnxruntime-cpu", "fp32", tmp_path), images, 32)
    runner = load(package, "openvino-cpu", "bf16", tmp_path)
    if cpu_has_bf16():
        assert runner.info.details["compiled_properties"]["INFERENCE_PRECISION_HINT"] == "bf16"
        assert runner.info.precision_used == "bf16"
        assert all("bf16" in kernel for kernel in runner.info.details["conv_kernels"])
    else:
        assert runner.info.details["compiled_properties"]["INFERENCE_PRECISION_HINT"] == "f32"
        assert runner.info.precision_used == "fp32"
    agreement = (run_batched(runner, images, 32).argmax(1) == reference.argmax(1)).mean()
    assert agreement >= 0.98


# Every CPU kind: without VNNI the U8S8 kernels add u8 x s8 pairs in 16 bits and saturate with full 8-bit weights
# (-3.2 points of top-1 on the AVX2 EPYC, docs/RESULTS.md), so the weights are quantized to 7 bits there.
@pytest.mark.parametrize(("flags", "seven_bit"), [
    ({"avx2"}, True), (set(), True), ({"avx2", "avx512f"}, True), ({"avx2", "avx512f", "avx512_vnni"}, False),
    ({"avx2", "avx_vnni"}, False), ({"avx2", "avx512f", "avx512_vnni", "amx_int8"}, False)])
def test_ort_int8_weights_fit_what_the_cpu_accumulates(package: ModelPackage, calibration: CalibrationSet, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, flags: set[str], seven_bit: bool) -> None:
    monkeypatch.setattr("lapp_edge.deploy.measure.cpu_flags", lambda: set(flags))
    runner = load(package, "onnxruntime-cpu", "int8", tmp_path, calibration=calibration)
    assert runner.info.details["int8_weights_7bit"] is seven_bit
    assert (int8_weight_range(onnx.load(runner.info.model_path)) <= 64) is seven_bit      # ORT's 7-bit range is [-64, 64]


@pytest.mark.parametrize(("backend", "route"), [("onnxruntime-cpu", ""), ("openvino-cpu", "nncf"), ("openvino-cpu", "ort-qdq")])
def test_int8_keeps_accuracy(package: ModelPackage, test_images: tuple[np.ndarray, np.ndarray], calibration: CalibrationSet,
                             backend: str, route: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.getbasetemp() / "int8-work"         # shared: the Q/DQ file is made once for ORT and OpenVINO
    images, labels = test_images
    fp32 = run_batched(load(package, "onnxruntime-cpu", "fp32", work), images, 32)
    runner = load(package, backend, "int8", work, calibration=calibration, route=route)
    int8 = run_batched(runner, images, 32)
    assert runner.info.precision_used == "int8"
    fp32_top1, int8_top1 = (fp32.argmax(1) == labels).mean(), (int8.argmax(1) == labels).mean()
    assert fp32_top1 > 0.6, "the fixture model should have learned something"
    assert fp32_top1 - int8_top1 <= 0.005
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.97


def test_missing_runtime_is_one_line_and_other_targets_run(
    package: ModelPackage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Simulated: sys.modules['openvino'] = None makes `import openvino` raise ImportError.
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendUnavailable, match="openvino-cpu is unavailable"):
        load(package, "openvino-cpu", "fp32", tmp_path)
    quick = {"warmup_iterations": 2, "min_iterations": 5, "min_seconds": 0.0}
    profiles = []
    for name in ("x86-ort-fp32", "x86-openvino-f32"):
        payload = yaml.safe_load((TARGETS / f"{name}.yaml").read_text())
        payload.update(batch_sizes=[1], latency=quick)
        profiles.append(tmp_path / f"{name}.yaml")
        profiles[-1].write_text(yaml.safe_dump(payload))
    args = ["bench", str(package.directory), "--out", str(tmp_path / "bench.json"), "--compiles", "1", "--test-images", "64"]
    for profile in profiles:
        args += ["--target", str(profile)]
    assert main(args) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("lapp-edge: error")]
    assert len(errors) == 1 and "x86-openvino-f32" in errors[0] and "cannot import openvino" in errors[0]
    assert "Traceback" not in captured.err
    report = yaml.safe_load((tmp_path / "bench.json").read_text())
    ort, ov = report["targets"]
    assert ort["status"] == "ok" and ort["variants"]["fp32"]["accuracy"]["agreement"] == 1.0
    assert ov["status"] == "unavailable"
    assert report["reference"]["images"] == 64 and ort["variants"]["fp32"]["accuracy"]["images"] == 64   # --test-images


@pytest.mark.parametrize("value", ["0", "-3"])
def test_test_images_below_one_is_one_line_before_any_work(value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", str(tmp_path / "no-package"), "--target", "x86-ort-fp32", "--test-images", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--test-images must be at least 1" in err[0] and not out.exists()


def _profile(tmp_path: Path, **changes: object) -> Path:
    return changed_profile("x86-ort-int8", tmp_path, **changes)


BAD_PROFILES = [
    ({"backend": "tensorrt-gpu"}, "unknown backend 'tensorrt-gpu'"),
    ({"precision": "fp16"}, "has no precision 'fp16'"),
    ({"batch_sizes": [1, 0]}, "batch size must be a positive integer"),
    ({"batch_sizes": [-4]}, "batch size must be a positive integer"),
    ({"threads": 0}, "threads must be a positive integer"),
    ({"precision": None}, "missing field(s): precision"),
    ({"calibration": None}, "needs a calibration set"),
    ({"input_size": [28, 28]}, "input_size must be [C, H, W]"),
    ({"int8_routes": ["nncf"]}, "int8_routes must be a list drawn from"),
    ({"colour": "blue"}, "unknown field(s): colour"),
    ({"threads": None, "thread": 1}, "missing field(s): threads; unknown field(s): thread"),     # a typo names both
]


@pytest.mark.parametrize(("changes", "message"), BAD_PROFILES)
def test_bad_profile_is_one_line_exit_2(changes: dict[str, object], message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    profile = _profile(tmp_path, **changes)
    assert main(["bench", str(tmp_path / "no-package"), "--target", str(profile)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lapp-edge: error:") and message in err


def test_unreadable_profiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    for path, message in ((tmp_path / "broken.yaml", "not valid YAML"), (tmp_path / "list.yaml", "must be a YAML mapping"),
                          (tmp_path / "absent.yaml", "does not exist")):
        assert main(["bench", "models/x", "--target", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


def test_shipped_profiles_are_valid() -> None:
    names = sorted(p.stem for p in TARGETS.glob("x86-*.yaml"))
    assert names == ["x86-openvino-bf16", "x86-openvino-f32", "x86-openvino-int8", "x86-ort-fp32", "x86-ort-int8"]
    for name in names:
        profile = load_target(TARGETS / f"{name}.yaml")
        assert profile.name == name and profile.batch_sizes == (1, 32) and profile.input_shape == (1, 28, 28)
        assert profile.baselines is not None and profile.baselines.reference_target == "x86-ort-fp32"
        assert profile.baselines.machines, f"{name} records no machine's baseline"


def test_openvino_conversion_sends_no_telemetry(tmp_path: Path) -> None:
    """ov.convert_model reports usage from a forked process unless declined: our backend declines it for
    the process (no fork, no network attempt), without writing a consent file."""
    import multiprocessing

    pytest.importorskip("openvino")
    from lapp_edge.deploy.backends.openvino_cpu import _ov
    from lapp_edge.resources import LATENCY_DIR

    ov = _ov()
    started = []
    original = multiprocessing.Process.start
    multiprocessing.Process.start = lambda self: started.append(self)  # type: ignore[method-assign]
    try:
        ov.convert_model(str(LATENCY_DIR / "dense-resnet20-1x28x28.onnx"))
    finally:
        multiprocessing.Process.start = original  # type: ignore[method-assign]
    assert started == []


def test_a_cuda_backend_is_not_runnable_without_a_visible_gpu(monkeypatch) -> None:
    """`targets: available` (make demo) and `lapp-edge targets` must not pick torch-cuda on a CPU machine
    just because torch is installed: the backend declares it needs a GPU, checked without importing torch."""
    import lapp_edge.deploy.backends as backends

    monkeypatch.setattr(backends, "nvidia_gpu_visible", lambda: False)
    assert backends.runtime_available("torch-cuda") == (False, "no CUDA GPU visible")
    assert backends.runtime_available("onnxruntime-cpu") == (True, "")
    monkeypatch.setattr(backends, "nvidia_gpu_visible", lambda: True)
    assert backends.runtime_available("torch-cuda") == (True, "")


def test_openvino_runner_reuses_one_bound_buffer_and_returns_copies(package: ModelPackage,
                                                                     test_images: tuple[np.ndarray, np.ndarray],
                                                                     tmp_path: Path) -> None:
    """The OpenVINO runner binds its input once (`StaticBatchRequest`) instead of wrapping every batch: the logits
    are those of OpenVINO's own `infer([batch])`, a short batch is zero-padded (its rows equal the full batch's),
    each result is a copy that the next inference leaves alone, and an oversized batch is refused."""
    runner = load(package, "openvino-cpu", "fp32", tmp_path, batch=4, threads=1)
    images = test_images[0][:8]
    first = runner.infer(images[:4])
    reference = runner.compiled.create_infer_request().infer([images[:4]])[runner.compiled.output(0)]
    assert np.array_equal(first, reference)
    kept = first.copy()
    second = runner.infer(images[4:8])
    assert np.array_equal(first, kept) and not np.array_equal(first, second)
    short = runner.infer(images[:3])
    assert short.shape == (3, first.shape[1]) and np.allclose(short, first[:3], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the compiled static batch 4"):
        runner.infer(images[:5])
    runner.close()
