"""Issue 15, kind 1 (package boundary): a model package is a closed set of regular files under
its directory, every one listed in the manifest and hashed, read without following links.
Names that leave the package, links, special files, unlisted files and unlisted ONNX
external data are refused in one line (exit 2) before any runtime sees a file, and the
answer is the same whether or not the outside file exists (no existence oracle).

Packages are made without training (tests/tiny_package.py), so each case takes milliseconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lapp_edge.cli import main
from lapp_edge.deploy.package import load_package
from lapp_edge.errors import UserError
from tests.tiny_package import MANIFEST, MODEL_FILE, rehash, sha256, write_manifest, write_tiny_package

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def no_runtime(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records any attempt to load a model in ONNX Runtime (none may happen for a refused package)."""
    import onnxruntime

    loads: list[str] = []

    def refuse(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        loads.append(str(path))
        raise AssertionError(f"a runtime was asked to load {path}")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    return loads


def refusal(package: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """`bench PACKAGE`: exit 2, one line; returns that line with the package path removed."""
    code = main(["bench", str(package), "--target", "x86-ort-fp32"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("lapp-edge: error: "), err
    return err.replace(str(package), "PKG").replace(str(package.parent), "DIR")


def add_listed(package: Path, name: str, digest: str | None = None) -> None:
    manifest = json.loads((package / MANIFEST).read_text())
    manifest["files"][name] = digest or "0" * 64
    write_manifest(package, manifest)


def test_the_tiny_package_is_valid(tmp_path: Path) -> None:
    package = load_package(write_tiny_package(tmp_path / "pkg"))
    assert package.input_shape == (1, 28, 28)


ESCAPING = ["../outside/secret.txt", "a/../../outside/secret.txt", "./model.onnx", "a//b", "a\\..\\b", "sub/./x", "",
            "model.onnx/", "a\nb", "..", "."]


@pytest.mark.parametrize("name", ESCAPING + ["ABSOLUTE"])
def test_names_outside_the_package_are_refused_alike_whether_the_target_exists(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_runtime: list[str]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("outside the package")
    if name == "ABSOLUTE":
        name = str(secret)
    answers = []
    for exists in (True, False):
        package = write_tiny_package(tmp_path / f"pkg{exists}")
        add_listed(package, name, sha256(secret))
        if not exists:
            secret.unlink()
        answers.append(refusal(package, capsys).replace("pkgTrue", "PKG").replace("pkgFalse", "PKG"))
    assert answers[0] == answers[1], answers
    assert "not a plain relative path" in answers[0]
    assert not no_runtime


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(st.sampled_from(["..", ".", "", "a", "b.bin", "/", "\x00", "~"]), min_size=1, max_size=5))
@example(parts=["..", "a"])
def test_generated_escaping_names_never_reach_the_file_system(parts: list[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    name = "/".join(parts)
    plain = name and all(part not in ("", ".", "..") for part in name.split("/")) and "\x00" not in name
    if plain:
        return
    package = write_tiny_package(tmp_path_factory.mktemp("gen") / "pkg")
    add_listed(package, name)
    with pytest.raises(UserError, match="not a plain relative path"):
        load_package(package)


@pytest.mark.parametrize("member", [MODEL_FILE, "extra.bin"])
def test_symbolic_links_are_refused_alike_whether_their_target_exists(
        member: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_runtime: list[str]) -> None:
    answers = []
    for exists in (True, False):
        package = write_tiny_package(tmp_path / f"pkg{exists}")
        target = tmp_path / f"elsewhere{exists}.onnx"
        target.write_bytes((package / MODEL_FILE).read_bytes())
        if member == MODEL_FILE:
            (package / MODEL_FILE).unlink()
        os.symlink(target, package / member)
        add_listed(package, member, sha256(target))
        if not exists:
            target.unlink()
        answers.append(refusal(package, capsys).replace("pkgTrue", "PKG").replace("pkgFalse", "PKG"))
    assert answers[0] == answers[1] and "symbolic link" in answers[0], answers
    assert not no_runtime


def test_a_linked_directory_inside_the_package_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = write_tiny_package(tmp_path / "pkg")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hostname").write_text("box\n")
    os.symlink(tmp_path / "etc", package / "sub")
    add_listed(package, "sub/hostname", sha256(tmp_path / "etc" / "hostname"))
    assert "symbolic link" in refusal(package, capsys)


def test_special_files_are_refused_without_blocking(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = write_tiny_package(tmp_path / "pkg")
    os.mkfifo(package / "pipe")
    add_listed(package, "pipe")
    assert "special file" in refusal(package, capsys)


def test_unlisted_files_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = write_tiny_package(tmp_path / "pkg")
    (package / "notes.txt").write_text("not in the manifest")
    assert "not listed" in refusal(package, capsys)


def external_package(directory: Path, location: str, list_it: bool) -> Path:
    """The 03 reproducer's package: model.onnx keeps its weight in an external-data file."""
    package = write_tiny_package(directory)
    model = onnx.load(str(package / MODEL_FILE))
    weight = next(t for t in model.graph.initializer if t.name == "fc.weight")
    raw = onnx.numpy_helper.to_array(weight).tobytes()
    data_file = package / "weights.bin" if "/" not in location else directory.parent / "weights.bin"
    data_file.write_bytes(raw)
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    (package / MODEL_FILE).write_bytes(model.SerializeToString())
    rehash(package)
    if list_it:
        add_listed(package, location, sha256(data_file))
    return package


def test_unlisted_external_data_is_refused_even_when_hashes_match(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  no_runtime: list[str]) -> None:
    package = external_package(tmp_path / "pkg", "weights.bin", list_it=False)
    assert "weights.bin" in refusal(package, capsys)
    # the same, with the extra file gone: the model still names it, so it is still refused
    (package / "weights.bin").unlink()
    assert "weights.bin" in refusal(package, capsys)
    assert not no_runtime


def test_external_data_outside_the_package_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = external_package(tmp_path / "pkg", "../weights.bin", list_it=False)
    assert "not a plain relative path" in refusal(package, capsys)


def test_listed_and_hashed_external_data_is_part_of_the_package(tmp_path: Path) -> None:
    import onnxruntime

    package = load_package(external_package(tmp_path / "pkg", "weights.bin", list_it=True))
    session = onnxruntime.InferenceSession(str(package.onnx_path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((2, 1, 28, 28), np.float32)})[0].shape == (2, 10)
    # and changing it is tampering, caught by its hash
    data = bytearray((package.directory / "weights.bin").read_bytes())
    data[0] ^= 1
    (package.directory / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(UserError, match="weights.bin does not match its sha256"):
        load_package(package.directory)


def test_manifest_itself_must_be_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = write_tiny_package(tmp_path / "pkg")
    (package / MANIFEST).rename(tmp_path / "real-manifest.json")
    os.symlink(tmp_path / "real-manifest.json", package / MANIFEST)
    assert "symbolic link" in refusal(package, capsys)
