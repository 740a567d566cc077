"""Issue 15, kind 3 (scratch directory trusted): `bench --work-dir DIR` must not write through
links planted in DIR, and must not run an artifact planted there. Derived artifacts are
written atomically under fresh names, re-validated before reuse (an HMAC'd sidecar with each
file's sha256, under the user's key), and loaded from a private copy."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from lapp_edge.cli import main
from lapp_edge.deploy import artifacts
from lapp_edge.deploy.backends import LoadRequest, get_backend
from lapp_edge.deploy.backends import onnxruntime_cpu
from lapp_edge.deploy.backends.base import artifact_key
from lapp_edge.errors import UserError
from tests.tiny_package import MODEL_FILE, write_tiny_package

CALIBRATION = np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32)


def qdq_artifact_name(model: Path) -> str:
    """The cached U8S8 artifact's name for `model` on this CPU (constants expanded; 7-bit weights, tag qdq-xc-r7, without VNNI)."""
    tag = "qdq-xc-r7" if onnxruntime_cpu.this_cpu_needs_reduced_range() else "qdq-xc"
    return f"model.int8-{tag}.{artifact_key(model, CALIBRATION)}"


@pytest.fixture(autouse=True)
def user_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    key = tmp_path / "key" / "artifact.key"
    monkeypatch.setenv("LAPP_EDGE_KEY_FILE", str(key))
    return key


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return write_tiny_package(tmp_path / "pkg") / MODEL_FILE


def request(model: Path, work: Path, precision: str = "fp32") -> LoadRequest:
    return LoadRequest(onnx_path=model, input_name="input", input_shape=(1, 28, 28), precision=precision, threads=1, batch=4,
                       work_dir=work, calibration=CALIBRATION if precision == "int8" else None, int8_route="qdq-u8s8")


def test_planted_link_for_the_optimized_dump_is_replaced_not_written_through(model: Path, tmp_path: Path) -> None:
    work, victim = tmp_path / "work", tmp_path / "victim.txt"
    work.mkdir()
    victim.write_text("victim file outside the work dir")
    os.symlink(victim, work / "model.ort-optimized.onnx")
    with get_backend("onnxruntime-cpu").load(request(model, work)) as runner:
        assert runner.infer(np.zeros((4, 1, 28, 28), np.float32)).shape == (4, 10)
    assert victim.read_text() == "victim file outside the work dir"
    assert not (work / "model.ort-optimized.onnx").is_symlink()


def test_planted_links_for_artifacts_and_sidecars_are_not_written_through(model: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    name = qdq_artifact_name(model)
    victims = []
    for member in (f"{name}.onnx", f"{name}{artifacts.SIDECAR_SUFFIX}"):
        victim = tmp_path / f"victim-{len(victims)}"
        victim.write_text("keep")
        os.symlink(victim, work / member)
        victims.append(victim)
    get_backend("onnxruntime-cpu").load(request(model, work, "int8")).close()
    assert all(v.read_text() == "keep" for v in victims)


def plant(work: Path, model: Path) -> tuple[str, bytes]:
    """A model that always answers class 0 under the name the int8 artifact of `model` gets."""
    name = qdq_artifact_name(model)
    planted = onnx.load(str(model))
    for tensor in planted.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor).copy()
        array[...] = 0
        if array.ndim == 1:
            array[0] = 100.0
        tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    data = planted.SerializeToString()
    work.mkdir(exist_ok=True)
    (work / f"{name}.onnx").write_bytes(data)
    return name, data


def predictions(model: Path, work: Path) -> np.ndarray:
    images = np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype(np.float32)
    with get_backend("onnxruntime-cpu").load(request(model, work, "int8")) as runner:
        return runner.infer(images).argmax(1)


@pytest.mark.parametrize("sidecar", ["none", "forged-mac", "copied-from-another-user"])
def test_planted_int8_artifact_is_rebuilt_not_run(sidecar: str, model: Path, tmp_path: Path, user_key: Path) -> None:
    genuine = predictions(model, tmp_path / "clean")
    work = tmp_path / "work"
    name, data = plant(work, model)
    files = {f"{name}.onnx": hashlib.sha256(data).hexdigest()}
    key = onnxruntime_cpu.content_digest(model, CALIBRATION)
    if sidecar == "forged-mac":           # right key and hash, a MAC made without the user's secret
        payload = {"format": 1, "key": key, "files": files, "mac": hashlib.sha256(b"guess").hexdigest()}
        (work / f"{name}{artifacts.SIDECAR_SUFFIX}").write_text(json.dumps(payload))
    elif sidecar == "copied-from-another-user":   # a genuine sidecar, but made under another user's key
        other = tmp_path / "other.key"
        os.environ["LAPP_EDGE_KEY_FILE"] = str(other)
        payload = {"format": 1, "key": key, "files": files, "mac": artifacts._mac(key, files)}
        os.environ["LAPP_EDGE_KEY_FILE"] = str(user_key)
        (work / f"{name}{artifacts.SIDECAR_SUFFIX}").write_text(json.dumps(payload))
    assert (predictions(model, work) == genuine).all()
    assert (work / f"{name}.onnx").read_bytes() != data          # replaced by the real artifact


def test_a_valid_artifact_is_reused_and_a_swapped_one_is_not(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    first = predictions(model, work)
    import onnxruntime.quantization as quantization

    calls = []
    real = quantization.quantize_static

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(quantization, "quantize_static", counting)
    name = qdq_artifact_name(model)
    reused = onnxruntime_cpu.qdq_model(model, "input", CALIBRATION, work)
    assert not calls                                                                # reused, not quantized again
    assert reused.read_bytes() == (work / f"{name}.onnx").read_bytes() and reused.parent != work   # a private copy
    # swap the artifact after it was published (its sidecar stays): not reused, rebuilt
    plant(work, model)
    assert (predictions(model, work) == first).all()
    assert len(calls) == 1


def test_a_work_dir_that_is_a_link_or_a_file_is_refused(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "work")
    with pytest.raises(UserError, match="symbolic link"):
        get_backend("onnxruntime-cpu").load(request(model, tmp_path / "work"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        artifacts.work_directory(tmp_path / "file")
    assert not list((tmp_path / "elsewhere").iterdir())


def test_bench_with_a_planted_work_dir_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The 09 reproducer through the CLI: the victim stays, the bench runs, exit 0."""
    package = write_tiny_package(tmp_path / "pkg")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 16), ("t10k", 8)):
        (data / f"{prefix}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"".join(
            d.to_bytes(4, "big") for d in (count, 28, 28)) + rng.integers(0, 256, count * 784, dtype=np.uint8).tobytes())
        (data / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + count.to_bytes(4, "big")
                                                          + rng.integers(0, 10, count, dtype=np.uint8).tobytes())
    profile = tmp_path / "fp32.yaml"
    profile.write_text("name: quick\nbackend: onnxruntime-cpu\nprecision: fp32\nthreads: 1\nbatch_sizes: [1]\n"
                       "input_size: [1, 28, 28]\nlatency: {warmup_iterations: 1, min_iterations: 2, min_seconds: 0.0}\n")
    work, victim = tmp_path / "work", tmp_path / "victim.txt"
    work.mkdir()
    victim.write_text("victim")
    os.symlink(victim, work / "model.ort-optimized.onnx")
    assert main(["bench", str(package), "--target", str(profile), "--data-dir", str(data), "--work-dir", str(work), "--compiles", "1"]) == 0
    capsys.readouterr()
    assert victim.read_text() == "victim"
