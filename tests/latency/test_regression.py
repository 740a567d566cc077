"""Latency regression per target (deploy/regression.py): ratios measured interleaved in one process,
never absolute times.

- The failing direction (default run): a deliberately widened model swapped in for the slim
  reference fails, with a message naming the target, the expected and the measured speedup.
- The cheapest target, short (default run): on ORT fp32 the slim reference is faster than dense.
- Every target against this machine's recorded baselines (marker `latency`, `make latency-test`,
  `make latency-test TARGET=x86-ort-int8` for one): skipped with the reason where the machine has
  no baseline yet, the runtime or GPU is missing, or others loaded the CPU while measuring.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from lapp_edge.deploy.backends import runtime_available
from lapp_edge.deploy.measure import RatioProtocol, machine_key
from lapp_edge.deploy.regression import check, measure_target, reference_models
from lapp_edge.deploy.targets import LatencyBaselines, MachineBaseline, load_target, target_machine_key
from lapp_edge.resources import profile_names

QUICK = RatioProtocol(blocks=6, calls_batch1=15, warmup=10, retries=1)


def test_widened_model_fails_with_target_expected_and_measured(tmp_path: Path) -> None:
    profile = load_target("x86-ort-fp32")
    [measured] = measure_target(profile, [1], tmp_path, QUICK, compiles=1)
    assert measured.speedup > 1.2, f"the slim reference should be clearly faster than dense, got {measured.speedup:.3f}"
    # Hold the target to what the real slim model just did here; then swap in the dense model (every width restored).
    held = dataclasses.replace(profile, baselines=LatencyBaselines(
        "x86-ort-fp32", "resnet20", 0.2, {machine_key(): MachineBaseline({1: 1.0}, {1: measured.speedup})}))
    [widened] = measure_target(held, [1], tmp_path, QUICK, slim_override=reference_models().dense, compiles=1)
    assert 0.8 < widened.speedup < 1.25 and widened.speedup_per_compile == [widened.speedup]
    [problem] = [p for p in widened.problems if "expected >=" in p]
    assert "target x86-ort-fp32" in problem and f"{widened.speedup:.3f}" in problem and f"{measured.speedup:.3f}" in problem
    if widened.predicted_speedup is not None:           # this machine has a layer table or a fit for the target: held to it too
        [missed] = [p for p in widened.problems if "predicts" in p]
        assert widened.predicted_by in missed and f"{widened.predicted_speedup:.3f}" in missed
    assert len(widened.problems) == 1 + (widened.predicted_speedup is not None)


def test_check_flags_each_kind_of_miss() -> None:
    from lapp_edge.deploy.regression import RegressionResult

    ok = RegressionResult("t", 1, "m", 2.0, [1.9, 2.1], 0.5, 0.0, False, 0.1, expected_speedup=2.0,
                          expected_ratio_to_reference=0.5, predicted_speedup=2.0)
    check(ok)
    assert ok.problems == []
    slow = dataclasses.replace(ok, speedup=1.7, problems=[])
    check(slow)
    assert len(slow.problems) == 2 and "expected >= 2.000" in slow.problems[0] and "predicts 2.000" in slow.problems[1]
    heavy = dataclasses.replace(ok, ratio_to_reference=0.6, problems=[])
    check(heavy)
    assert len(heavy.problems) == 1 and "expected <= 0.500" in heavy.problems[0]
    unknown = dataclasses.replace(ok, expected_speedup=None, expected_ratio_to_reference=None, predicted_speedup=None,
                                  problems=[], notes=[])
    check(unknown)
    assert unknown.problems == [] and "lapp-edge baseline --target t" in unknown.notes[0]
    mine = dataclasses.replace(unknown, target_argument="my/edge.yaml", notes=[])    # a user's profile, by path
    check(mine)
    assert "lapp-edge baseline --target my/edge.yaml" in mine.notes[0]


def test_prediction_is_this_machines_layer_table_else_its_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a prediction measured on another CPU is not held against this one; a table measured here is preferred to a fit
    import json
    import shutil

    from lapp_edge.costs.latency_fit import fit_file_name, load_fit
    from lapp_edge.costs.latency_table import find_table_file, load_table, onnx_conv_layers, table_file_name
    from lapp_edge.deploy.regression import RegressionResult, predicted_speedup
    from lapp_edge.resources import LATENCY_DIR

    monkeypatch.chdir(tmp_path)
    machine = "Test CPU; avx2 fma9"                     # no shipped table or fit is keyed to it
    profile, models = load_target("x86-ort-fp32"), reference_models()

    def result() -> RegressionResult:
        return RegressionResult("x86-ort-fp32", 32, machine, 2.0, [1.9, 2.1], 1.0, 0.0, False, 0.25)

    nothing = result()
    assert predicted_speedup(profile, models, 32, machine, nothing) is None
    assert nothing.predicted_by == "" and "not this machine" in nothing.notes[0] and "profile-layers" in nothing.notes[0]

    data = tmp_path / "latency-data"
    data.mkdir()
    shipped_fit = json.loads((LATENCY_DIR / "latency-fit-x86-ort-fp32-resnet20.json").read_text())
    shipped_fit["load"]["machine"] = machine
    (data / fit_file_name("x86-ort-fp32", "resnet20", machine)).write_text(json.dumps(shipped_fit))
    from_fit = result()
    fit = load_fit(data / fit_file_name("x86-ort-fp32", "resnet20", machine))
    assert predicted_speedup(profile, models, 1, machine, from_fit) == pytest.approx(1 / fit.predict_ratio(1, {"macs_ratio": models.macs_ratio}))
    assert from_fit.predicted_by == fit_file_name("x86-ort-fp32", "resnet20", machine)

    shipped_table = find_table_file("x86-ort-fp32", "resnet20", models.input_shape, "AMD EPYC; avx2")
    assert shipped_table is not None
    mine = data / table_file_name("x86-ort-fp32", "resnet20", models.input_shape, machine)
    shutil.copy(shipped_table, mine)
    from_table = result()
    predicted = predicted_speedup(profile, models, 32, machine, from_table)
    batch_table = load_table(mine).batches[32]
    assert predicted == pytest.approx(batch_table.predict_ratio(onnx_conv_layers(models.dense))
                                      / batch_table.predict_ratio(onnx_conv_layers(models.slim)))
    assert from_table.predicted_by == mine.name and 1.3 < predicted < 3.5 and from_table.notes == []


def test_baseline_checks_it_can_write_each_profile_before_measuring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # baseline records into the profile's file after minutes of measuring: a file it cannot write is refused first
    import tempfile

    from lapp_edge.cli import main
    from lapp_edge.resources import TARGETS_DIR

    profile = tmp_path / "ro" / "edge-box.yaml"
    profile.parent.mkdir()
    profile.write_text((TARGETS_DIR / "x86-ort-fp32.yaml").read_text().replace("name: x86-ort-fp32", "name: edge-box"))
    make_temp = tempfile.mkstemp

    def read_only_folder(*args: object, dir: object = None, **kwargs: object) -> tuple[int, str]:  # noqa: A002
        if Path(str(dir)) == profile.parent:            # root may write anywhere: stand in for a read-only mount
            raise PermissionError(13, "Permission denied")
        return make_temp(*args, dir=dir, **kwargs)      # type: ignore[arg-type]

    def no_measuring(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("measured before the profile file was checked")

    monkeypatch.setattr("lapp_edge.fileio.tempfile.mkstemp", read_only_folder)
    monkeypatch.setattr("lapp_edge.deploy.regression.measure_target", no_measuring)
    assert main(["baseline", "--target", str(profile)]) == 2
    err = capsys.readouterr().err
    assert "cannot create files in" in err and str(profile.parent) in err and len(err.splitlines()) == 1


def test_recording_a_baseline_keeps_every_line_of_the_profile_but_its_baselines(tmp_path: Path) -> None:
    """A user's profile keeps its comments, inline ones included, and the entries after `baselines:` when a
    baseline is recorded (before, only the leading comment survived: an inline comment on channel_multiple was lost)."""
    from lapp_edge.deploy.regression import RegressionResult, record_baseline
    from lapp_edge.resources import TARGETS_DIR

    shipped = (TARGETS_DIR / "x86-ort-fp32.yaml").read_text()
    head = shipped[:shipped.index("baselines:")].replace("name: x86-ort-fp32", "name: edge-box")
    head = head.replace("threads: 1\n", "threads: 1          # one core: the box runs its sensor loop on the other\n")
    latency_line = next(line for line in head.splitlines(keepends=True) if line.startswith("latency:"))
    head = head.replace(latency_line, "")
    tail = "# the sensor loop's own timing\n" + latency_line.rstrip("\n") + "   # kept after the baselines: not this tool's\n"
    text = head + "baselines:\n  reference_target: x86-ort-fp32\n  model: resnet20\n  tolerance: 0.3   # ours\n" + tail
    profile_path = tmp_path / "edge-box.yaml"
    profile_path.write_text(text)
    for machine, speedup in (("box A", 1.9), ("box B", 2.1)):
        result = RegressionResult("edge-box", 32, machine, speedup, [speedup, speedup], 1.0, 0.0, False, 0.3,
                                  speedup_per_compile=[speedup])
        written = record_baseline(load_target(str(profile_path)), [result], "lapp-edge baseline --target edge-box.yaml")
    after = written.read_text()
    assert after.startswith(head) and after.endswith(tail)
    held = load_target(str(profile_path)).baselines
    assert held.tolerance == 0.3 and set(held.machines) == {"box A", "box B"}
    assert held.machines["box A"].speedup == {32: 1.9} and held.machines["box B"].speedup == {32: 2.1}
    # a profile with no baselines yet gets the block at its end, the rest untouched
    bare = tmp_path / "bare.yaml"
    bare.write_text(head)
    result = RegressionResult("edge-box", 1, "box A", 1.5, [1.5], None, 0.0, False, 0.25, speedup_per_compile=[1.5])
    assert record_baseline(load_target(str(bare)), [result]).read_text().startswith(head + "baselines:\n")
    assert load_target(str(bare)).baselines.machines["box A"].speedup == {1: 1.5}


def targets() -> list[str]:
    chosen = os.environ.get("LAPP_EDGE_LATENCY_TARGET")
    return [chosen] if chosen else profile_names()


@pytest.mark.latency
@pytest.mark.parametrize("target", targets())
def test_target_holds_its_baseline(target: str, tmp_path: Path) -> None:
    profile = load_target(target)
    available, why = runtime_available(profile.backend)      # GPU backends: False without a visible NVIDIA GPU
    if not available:
        pytest.skip(f"{target}: {why}")
    machine = target_machine_key(profile.backend)
    if profile.baselines is None or machine not in profile.baselines.machines:
        pytest.skip(f"{target}: no baseline recorded for this machine ({machine}): lapp-edge baseline --target {target}")
    results = measure_target(profile, list(profile.batch_sizes), tmp_path)
    problems = [p for r in results for p in r.problems]
    if problems and any(r.flagged for r in results):
        pytest.skip(f"{target}: measured while other processes loaded the CPU: not judgeable ({problems[0]})")
    assert not problems, "\n".join(problems)


def test_torch_cuda_rebuilds_the_shipped_references_from_their_specs(tmp_path: Path) -> None:
    """On a GPU machine `latency-check --target gpu-torch-cuda-fp16` stopped: the references were ONNX
    only, and torch-cuda rebuilds the network from architecture.json + slim_model.pt. Backends that
    compile the ONNX keep loading the shipped files."""
    import json

    import torch

    from lapp_edge.deploy.backends import get_backend
    from lapp_edge.lapp.flops import count_deployed_macs
    from lapp_edge.models.spec import load_slim_model
    from lapp_edge.resources import find_latency_file

    models = reference_models()
    info = json.loads(find_latency_file("reference-models.json").read_text(encoding="utf-8"))  # type: ignore[union-attr]
    assert models.path_for("slim", get_backend("onnxruntime-cpu"), tmp_path) == models.slim
    torch.manual_seed(123)
    expected = torch.rand(3)
    for role in ("dense", "slim"):
        torch.manual_seed(123)
        path = models.path_for(role, get_backend("torch-cuda"), tmp_path)
        assert torch.equal(torch.rand(3), expected), "building the reference's weights moved the caller's RNG"
        model, spec = load_slim_model(path.parent)
        assert path.read_bytes() == (models.dense if role == "dense" else models.slim).read_bytes()
        assert spec.widths == info[role]["widths"]
        assert count_deployed_macs(model, models.input_shape) == info[role]["macs"]


def test_gpu_targets_are_keyed_by_the_gpu_and_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # a GPU latency ratio depends on the GPU: a GPU target's baselines, tables and fits carry its name; a CPU target's do not
    from lapp_edge.deploy.backends.gpu_measure import CudaDevice

    monkeypatch.setattr(CudaDevice, "device_name", lambda self: "NVIDIA H200")
    cpu = machine_key()
    assert target_machine_key("torch-cuda") == target_machine_key("tensorrt") == f"NVIDIA H200; host {cpu}"
    assert target_machine_key("onnxruntime-cpu") == target_machine_key("openvino-cpu") == cpu and "NVIDIA" not in cpu
    assert next(iter(load_target("gpu-torch-cuda-fp16").baselines.machines)).startswith("NVIDIA H200; host ")   # shipped


def test_gpu_baseline_records_torch_cuda_and_cudnn_versions() -> None:
    # a GPU latency ratio moves with torch, CUDA and cuDNN: a GPU target's record names them, a CPU target's need not
    import torch

    from lapp_edge.deploy.regression import runtime_versions

    gpu, cpu = runtime_versions("torch-cuda"), runtime_versions("onnxruntime-cpu")
    assert gpu["torch"] == torch.__version__
    assert gpu["cuda"] == str(torch.version.cuda) and gpu["cudnn"] == str(torch.backends.cudnn.version())
    assert "torch" not in cpu and "cuda" not in cpu and cpu["numpy"] == gpu["numpy"] == runtime_versions()["numpy"]
