"""Verification of an exported model: ONNX Runtime CPU against the PyTorch eval model on the
same real test images (max |logit difference| and top-1 agreement), and of a whole package."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lapp_edge.data.imagefolder import FolderLayout, layout_from_manifest, load_eval_split
from lapp_edge.data.readers import data_directory
from lapp_edge.data.torch_data import DatasetInfo, InMemorySplit, iterate_batches, load_dataset
from lapp_edge.deploy.package import MANIFEST, load_package, recorded_data_dir
from lapp_edge.deploy.tolerance import EXPORT_FP32, LogitComparison, compare_logits
from lapp_edge.errors import UserError
from lapp_edge.export.onnx import check_graph
from lapp_edge.models.fuse import fuse_model
from lapp_edge.models.spec import SLIM_SPEC, SLIM_WEIGHTS, ArchitectureSpec, load_slim_model

VERIFY_IMAGES = 1000
VERIFY_BATCH = 128            # 1000 images -> batches of 128 and a last one of 104 (exercises the dynamic axis)


@dataclass
class Verification:
    """ONNX Runtime CPU against the PyTorch eval model on the same real test images, under the
    scale-aware fp32 tolerance (`lapp_edge.deploy.tolerance.EXPORT_FP32`)."""

    images: int
    max_abs_diff: float
    top1_agreement: float
    onnx_top1: float          # accuracy of the ONNX model on these images (labels from the dataset)
    torch_top1: float
    tolerance: dict[str, Any] = field(default_factory=EXPORT_FP32.to_dict)
    max_rel_diff: float = 0.0          # max over images of max|ORT - PyTorch| / max|PyTorch logit|
    worst_excess: float = 0.0          # max |diff| / allowed over all logits (<= 1 passes)
    top1_disagreements: int = 0        # images where top-1 differs although the reference margin exceeds 2 x allowed
    near_ties: int = 0                 # images whose top-2 logits lie within 2 x allowed of each other
    provider: str = "CPUExecutionProvider"
    graph_optimization: str = "ORT_ENABLE_ALL"

    @property
    def passed(self) -> bool:
        return self.worst_excess <= 1.0 and self.top1_disagreements == 0

    def failure(self) -> str:
        tolerance = self.tolerance
        return (f"ONNX Runtime disagrees with PyTorch on {self.images} test images: max |diff| {self.max_abs_diff:.3g} "
                f"({self.max_rel_diff:.2g} of the largest |logit|; {self.worst_excess:.3g} x the allowed "
                f"{tolerance.get('atol')} + {tolerance.get('rtol')} * max|logit|), top-1 differs on {self.top1_disagreements} "
                "image(s) that are not near ties")


def ort_session(model: bytes | str | os.PathLike[str], threads: int = 0) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - a model ORT cannot load is bad input
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"ONNX Runtime cannot load the model: {first[:200]}") from None


def verification_split(split: object, count: int) -> object:
    """The first `count` test images (a fixed, ordered sample)."""
    if isinstance(split, InMemorySplit):
        return InMemorySplit(split.images[:count], split.labels[:count])
    size = len(split)  # type: ignore[arg-type]
    return torch.utils.data.Subset(split, range(min(count, size)))  # type: ignore[arg-type]


def verification_data(dataset_name: str, data_dir: str | None, images: int, spec: ArchitectureSpec,
                      layout: FolderLayout | None = None) -> tuple[object, DatasetInfo]:
    """The first `images` test images, normalised as the model was trained (the spec's mean/std).
    ImageFolder data: val/ labelled with the model's class names, preprocessed with `layout`
    (the package's; default: resize to the input size), only those images decoded."""
    if dataset_name == "imagefolder":
        layout = layout or FolderLayout(spec.input_size, spec.in_channels, spec.input_size)
        split = load_eval_split(data_directory(dataset_name, data_dir), list(spec.class_names), layout, images)
        info = DatasetInfo(dataset_name, spec.in_channels, spec.num_classes, spec.input_size, list(spec.mean), list(spec.std),
                           list(spec.class_names))
        return split, info
    data = load_dataset(dataset_name, data_dir)
    info = replace(data.info, mean=list(spec.mean) or data.info.mean, std=list(spec.std) or data.info.std)
    if (info.in_channels, info.input_size) != (spec.in_channels, spec.input_size):
        raise UserError(f"{dataset_name} images are {info.in_channels}x{info.input_size}x{info.input_size}; the model takes "
                        f"{spec.in_channels}x{spec.input_size}x{spec.input_size}")
    return verification_split(data.test, images), info


@torch.no_grad()
def compare_with_torch(
    session: Any, reference: nn.Module, dataset_name: str, spec: ArchitectureSpec, data_dir: str | None = None,
    images: int = VERIFY_IMAGES, layout: FolderLayout | None = None,
) -> Verification:
    """Run the ONNX session and the PyTorch eval model on the first `images` test images."""
    split, info = verification_data(dataset_name, data_dir, images, spec, layout)
    reference = reference.eval()
    input_name = session.get_inputs()[0].name
    comparison: LogitComparison | None = None
    onnx_correct, torch_correct, seen = 0, 0, 0
    for batch, labels in iterate_batches(split, info, VERIFY_BATCH, torch.device("cpu")):
        expected = reference(batch).numpy()
        result = session.run(None, {input_name: batch.numpy()})[0]
        if result.shape != expected.shape:
            raise UserError(f"the ONNX model returns shape {list(result.shape)}, PyTorch {list(expected.shape)}")
        batch_comparison = compare_logits(result, expected, EXPORT_FP32)
        comparison = batch_comparison if comparison is None else comparison.merge(batch_comparison)
        truth = labels.numpy()
        onnx_correct += int((result.argmax(1) == truth).sum())
        torch_correct += int((expected.argmax(1) == truth).sum())
        seen += len(truth)
    if seen == 0 or comparison is None:
        raise UserError(f"the {dataset_name} test split holds no images to verify with")
    return Verification(seen, comparison.max_abs_diff, comparison.top1_agreement, onnx_correct / seen, torch_correct / seen,
                        EXPORT_FP32.to_dict(), comparison.max_rel_diff, comparison.worst_excess,
                        comparison.top1_disagreements, comparison.near_ties)


def verify_package(directory: str | Path, data_dir: str | None = None, images: int = VERIFY_IMAGES) -> Verification:
    """Check every file's sha256, rebuild the PyTorch reference from the package's own spec and
    weights, and re-run the ONNX Runtime comparison on the test images of the data directory the
    manifest records (`data_dir` overrides it). Raises UserError on any failure."""
    package = load_package(directory)
    manifest = package.manifest
    try:
        dataset = str(manifest["dataset"])
        input_name, output_name = str(manifest["input"]["name"]), str(manifest["output"]["name"])
        mean, std = list(manifest["input"]["mean"]), list(manifest["input"]["std"])
    except (KeyError, TypeError) as error:
        raise UserError(f"{package.directory / MANIFEST} lacks a required field: {error}") from None
    for name in (SLIM_SPEC, SLIM_WEIGHTS):
        if name not in manifest["files"]:
            raise UserError(f"{package.directory / MANIFEST} does not list {name}: cannot rebuild the PyTorch reference")
    model, spec = load_slim_model(package.directory)
    if list(package.input_shape) != [spec.in_channels, spec.input_size, spec.input_size]:
        raise UserError(f"{package.directory}: the manifest's input shape {list(package.input_shape)} does not match {SLIM_SPEC}")
    session = ort_session(package.onnx_path)
    if [i.name for i in session.get_inputs()] != [input_name] or [o.name for o in session.get_outputs()] != [output_name]:
        raise UserError(f"{package.onnx_path} does not have the input/output names its manifest states")
    graph = check_graph(package.onnx_path.read_bytes(), fuse_model(model))
    if graph.problem():
        raise UserError(f"{package.onnx_path}: {graph.problem()}")
    if not (np.allclose(mean, spec.mean) and np.allclose(std, spec.std)):
        raise UserError(f"{package.directory / MANIFEST}: the normalisation it states ({mean}, {std}) differs from "
                        f"{SLIM_SPEC}'s ({spec.mean}, {spec.std})")
    layout = layout_from_manifest(manifest) if dataset == "imagefolder" else None
    verification = compare_with_torch(session, model, dataset, spec, data_dir or recorded_data_dir(manifest), images, layout)
    if not verification.passed:
        raise UserError(f"{package.directory} failed verification: {verification.failure()}")
    return verification
