"""A shipped model package: a directory with `model.onnx` and `manifest.json`.

The manifest records, among the export details, the sha256 of every other file in the
package. A package is a closed set: regular files under its directory, each listed in
`files` under a plain relative name and matching its sha256, nothing else (no link, no
special file, no unlisted file, no name outside the directory); model.onnx may keep
tensors in ONNX external-data files only if they are listed files. `load_package` checks
all of it, and the manifest's fields below, before any runtime sees a file, and refuses
anything else in one line (UserError, exit 2). Names are judged by their text first, so
the answer never depends on what exists outside the package. This module reads JSON,
parses ONNX (onnx, no runtime) and hashes files only: it imports nothing from the training
side, so shipped runners and backends can use it.

Manifest fields every reader may rely on:
    format: 1
    model: family name (e.g. "resnet20"); dataset: e.g. "fashion-mnist"
    data (optional, newer packages): {"dataset", "data_dir": absolute path the model was trained/verified
            on, "test_split": "test" | "val", and for imagefolder "resize_shorter_side", "center_crop",
            "image_mode": how an image becomes the input (resize the shorter side, centre crop, L/RGB)}
    input: {"name": str, "shape": [C, H, W] (the batch axis is dynamic), "mean": [...], "std": [...],
            "layout": "NCHW", "scale": "pixels/255 then (x - mean) / std"}
    output: {"name": str, "num_classes": int}
    class_names: [...]
    widths, dense_widths: {site name: channels}
    flops: {"dense_macs": float, "slim_macs": float, "ratio": float}
    params: {"dense": int, "slim": int}
    files: {relative path: sha256 hex}
    latency_budgets (optional, latency-constrained runs): [{"target": profile name, "budget_ratio": share of
            the dense latency in (0, 1], "batch": int}]: what the run was shaped for (bench reports how far off)
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lapp_edge.errors import UserError
from lapp_edge.fileio import check_relative_name, missing_text, open_regular_under, read_json_under, regular_files_under, shown

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
PACKAGE_FORMAT = 1
MAX_MANIFEST_BYTES = 1 << 20     # a real manifest is ~10 KiB
MAX_MODEL_BYTES = 2 << 30        # protobuf's own limit for one ONNX file
MAX_CHANNELS, MAX_SIDE, MAX_CLASSES, MAX_TEXT = 16, 1024, 25_000, 256
MAX_LATENCY_BUDGETS = 16         # targets a run may be shaped for at once
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelPackage:
    directory: Path
    manifest: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def input_name(self) -> str:
        return str(self.manifest["input"]["name"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest["input"]["shape"]
        return int(c), int(h), int(w)

    @property
    def name(self) -> str:
        return self.directory.name


class _Fields:
    """Type checks that name the manifest and the field in one line."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, wanted: str, value: Any) -> UserError:
        return UserError(f"{self.where}: {field} must be {wanted}, not {shown(value)}")

    def mapping(self, parent: dict[str, Any], key: str, field: str) -> dict[str, Any]:
        value = parent.get(key)
        if not isinstance(value, dict):
            raise self.fail(field, "an object", value)
        return value

    def text(self, parent: dict[str, Any], key: str, field: str) -> str:
        value = parent.get(key)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT or not value.isprintable():
            raise self.fail(field, f"a printable string of 1-{MAX_TEXT} characters", value)
        return value

    def integer(self, value: Any, field: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(field, f"an integer in [{low}, {high}]", value)
        return value

    def number(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise self.fail(field, "a finite non-negative number", value)
        return float(value)


def check_manifest(manifest: Any, where: str) -> None:
    """The manifest's schema: every field a reader of the package relies on, with its type and
    range (UserError naming the manifest and the field)."""
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise UserError(f"{where} is not a lapp-edge manifest (format {PACKAGE_FORMAT})")
    f = _Fields(where)
    f.text(manifest, "model", "model")
    f.text(manifest, "dataset", "dataset")
    model_input = f.mapping(manifest, "input", "input")
    f.text(model_input, "name", "input.name")
    shape = model_input.get("shape")
    if not isinstance(shape, list) or len(shape) != 3:
        raise f.fail("input.shape", "[C, H, W]", shape)
    channels = f.integer(shape[0], "input.shape[0] (channels)", 1, MAX_CHANNELS)
    for index in (1, 2):
        f.integer(shape[index], f"input.shape[{index}]", 1, MAX_SIDE)
    for key in ("mean", "std"):
        values = model_input.get(key)
        if not isinstance(values, list) or len(values) != channels:
            raise f.fail(f"input.{key}", f"a list of {channels} number(s), one per channel", values)
        for index, value in enumerate(values):
            f.number(value, f"input.{key}[{index}]")
    if any(value <= 0 for value in model_input["std"]):
        raise f.fail("input.std", "positive", model_input["std"])
    output = f.mapping(manifest, "output", "output")
    f.text(output, "name", "output.name")
    classes = f.integer(output.get("num_classes"), "output.num_classes", 1, MAX_CLASSES)
    names = manifest.get("class_names")
    if not isinstance(names, list) or len(names) != classes or any(
            not isinstance(n, str) or len(n) > MAX_TEXT for n in names):
        raise f.fail("class_names", f"a list of output.num_classes ({classes}) names", names)
    for key in ("widths", "dense_widths"):
        for site, width in f.mapping(manifest, key, key).items():
            if len(site) > MAX_TEXT:
                raise f.fail(key, "layer names of at most 256 characters", site)
            # a slim width may be 0: a removed residual branch (--block-removal; the spec check says where)
            f.integer(width, f"{key}[{site[:60]!r}]", 0 if key == "widths" else 1, 1 << 20)
    flops = f.mapping(manifest, "flops", "flops")
    for key in ("dense_macs", "slim_macs", "ratio"):
        f.number(flops.get(key), f"flops.{key}")
    params = f.mapping(manifest, "params", "params")
    for key in ("dense", "slim"):
        f.integer(params.get(key), f"params.{key}", 0, 1 << 40)
    figures = manifest.get("figures", {})
    if not isinstance(figures, dict):
        raise f.fail("figures", "an object", figures)
    for side in ("dense", "slim"):
        if side in figures:
            for key, value in f.mapping(figures, side, f"figures.{side}").items():
                f.number(value, f"figures.{side}.{key[:40]}")
    budgets = manifest.get("latency_budgets", [])
    if not isinstance(budgets, list) or len(budgets) > MAX_LATENCY_BUDGETS:
        raise f.fail("latency_budgets", f"a list of at most {MAX_LATENCY_BUDGETS} budgets", budgets)
    for index, budget in enumerate(budgets):
        entry = f.mapping({"budget": budget}, "budget", f"latency_budgets[{index}]")
        f.text(entry, "target", f"latency_budgets[{index}].target")
        ratio = f.number(entry.get("budget_ratio"), f"latency_budgets[{index}].budget_ratio")
        if not 0 < ratio <= 1:
            raise f.fail(f"latency_budgets[{index}].budget_ratio", "in (0, 1]", ratio)
        f.integer(entry.get("batch"), f"latency_budgets[{index}].batch", 1, 1 << 16)
        if not isinstance(entry.get("ceiling", False), bool):
            raise f.fail(f"latency_budgets[{index}].ceiling", "true or false", entry.get("ceiling"))
    files = f.mapping(manifest, "files", "files")
    if MODEL_FILE not in files:
        raise UserError(f"{where}: files does not list {MODEL_FILE}")
    for name, digest in files.items():
        check_relative_name(name, f"{where}: files")
        if name == MANIFEST:
            raise UserError(f"{where}: files lists {MANIFEST} itself")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise f.fail(f"files[{name!r}]", "a sha256 (64 lowercase hex digits)", digest)


def _graph_tensors(graph: Any) -> Any:
    """Every TensorProto of an ONNX graph: initializers, sparse ones, and its nodes' attributes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Any) -> Any:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            sparse_tensors = [*([attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []), *attribute.sparse_tensors]
            for sparse in sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


def check_external_data(model_bytes: bytes, where: str, files: dict[str, str]) -> None:
    """model.onnx may keep tensors in external-data files only if each is a listed package file
    (so hashed, regular and inside); anything else is refused before a runtime loads it.
    With `files` empty: the model must be self-contained."""
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(model_bytes)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise UserError(f"{where} is not an ONNX model ({str(error)[:100]})") from None
    if not model.HasField("graph"):
        raise UserError(f"{where} is not an ONNX model (no graph)")
    tensors = [*_graph_tensors(model.graph), *(t for function in model.functions for t in _node_tensors(function.node))]
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not len(tensor.external_data):
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location")
        check_relative_name(location, f"{where}: external data of {tensor.name[:60]!r}")
        if location not in files:
            raise UserError(f"{where} keeps {tensor.name[:60]!r} in the external file {location!r}, "
                            f"which is not a listed, hashed file (unhashed weights are not loaded)")


def check_hashes(directory: Path, manifest: dict[str, Any]) -> None:
    """The package is exactly manifest.json plus the listed files, all regular files under
    `directory`, each matching its sha256; model.onnx's external data (if any) is listed."""
    files: dict[str, str] = manifest["files"]
    where = f"model package {directory}"
    present = set(regular_files_under(directory, where))
    missing = sorted(set(files) - present)
    if missing:
        raise UserError(f"{where} is missing {missing[0]}")
    unlisted = sorted(present - set(files) - {MANIFEST})
    if unlisted:
        raise UserError(f"{where}: {shown(unlisted[0])} is not listed in {MANIFEST}; a package holds only listed, hashed files")
    model_bytes = b""
    for relative, expected in files.items():
        handle = open_regular_under(directory, relative, where)
        if os.fstat(handle).st_size > MAX_MODEL_BYTES:
            os.close(handle)
            raise UserError(f"{where}: {relative} is larger than {MAX_MODEL_BYTES} bytes")
        with os.fdopen(handle, "rb") as stream:
            if relative == MODEL_FILE:      # hashed and parsed from the same bytes
                model_bytes = stream.read()
                digest = hashlib.sha256(model_bytes).hexdigest()
            else:
                digest = _stream_sha256(stream)
        if digest != expected:
            raise UserError(f"{where}: {relative} does not match its sha256 in the manifest (tampered or corrupt)")
    check_external_data(model_bytes, f"{where}: {MODEL_FILE}", files)


def _stream_sha256(stream: Any) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def load_package(directory: str | Path, check: bool = True) -> ModelPackage:
    """Read a package's manifest (bounded, schema-checked) and (by default) check the package's
    files: the closed set, their sha256, model.onnx's external data. UserError otherwise."""
    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"model package {path} {missing_text(path)}")
    if not os.path.lexists(path / MANIFEST):
        raise UserError(f"{path} is not a model package: {MANIFEST} is missing")
    where = str(path / MANIFEST)
    manifest = read_json_under(path, MANIFEST, MAX_MANIFEST_BYTES)
    check_manifest(manifest, where)
    if check:
        check_hashes(path, manifest)
    return ModelPackage(path, manifest)


def recorded_data_dir(manifest: dict[str, Any]) -> str | None:
    """The data directory a package's manifest records (None: older packages, or not recorded)."""
    data = manifest.get("data")
    directory = data.get("data_dir") if isinstance(data, dict) else None
    return directory if isinstance(directory, str) and directory else None
