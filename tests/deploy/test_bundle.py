"""Device bundles (lapp_edge.deploy.bundle) and the torch-free runner (runtime/, lapp-edge-run).

The deploy tests' small model (tests/deploy/conftest.py) is packaged, and a bundle is built for
every shipped CPU target profile (latency protocol shortened for the tests). The
runner is called in-process for most checks (runtime/ put on sys.path), in a subprocess
where the absence of torch and of tracebacks matters, and in fresh virtual environments
holding only the runner and one runtime for the end-to-end accuracy checks.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from PIL import Image

from lapp_edge.data.readers import Dataset
from lapp_edge.deploy.backends import LoadRequest, get_backend, run_batched
from lapp_edge.deploy.bundle import SIDECAR_SUFFIX, archive_bytes, build_bundle, build_bundles, check_bundle_slot
from lapp_edge.deploy.calibration_set import normalize_uint8
from lapp_edge.deploy.package import load_package
from lapp_edge.errors import UserError
from lapp_edge.export.package_writer import export_run
from lapp_edge.resources import TARGETS_DIR
from tests.conftest import FMNIST_DIR
from tests.deploy.conftest import int8_weight_range

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_DIR = ROOT / "runtime"
sys.path.insert(0, str(RUNTIME_DIR))
from lapp_edge_runtime.cli import main as run_main  # noqa: E402

CPU_BACKENDS = ("onnxruntime-cpu", "openvino-cpu")
TARGETS = sorted(p.stem for p in TARGETS_DIR.glob("*.yaml") if yaml.safe_load(p.read_text())["backend"] in CPU_BACKENDS)
FAST_LATENCY = {"warmup_iterations": 3, "min_iterations": 10, "min_seconds": 0.05, "max_seconds": 5.0}
ERROR_PREFIX = "lapp-edge-run: error: "
VENV_IMAGES = 300


# --- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def package(trained_run: Path) -> Path:
    """The deploy tests' dense ResNet-20 run, exported as a model package named 'tiny' (the directory)."""
    package_dir = trained_run.parent / "models" / "tiny"
    export_run(trained_run, package_dir, images=200)      # a no-op re-verification when conftest made it already
    return package_dir


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every shipped target profile with a short latency protocol (the rest unchanged)."""
    directory = tmp_path_factory.mktemp("targets")
    result = {}
    for name in TARGETS:
        payload = yaml.safe_load((TARGETS_DIR / f"{name}.yaml").read_text())
        payload["latency"] = dict(FAST_LATENCY)
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(payload))
        result[name] = directory / f"{name}.yaml"
    return result


@pytest.fixture(scope="module")
def bundles(package: Path, profiles: dict[str, Path]) -> dict[str, Path]:
    out = package.parent.parent / "dist"
    built = build_bundles(package, [profiles[name] for name in TARGETS], out)
    return dict(zip(TARGETS, built))


def run(args: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def members_of(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def repack(members: dict[str, bytes], destination: Path) -> Path:
    destination.write_bytes(archive_bytes(members))
    return destination


def write_png(pixels: np.ndarray, path: Path, mode: str = "L") -> Path:
    Image.fromarray(pixels, mode=mode).save(path)
    return path


# --- building ------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_bundle_holds_only_what_its_target_needs(bundles: dict[str, Path], package: Path, target: str) -> None:
    members = members_of(bundles[target])
    manifest = json.loads(members.pop("bundle.json"))
    samples = {"samples/images.npy", "samples/labels.npy", "samples/expected.npy"}
    artifact = {"model.onnx"} if "-ort-" in target else {"model.xml", "model.bin"}
    assert set(members) == samples | artifact
    assert manifest["files"] == {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}
    assert manifest["target"]["latency_protocol"] == FAST_LATENCY
    precision = manifest["target"]["precision"]
    assert manifest["runtime"]["inference_precision"] == precision
    assert manifest["preprocessing"]["shape"] == [1, 28, 28] and manifest["preprocessing"]["image_mode"] == "L"
    assert len(manifest["class_names"]) == 10
    images = np.load(io.BytesIO(members["samples/images.npy"]))
    expected = np.load(io.BytesIO(members["samples/expected.npy"]))
    assert images.dtype == np.uint8 and images.shape == (8, 1, 28, 28) and expected.shape == (8, 10)
    if target == "x86-ort-fp32":
        assert members["model.onnx"] == (package / "model.onnx").read_bytes()
    if target == "x86-ort-int8":
        ops = {node.op_type for node in onnx.load_from_string(members["model.onnx"]).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert manifest["runtime"]["int8"]["route"] == "qdq-u8s8" and manifest["runtime"]["int8"]["weights_7bit"] is True
        # 7-bit whatever the build CPU: a device without VNNI runs it
        assert int8_weight_range(onnx.load_from_string(members["model.onnx"])) <= 64
        assert manifest["runtime"]["int8"]["calibration"]["count"] == 512
    if "openvino" in target:
        assert manifest["runtime"]["settings"]["INFERENCE_PRECISION_HINT"] == {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[precision]
        assert (b'type="FakeQuantize"' in members["model.xml"]) == (precision == "int8")
    with tarfile.open(bundles[target]) as tar:
        for info in tar.getmembers():
            assert info.isreg() and info.mtime == 0 and info.uid == info.gid == 0 and info.mode == 0o644
    assert gzip.open(bundles[target]).read(1)            # a gzip stream
    assert bundles[target].read_bytes()[4:8] == b"\0\0\0\0"    # gzip header mtime 0


def test_builds_are_byte_identical(bundles: dict[str, Path], package: Path, profiles: dict[str, Path]) -> None:
    """A second build of every target, later in the same process (OpenVINO's name counter has moved on)."""
    again = build_bundles(package, [profiles[name] for name in TARGETS], package.parent.parent / "dist-again")
    for name, path in zip(TARGETS, again):
        assert path.read_bytes() == bundles[name].read_bytes(), name


def test_sidecar_records_measured_latency_for_this_archive(bundles: dict[str, Path]) -> None:
    archive = bundles["x86-ort-fp32"]
    sidecar = json.loads(Path(str(archive) + SIDECAR_SUFFIX).read_text())
    assert sidecar["bundle_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert sidecar["protocol"] == FAST_LATENCY
    assert [row["batch"] for row in sidecar["batches"]] == [1, 32]
    assert all(row["median_ms"] > 0 and row["iterations"] >= 10 for row in sidecar["batches"])
    assert sidecar["cpu_model"]


def test_pinned_expected_latency_is_embedded_and_reproducible(bundles: dict[str, Path], package: Path,
                                                              profiles: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    sidecar = Path(str(bundles["x86-ort-fp32"]) + SIDECAR_SUFFIX)
    first = build_bundle(package, profiles["x86-ort-fp32"], tmp_path / "a", expected_latency_from=sidecar)
    second = build_bundle(package, profiles["x86-ort-fp32"], tmp_path / "b", expected_latency_from=sidecar)
    assert first.read_bytes() == second.read_bytes()
    assert not Path(str(first) + SIDECAR_SUFFIX).exists()
    embedded = json.loads(members_of(first)["expected_latency.json"])
    assert embedded["batches"] == json.loads(sidecar.read_text())["batches"]
    code, out, err = run([first, "--bench"], capsys)
    assert code == 0, err
    assert "expected latency: expected_latency.json in the bundle" in out
    assert out.count("expected median") == 2
    with pytest.raises(UserError, match="was measured for target x86-ort-fp32"):
        build_bundle(package, profiles["x86-ort-int8"], tmp_path / "c", expected_latency_from=sidecar)


def test_builder_refuses_bad_input(package: Path, profiles: dict[str, Path], tmp_path: Path) -> None:
    payload = yaml.safe_load(profiles["x86-ort-fp32"].read_text())
    payload["input_size"] = [3, 32, 32]
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(payload))
    with pytest.raises(UserError, match=r"is for inputs \[3, 32, 32\]; tiny takes \[1, 28, 28\]: copy .* set its input_size"):
        build_bundle(package, wrong, tmp_path / "out")
    tampered = tmp_path / "tampered"
    shutil.copytree(package, tampered)
    with open(tampered / "model.onnx", "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(UserError, match="does not match its sha256"):
        build_bundle(tampered, profiles["x86-ort-fp32"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the runner: check, classify, bench ---------------------------------------------------

def test_ship_refuses_to_replace_a_bundle_of_another_package(bundles: dict[str, Path], package: Path,
                                                             profiles: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Bundles are named <package folder>-<target>: a second package in a folder of the same name shipped to
    the same --out replaced the first one's bundle silently (a user's report). Now refused before any work,
    as is a file at that path that is no bundle; the same package again is allowed (a rebuild)."""
    from lapp_edge.cli import main as cli_main

    other = tmp_path / "elsewhere" / "tiny"                 # same folder name, another package (its manifest differs)
    shutil.copytree(package, other)
    manifest = other / "manifest.json"
    manifest.write_text(manifest.read_text() + "\n")
    existing = bundles["x86-ort-fp32"]
    before = existing.read_bytes()
    ship = ["ship", "--target", str(profiles["x86-ort-fp32"]), "--out", str(existing.parent)]
    assert cli_main([ship[0], str(other), *ship[1:]]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "holds a bundle built from another package manifest" in err, err
    assert "pass --replace" in err and existing.read_bytes() == before
    check_bundle_slot(existing, load_package(package))       # the package it was built from may rebuild it
    check_bundle_slot(existing, load_package(other), replace=True)      # and --replace says "replace it"
    not_a_bundle = tmp_path / "dist" / existing.name
    not_a_bundle.parent.mkdir()
    not_a_bundle.write_bytes(b"my notes")
    assert cli_main([ship[0], str(package), *ship[1:3], "--out", str(not_a_bundle.parent)]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a bundle lapp-edge can read" in err and not_a_bundle.read_bytes() == b"my notes"


def test_every_target_is_checked_before_the_first_is_built_or_benched(package: Path, profiles: dict[str, Path],
                                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a wrong second target used to be found after the first target's bundle was built (or benched)
    import lapp_edge.deploy.bench as bench
    import lapp_edge.deploy.bundle as bundle

    payload = yaml.safe_load(profiles["x86-ort-fp32"].read_text())
    payload.update(name="rgb-box", input_size=[3, 32, 32])
    wrong = tmp_path / "rgb-box.yaml"
    wrong.write_text(yaml.safe_dump(payload))

    def no_work(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("work started before every target was checked")

    monkeypatch.setattr(bundle, "build_bundle", no_work)
    monkeypatch.setattr(bench, "bench_target", no_work)
    with pytest.raises(UserError, match="target rgb-box is for inputs"):
        build_bundles(package, [profiles["x86-ort-fp32"], wrong], tmp_path / "dist")
    (tmp_path / "tiny-x86-ort-fp32.tar.gz.latency.json").write_text("{}")     # the first target's is there
    with pytest.raises(UserError, match="no expected latency .*tiny-x86-ort-int8"):
        build_bundles(package, [profiles["x86-ort-fp32"], profiles["x86-ort-int8"]], tmp_path / "dist",
                      expected_latency_dir=tmp_path)
    with pytest.raises(UserError, match="target rgb-box is for inputs"):
        bench.run_bench(str(package), [str(profiles["x86-ort-fp32"]), str(wrong)])
    assert not (tmp_path / "dist").exists()


def test_classify_refuses_a_model_whose_outputs_do_not_match_its_class_names(
        bundles: dict[str, Path], fmnist: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # a bundle whose model had 12 outputs for 10 class names crashed classify (IndexError) on a top class >= 10
    import lapp_edge_runtime.cli as runtime_cli

    monkeypatch.setattr(runtime_cli, "softmax", lambda logits: np.full((len(logits), 12), 1 / 12))
    image = write_png(fmnist.test.images[0][0], tmp_path / "0.png")
    code, _, err = run([bundles["x86-ort-fp32"], image, "--top", "12"], capsys)
    assert_one_line_error(code, err, "outputs [12] scores per image but names 10 classes")


@pytest.mark.parametrize("target", TARGETS)
def test_check_passes_on_an_untouched_bundle(bundles: dict[str, Path], target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run([bundles[target], "--check"], capsys)
    assert code == 0 and err == ""
    assert "check ok: " in out and "8 samples match the build's outputs" in out
    code, out, _ = run([bundles[target], "--check", "--json"], capsys)
    check = json.loads(out)["check"]
    assert check["ok"] and check["worst_fraction_of_allowed"] <= 1.0 and check["top1_agrees_with_build"] == 8


def test_classify_matches_the_package_in_onnxruntime(bundles: dict[str, Path], package: Path, fmnist: Dataset,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pixels = fmnist.test.images[100:140]
    paths = [write_png(image[0], tmp_path / f"{i}.png") for i, image in enumerate(pixels)]
    code, out, err = run([bundles["x86-ort-fp32"], *paths, "--json"], capsys)
    assert code == 0, err
    predictions = json.loads(out)["predictions"]
    loaded = load_package(package)
    manifest = loaded.manifest
    runner = get_backend("onnxruntime-cpu").load(LoadRequest(loaded.onnx_path, loaded.input_name, loaded.input_shape,
                                                             "fp32", 1, 32, tmp_path / "work"))
    logits = run_batched(runner, normalize_uint8(pixels, manifest["input"]["mean"], manifest["input"]["std"]), 32)
    assert [p["index"] for p in predictions] == logits.argmax(1).tolist()
    assert [p["class"] for p in predictions] == [manifest["class_names"][i] for i in logits.argmax(1)]
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose([p["probabilities"] for p in predictions], shifted / shifted.sum(1, keepdims=True), atol=1e-5)
    assert all(len(p["top"]) == 3 and abs(sum(p["probabilities"]) - 1) < 1e-6 for p in predictions)
    code, out, _ = run([bundles["x86-ort-fp32"], paths[0], paths[1], "--top", "2"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[1].startswith(f"{paths[0]}: {predictions[0]['class']} {predictions[0]['probability']:.3f} (")


@pytest.mark.parametrize("target", ["x86-ort-int8", "x86-openvino-bf16"])
def test_bench_uses_the_bundle_protocol_and_compares(bundles: dict[str, Path], target: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run([bundles[target], "--bench", "--json"], capsys)
    assert code == 0, err
    bench = json.loads(out)["bench"]
    assert bench["protocol"] == FAST_LATENCY
    assert [row["batch"] for row in bench["batches"]] == [1, 32]
    for row in bench["batches"]:
        assert row["iterations"] >= 10 and row["median_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["versus_expected"].startswith("expected median ")
    # moved without its sidecar: measured, nothing to compare with
    alone = tmp_path / bundles[target].name
    shutil.copy(bundles[target], alone)
    code, out, _ = run([alone, "--bench"], capsys)
    assert code == 0 and "expected latency: none recorded" in out and "no expected latency" in out
    # a sidecar of another build is not taken
    sidecar = json.loads(Path(str(bundles[target]) + SIDECAR_SUFFIX).read_text())
    sidecar["bundle_sha256"] = "0" * 64
    Path(str(alone) + SIDECAR_SUFFIX).write_text(json.dumps(sidecar))
    code, out, _ = run([alone, "--bench"], capsys)
    assert code == 0 and "is for another build" in out


# --- the runner refuses bad input: one line, exit 2 ---------------------------------------

def test_not_a_bundle(bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.tar.gz"
    text.write_text("hello\n")
    assert_one_line_error(*run([text, "--check"], capsys)[::2], "is not a bundle: not a tar archive")
    assert_one_line_error(*run([tmp_path / "absent.tar", "--check"], capsys)[::2], "does not exist")
    assert_one_line_error(*run([tmp_path, "--check"], capsys)[::2], "is not a file")
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        info = tarfile.TarInfo("readme.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    assert_one_line_error(*run([plain, "--check"], capsys)[::2], "has no bundle.json")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(bundles["x86-ort-fp32"].read_bytes()[:5000])
    assert_one_line_error(*run([truncated, "--check"], capsys)[::2], "is not a bundle")
    members = members_of(bundles["x86-ort-fp32"])
    members["bundle.json"] = b'{"kind": "something else"}'
    assert_one_line_error(*run([repack(members, tmp_path / "other.tar.gz"), "--check"], capsys)[::2],
                          "bundle.json is not a lapp-edge bundle manifest")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "dotdot-in-manifest"])
def test_escaping_or_linked_members_are_refused(bundles: dict[str, Path], tmp_path: Path, kind: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    evil = tmp_path / "evil.tar"
    members = members_of(bundles["x86-ort-fp32"])
    if kind == "dotdot-in-manifest":        # only bundle.json names a file outside the bundle
        manifest = json.loads(members["bundle.json"])
        manifest["files"]["../escaped.txt"] = hashlib.sha256(b"x").hexdigest()
        members["bundle.json"] = json.dumps(manifest).encode()
    with tarfile.open(evil, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if kind != "dotdot-in-manifest":
            info = tarfile.TarInfo({"dotdot": "samples/../../escaped.txt", "absolute": str(tmp_path / "escaped.txt"),
                                    "symlink": "samples/link.npy", "hardlink": "samples/hard.npy"}[kind])
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, "model.onnx"
            else:
                info.size = 1
            tar.addfile(info, io.BytesIO(b"x") if info.size else None)
    expected = {"dotdot": "contains '..'", "absolute": "is an absolute path", "symlink": "is a symbolic link",
                "hardlink": "is a hard link", "dotdot-in-manifest": "contains '..'"}[kind]
    assert_one_line_error(*run([evil, "--check"], capsys)[::2], expected)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()


def test_tampered_artifact_is_refused(bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = members_of(bundles["x86-openvino-int8"])
    weights = bytearray(members["model.bin"])
    weights[len(weights) // 2] ^= 0x40
    members["model.bin"] = bytes(weights)
    tampered = repack(members, tmp_path / "tampered.tar.gz")
    assert_one_line_error(*run([tampered, "--check"], capsys)[::2], "model.bin does not match its sha256 in bundle.json")
    assert_one_line_error(*run([tampered, str(tmp_path / "x.png")], capsys)[::2], "does not match its sha256")
    members = members_of(bundles["x86-ort-fp32"])
    members["extra.txt"] = b"not listed"
    assert_one_line_error(*run([repack(members, tmp_path / "extra.tar.gz"), "--check"], capsys)[::2],
                          "'extra.txt' is not listed in bundle.json")
    members = members_of(bundles["x86-ort-fp32"])
    del members["samples/labels.npy"]
    assert_one_line_error(*run([repack(members, tmp_path / "missing.tar.gz"), "--check"], capsys)[::2],
                          "lacks samples/labels.npy")


def test_check_catches_a_changed_model_whose_hash_was_updated(bundles: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    members = members_of(bundles["x86-ort-fp32"])
    model = onnx.load_from_string(members["model.onnx"])
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[: values.size // 4] *= 1.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    members["model.onnx"] = model.SerializeToString()
    manifest = json.loads(members["bundle.json"])
    manifest["files"]["model.onnx"] = hashlib.sha256(members["model.onnx"]).hexdigest()
    members["bundle.json"] = json.dumps(manifest).encode()
    code, _, err = run([repack(members, tmp_path / "rehashed.tar.gz"), "--check"], capsys)
    assert_one_line_error(code, err, "check failed: sample ", "> allowed")


def test_bad_images_are_refused(bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = bundles["x86-ort-fp32"]
    good = write_png(np.zeros((28, 28), np.uint8), tmp_path / "good.png")
    big = write_png(np.zeros((32, 32), np.uint8), tmp_path / "big.png")
    rgb = write_png(np.zeros((28, 28, 3), np.uint8), tmp_path / "rgb.png", mode="RGB")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    assert_one_line_error(*run([bundle, good, big], capsys)[::2], "is 32x32; this bundle takes 28x28 (no resize is done")
    assert_one_line_error(*run([bundle, rgb], capsys)[::2], "is mode RGB; this bundle takes 8-bit grayscale (L) images")
    assert_one_line_error(*run([bundle, text], capsys)[::2], "cannot be read as an image")
    assert_one_line_error(*run([bundle, tmp_path / "absent.png"], capsys)[::2], "absent.png does not exist")
    assert_one_line_error(*run([bundle], capsys)[::2], "nothing to do")
    assert_one_line_error(*run([bundle, "--frobnicate"], capsys)[::2], "unrecognized arguments")


@pytest.mark.parametrize("target, module", [("x86-ort-fp32", "onnxruntime"), ("x86-openvino-f32", "openvino")])
def test_missing_runtime_is_one_line(bundles: dict[str, Path], target: str, module: str,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, module, None)      # import raises ImportError
    assert_one_line_error(*run([bundles[target], "--check"], capsys)[::2],
                          f"this bundle runs on {module}, which cannot be imported",
                          f"pip install 'lapp-edge-runtime[{module}]'")


def test_runner_process_imports_no_torch_and_prints_no_traceback(bundles: dict[str, Path], fmnist: Dataset,
                                                                 tmp_path: Path) -> None:
    image = write_png(fmnist.test.images[0, 0], tmp_path / "shoe.png")  # type: ignore[attr-defined]
    bad = write_png(np.zeros((27, 28), np.uint8), tmp_path / "bad.png")
    probe = (
        "import sys\n"
        "from lapp_edge_runtime.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lapp_edge', 'torchvision'))\n"
        "print('LEAKED', leaked, file=sys.stderr) if leaked else None\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(RUNTIME_DIR)}
    ok = subprocess.run([sys.executable, "-c", probe, str(bundles["x86-openvino-int8"]), str(image), "--check"],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert f"{image}: " in ok.stdout
    failed = subprocess.run([sys.executable, "-c", probe, str(bundles["x86-ort-fp32"]), str(bad)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.startswith(ERROR_PREFIX) and len(failed.stderr.splitlines()) == 1, failed.stderr


def test_runtime_sources_import_only_numpy_pillow_and_the_runtimes() -> None:
    allowed = {"numpy", "PIL", "onnxruntime", "openvino", "lapp_edge_runtime", "__future__"} | set(sys.stdlib_module_names)
    for source in sorted((RUNTIME_DIR / "lapp_edge_runtime").glob("*.py")):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] in allowed, f"{source.name} imports {name}"
    project = (RUNTIME_DIR / "pyproject.toml").read_text()
    assert 'dependencies = ["numpy>=1.22", "pillow>=9.0"]' in project and 'lapp-edge-run = "lapp_edge_runtime.cli:main"' in project


# --- fresh virtual environments: only the runner and one runtime -------------------------

def _fresh_venv(tmp_path: Path, extra: str) -> Path:
    """A new venv with `lapp-edge-runtime[extra]` installed from a copy of runtime/ (pip's cache used)."""
    source = tmp_path / "runtime-src"
    shutil.copytree(RUNTIME_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              f"{source}[{extra}]"], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, f"pip install failed:\n{install.stdout[-3000:]}\n{install.stderr[-3000:]}"
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; "
                            "print([m for m in ('torch', 'lapp_edge', 'torchvision') if u.find_spec(m)])"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    return venv


def _venv_accuracy(bundles: dict[str, Path], package: Path, fmnist: Dataset, tmp_path: Path, target: str,
                   extra: str, backend: str) -> None:
    if not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    venv = _fresh_venv(tmp_path, extra)
    pixels = fmnist.test.images[:VENV_IMAGES]
    labels = fmnist.test.labels[:VENV_IMAGES]
    images = tmp_path / "images"
    images.mkdir()
    paths = [str(write_png(image[0], images / f"{i:04d}.png")) for i, image in enumerate(pixels)]
    runner = venv / "bin" / "lapp-edge-run"
    check = subprocess.run([str(runner), str(bundles[target]), "--check"], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert check.returncode == 0 and "check ok" in check.stdout, check.stderr
    result = subprocess.run([str(runner), str(bundles[target]), *paths, "--json"], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    device = np.array([p["index"] for p in json.loads(result.stdout)["predictions"]])
    loaded = load_package(package)
    mean, std = loaded.manifest["input"]["mean"], loaded.manifest["input"]["std"]
    in_process = get_backend(backend).load(LoadRequest(loaded.onnx_path, loaded.input_name, loaded.input_shape,
                                                       "fp32", 1, 32, tmp_path / "work"))
    reference = run_batched(in_process, normalize_uint8(pixels, mean, std), 32).argmax(1)
    assert float((device == labels).mean()) == float((reference == labels).mean())
    assert float((device == reference).mean()) >= 0.99


@pytest.mark.slow      # a fresh venv and a runtime download: ~60 s each on 2 cores; make test-slow runs them
def test_fresh_venv_onnxruntime_bundle_classifies_like_in_process(bundles: dict[str, Path], package: Path,
                                                                  fmnist: Dataset, tmp_path: Path) -> None:
    _venv_accuracy(bundles, package, fmnist, tmp_path, "x86-ort-fp32", "onnxruntime", "onnxruntime-cpu")


@pytest.mark.slow
def test_fresh_venv_openvino_bundle_classifies_like_in_process(bundles: dict[str, Path], package: Path,
                                                               fmnist: Dataset, tmp_path: Path) -> None:
    _venv_accuracy(bundles, package, fmnist, tmp_path, "x86-openvino-f32", "openvino", "openvino-cpu")


def test_ship_command_pins_expected_latency_from_a_directory(bundles: dict[str, Path], package: Path,
                                                             profiles: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`lapp-edge ship ... --expected-latency-from DIR` (the release path): sidecars of an
    earlier build are embedded, the archives are deterministic; a missing sidecar is one line, exit 2."""
    from lapp_edge.cli import main as cli_main

    def ship_main(argv: list[str]) -> int:
        return cli_main(["ship", *argv])

    args = [str(package), "--target", str(profiles["x86-ort-fp32"]), "--target", str(profiles["x86-ort-int8"]),
            "--expected-latency-from", str(bundles["x86-ort-fp32"].parent)]
    assert ship_main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.endswith("expected latency embedded)") for line in out)
    assert ship_main([*args, "--out", str(tmp_path / "b")]) == 0
    for name in ("tiny-x86-ort-fp32.tar.gz", "tiny-x86-ort-int8.tar.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    capsys.readouterr()
    code = ship_main([str(package), "--target", str(profiles["x86-ort-fp32"]), "--out", str(tmp_path / "c"),
                      "--expected-latency-from", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lapp-edge: error: no expected latency") and len(err.splitlines()) == 1
