"""The INT8 calibration set: a fixed, seeded sample of a dataset's training split.

A definition is a small YAML file in `calibration-sets/` (name, dataset, split, count, seed;
found by `lapp_edge.resources.find_calibration_set`);
every backend quantizes with the same images, normalised with the model package's own
mean/std, and the bench reports the set's fingerprint (sha256 of the chosen images) so
"same calibration set" can be checked. Imports no runtime and nothing from training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from lapp_edge.data.imagefolder import FolderLayout, FolderSplit, decode_split, scan_split
from lapp_edge.data.readers import DATASETS, Dataset, InMemorySplit, data_directory, load_arrays
from lapp_edge.errors import UserError
from lapp_edge.fileio import read_yaml, shown
from lapp_edge.resources import find_calibration_set

MAX_COUNT = 100_000        # calibration images (ours: 512)


@dataclass(frozen=True)
class CalibrationDefinition:
    name: str
    dataset: str
    split: str
    count: int
    seed: int


@dataclass
class CalibrationSet:
    definition: CalibrationDefinition
    indices: np.ndarray            # positions in the split, in draw order
    images: np.ndarray             # float32 N x C x H x W, normalised
    fingerprint: str               # sha256 (first 16 hex) of the uint8 images, in order


def load_definition(name: str) -> CalibrationDefinition:
    """A calibration-set definition by name or path. Raises UserError for a missing file, a
    file that is too large or uses YAML anchors/aliases (fileio.read_yaml), or a bad field
    (one line naming the file and the field)."""
    path = find_calibration_set(name)
    payload: Any = read_yaml(path)
    if not isinstance(payload, dict):
        raise UserError(f"{path} must be a mapping with name, dataset, split, count, seed")
    missing = [key for key in ("name", "dataset", "split", "count", "seed") if key not in payload]
    if missing:
        raise UserError(f"{path} is missing field(s): {', '.join(missing)}")
    if not isinstance(payload["name"], str) or not 0 < len(payload["name"]) <= 100 or not payload["name"].isprintable():
        raise UserError(f"{path}: name must be a printable string of 1-100 characters, not {shown(payload['name'])}")
    if not isinstance(payload["dataset"], str) or payload["dataset"] not in DATASETS:
        raise UserError(f"{path}: unknown dataset {shown(payload['dataset'])}; choose one of: {', '.join(DATASETS)}")
    if not isinstance(payload["split"], str) or payload["split"] not in ("train", "test"):
        raise UserError(f"{path}: split must be train or test, not {shown(payload['split'])}")
    if isinstance(payload["count"], bool) or not isinstance(payload["count"], int) or not 0 < payload["count"] <= MAX_COUNT:
        raise UserError(f"{path}: count must be a positive integer (at most {MAX_COUNT})")
    if isinstance(payload["seed"], bool) or not isinstance(payload["seed"], int) or not 0 <= payload["seed"] < 2**32:
        raise UserError(f"{path}: seed must be an integer in [0, 2^32)")
    return CalibrationDefinition(payload["name"], payload["dataset"], payload["split"], payload["count"], payload["seed"])


def normalize_uint8(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 N x C x H x W -> float32 (pixels / 255 - mean) / std, per channel."""
    scale = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    spread = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((images.astype(np.float32) / np.float32(255.0) - scale) / spread).astype(np.float32)


def draw_calibration(
    definition: CalibrationDefinition, mean: list[float], std: list[float], dataset: Dataset | None = None,
    data_dir: str | None = None, folder: tuple[FolderLayout, list[str]] | None = None,
) -> CalibrationSet:
    """Draw the definition's images (seeded, without replacement) and normalise them with the
    model's own `mean`/`std`. Returns float32 N x C x H x W images and their fingerprint.
    ImageFolder data needs `folder` (the model's image layout and class names): only the drawn
    images are decoded. Raises UserError when the split has fewer images than asked for.""" 
    if definition.dataset == "imagefolder" and dataset is None:
        if folder is None:
            raise UserError(f"calibration set {definition.name} draws from ImageFolder data: it needs the model's image layout")
        layout, classes = folder
        tree = scan_split(data_directory("imagefolder", data_dir) / ("train" if definition.split == "train" else "val"),
                          list(classes) if definition.split == "test" else None)[0]
        if definition.count > len(tree):
            raise UserError(f"calibration set {definition.name} asks for {definition.count} images; the split has {len(tree)}")
        indices = np.random.default_rng(definition.seed).choice(len(tree), size=definition.count, replace=False)
        raw = decode_split(FolderSplit(tree.root, [tree.paths[i] for i in indices], tree.labels[indices], []), layout).images
    else:
        data = dataset or load_arrays(definition.dataset, data_dir)
        split = data.train if definition.split == "train" else data.test
        if not isinstance(split, InMemorySplit):
            raise UserError(f"calibration draws from in-memory datasets only; {definition.dataset} is not one")
        if definition.count > len(split):
            raise UserError(f"calibration set {definition.name} asks for {definition.count} images; the split has {len(split)}")
        indices = np.random.default_rng(definition.seed).choice(len(split), size=definition.count, replace=False)
        raw = split.images[indices]
    fingerprint = hashlib.sha256(np.ascontiguousarray(raw).tobytes()).hexdigest()[:16]
    return CalibrationSet(definition, indices, normalize_uint8(raw, mean, std), fingerprint)
