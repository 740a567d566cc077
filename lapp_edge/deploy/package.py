"""A shipped model package: a directory with `model.onnx` and `manifest.json`.

The manifest records, among the export details, the sha256 of every other file in the
package; `load_package` refuses a package whose files do not match (one line, exit 2 via
UserError). This module reads JSON and hashes files only: it imports no runtime and
nothing from the training side, so shipped runners and backends can use it.

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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lapp_edge.errors import UserError
from lapp_edge.fileio import read_json

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
PACKAGE_FORMAT = 1


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


def check_hashes(directory: Path, manifest: dict[str, Any]) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise UserError(f"{directory / MANIFEST} lists no file hashes")
    for relative, expected in files.items():
        path = directory / relative
        if not path.is_file():
            raise UserError(f"model package {directory} is missing {relative}")
        if sha256_of(path) != expected:
            raise UserError(f"model package {directory}: {relative} does not match its sha256 in the manifest (tampered or corrupt)")


def load_package(directory: str | Path, check: bool = True) -> ModelPackage:
    """Read a package's manifest and (by default) verify every file's sha256."""
    path = Path(directory)
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path} is not a model package: {MANIFEST} is missing")
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise UserError(f"{path / MANIFEST} is not a lapp-edge manifest (format {PACKAGE_FORMAT})")
    if check:
        check_hashes(path, manifest)
    return ModelPackage(path, manifest)


def recorded_data_dir(manifest: dict[str, Any]) -> str | None:
    """The data directory a package's manifest records (None: older packages, or not recorded)."""
    data = manifest.get("data")
    directory = data.get("data_dir") if isinstance(data, dict) else None
    return directory if isinstance(directory, str) and directory else None
