"""Export a finished run's slim model as a verified, self-contained model package.

    run dir (architecture.json, slim_model.pt, report.json)
        -> fuse (every BN folded, every bypass added to its main kernel: plain convs with bias)
        -> ONNX (torch.onnx.export(dynamo=True), opset 18, dynamic batch, "input" -> "logits")
        -> onnx.checker + graph check (no BatchNormalization, one Conv per fused nn.Conv2d)
        -> ONNX Runtime CPU (ORT_ENABLE_ALL) vs the unfused PyTorch eval model on 1000 real
           test images: max |diff| <= 1e-4 and identical top-1
        -> package dir: model.onnx, architecture.json, slim_model.pt, manifest.json

The package is assembled in a temporary sibling directory and renamed into place only after
verification passed, so a model that fails is never written as shipped. The package carries
the architecture spec and the slim state dict, so `verify_package` can rebuild the PyTorch
reference without the training run. The manifest follows the contract in
`lapp_edge/package.py`.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lapp_edge.data import InMemorySplit, iterate_batches, load_dataset
from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_bytes, atomic_write_json, read_json
from lapp_edge.fuse import fuse_model
from lapp_edge.lapp.flops import count_deployed_macs, count_deployed_params
from lapp_edge.models import build_model
from lapp_edge.package import MANIFEST, MODEL_FILE, PACKAGE_FORMAT, load_package, sha256_of
from lapp_edge.spec import SLIM_SPEC, SLIM_WEIGHTS, ArchitectureSpec, load_slim_model

OPSET = 18                    # the lowest opset the dynamo exporter emits natively (17 fails)
EXPORTER = "torch.onnx.export(dynamo=True)"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
TOLERANCE = 1e-4              # fp32 max |ORT - PyTorch| over the logits
VERIFY_IMAGES = 1000
VERIFY_BATCH = 128            # 1000 images -> batches of 128 and a last one of 104 (exercises the dynamic axis)
RUN_REPORT = "report.json"
RUN_CONFIG = "config.json"


@dataclass
class Verification:
    """ONNX Runtime CPU against the PyTorch eval model on the same real test images."""

    images: int
    max_abs_diff: float
    top1_agreement: float
    onnx_top1: float          # accuracy of the ONNX model on these images (labels from the dataset)
    torch_top1: float
    tolerance: float = TOLERANCE
    provider: str = "CPUExecutionProvider"
    graph_optimization: str = "ORT_ENABLE_ALL"

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.top1_agreement == 1.0

    def failure(self) -> str:
        return (f"ONNX Runtime disagrees with PyTorch on {self.images} test images: max |diff| "
                f"{self.max_abs_diff:.3g} (limit {self.tolerance:g}), top-1 agreement {self.top1_agreement:.4f} (need 1.0)")


@dataclass
class GraphCheck:
    """What the exported graph contains, against what the fused PyTorch model holds."""

    op_counts: dict[str, int]
    conv_nodes: int
    expected_convs: int       # nn.Conv2d modules in the fused model

    def problem(self) -> str | None:
        if self.op_counts.get("BatchNormalization", 0):
            return f"the exported graph still holds {self.op_counts['BatchNormalization']} BatchNormalization nodes"
        if self.conv_nodes != self.expected_convs:
            return f"the exported graph has {self.conv_nodes} Conv nodes, the fused model {self.expected_convs} convs"
        return None


# --- export ------------------------------------------------------------------------------

def fused_conv_count(fused: nn.Module) -> int:
    return sum(1 for m in fused.modules() if isinstance(m, nn.Conv2d))


def strip_build_metadata(model_proto: Any) -> None:
    """Drop the exporter's per-node metadata (stack traces with this machine's absolute paths,
    FX node dumps): it changes nothing in the graph, makes the file 15% larger and the bytes
    depend on where the checkout lives."""
    for node in model_proto.graph.node:
        del node.metadata_props[:]
    for info in model_proto.graph.value_info:
        del info.metadata_props[:]
    for tensor in model_proto.graph.initializer:
        del tensor.metadata_props[:]


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], opset: int = OPSET) -> bytes:
    """One self-contained ONNX file (weights inline) with a dynamic batch axis."""
    import onnx

    example = torch.zeros(2, *input_shape)
    try:
        program = torch.onnx.export(
            model.eval(), (example,), dynamo=True, opset_version=opset, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    except Exception as error:  # noqa: BLE001 - any exporter failure is reported in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"ONNX export failed: {first[:200]}") from None
    if program is None:
        raise UserError("ONNX export returned no program")
    proto = program.model_proto
    strip_build_metadata(proto)
    data = proto.SerializeToString()
    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except onnx.checker.ValidationError as error:
        raise UserError(f"the exported ONNX model fails onnx.checker: {str(error).splitlines()[0][:200]}") from None
    return data


def check_graph(onnx_bytes: bytes, fused: nn.Module) -> GraphCheck:
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    counts = dict(collections.Counter(node.op_type for node in graph.node))
    return GraphCheck(counts, counts.get("Conv", 0), fused_conv_count(fused))


# --- verification ------------------------------------------------------------------------

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


@torch.no_grad()
def compare_with_torch(
    session: Any, reference: nn.Module, dataset_name: str, data_dir: str | None = None,
    images: int = VERIFY_IMAGES, expected_stats: tuple[list[float], list[float]] | None = None,
) -> Verification:
    """Run the ONNX session and the PyTorch eval model on the first `images` test images."""
    data = load_dataset(dataset_name, data_dir)
    if expected_stats is not None and (
        not np.allclose(expected_stats[0], data.info.mean) or not np.allclose(expected_stats[1], data.info.std)
    ):
        raise UserError(f"the model's normalisation {expected_stats} differs from {dataset_name}'s ({data.info.mean}, {data.info.std})")
    reference = reference.eval()
    input_name = session.get_inputs()[0].name
    max_diff, agree, onnx_correct, torch_correct, seen = 0.0, 0, 0, 0, 0
    split = verification_split(data.test, images)
    for batch, labels in iterate_batches(split, data.info, VERIFY_BATCH, torch.device("cpu")):
        expected = reference(batch).numpy()
        result = session.run(None, {input_name: batch.numpy()})[0]
        if result.shape != expected.shape:
            raise UserError(f"the ONNX model returns shape {list(result.shape)}, PyTorch {list(expected.shape)}")
        batch_diff = float(np.abs(result - expected).max())
        max_diff = max(max_diff, batch_diff if math.isfinite(batch_diff) else math.inf)  # NaN must not pass
        onnx_top1, torch_top1, truth = result.argmax(1), expected.argmax(1), labels.numpy()
        agree += int((onnx_top1 == torch_top1).sum())
        onnx_correct += int((onnx_top1 == truth).sum())
        torch_correct += int((torch_top1 == truth).sum())
        seen += len(truth)
    if seen == 0:
        raise UserError(f"the {dataset_name} test split holds no images to verify with")
    return Verification(seen, max_diff, agree / seen, onnx_correct / seen, torch_correct / seen)


# --- the package ---------------------------------------------------------------------------

def run_dataset(run_dir: Path, report: dict[str, Any]) -> tuple[str, str | None]:
    """The run's dataset name and data directory (config.json, else the report)."""
    config = read_json(run_dir / RUN_CONFIG) if (run_dir / RUN_CONFIG).is_file() else report.get("config", {})
    if not isinstance(config, dict):
        raise UserError(f"{run_dir / RUN_CONFIG} is not a run configuration")
    name = config.get("dataset") or report.get("dataset")
    if not isinstance(name, str):
        raise UserError(f"{run_dir} does not say which dataset it was trained on")
    data_dir = config.get("data_dir")
    return name, data_dir if isinstance(data_dir, str) else None


def read_run_report(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / RUN_REPORT).is_file():
        raise UserError(f"{run_dir} holds no finished model ({RUN_REPORT} is missing)")
    report = read_json(run_dir / RUN_REPORT)
    if not isinstance(report, dict) or not isinstance(report.get("flops"), dict) or not isinstance(report.get("accuracy"), dict):
        raise UserError(f"{run_dir / RUN_REPORT} is not a lapp-edge run report")
    return report


def model_figures(model: nn.Module, spec: ArchitectureSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """FLOPs (MACs) and params of the deployed network, dense and slim."""
    input_shape = (spec.in_channels, spec.input_size, spec.input_size)
    dense = build_model(spec.model, spec.in_channels, spec.num_classes, False)
    dense_macs, slim_macs = count_deployed_macs(dense, input_shape), count_deployed_macs(model, input_shape)
    flops = {
        "unit": "MACs (multiply-accumulates) of convs and linear layers of the deployed network; FLOPs = 2 x MACs",
        "dense_macs": dense_macs, "slim_macs": slim_macs, "ratio": slim_macs / dense_macs,
    }
    params = {
        "unit": "parameters of the deployed network (BN and bypass folded)",
        "dense": count_deployed_params(dense), "slim": count_deployed_params(model),
    }
    return flops, params


def check_report_matches(run_dir: Path, report: dict[str, Any], flops: dict[str, Any], params: dict[str, Any]) -> None:
    reported_macs = report["flops"].get("slim_macs")
    reported_params = report.get("params", {}).get("slim")
    if not isinstance(reported_macs, (int, float)) or not math.isclose(reported_macs, flops["slim_macs"], rel_tol=1e-9):
        raise UserError(f"{run_dir / RUN_REPORT} reports {reported_macs} slim MACs, the slim model has {flops['slim_macs']:.0f}: "
                        "the report does not belong to this model")
    if reported_params is not None and reported_params != params["slim"]:
        raise UserError(f"{run_dir / RUN_REPORT} reports {reported_params} slim params, the slim model has {params['slim']}")


def accuracy_from_report(report: dict[str, Any]) -> dict[str, Any]:
    epochs = report.get("epochs") or []
    config = report.get("config") or {}
    return {
        "test_top1": report["accuracy"].get("test_top1"),
        "test_images": config.get("test_subset") or "all",
        "train_top1_last_epoch": epochs[-1].get("train_top1") if epochs else None,
        "note": "from the run's report.json; train top-1 is the running figure over the last epoch's augmented batches",
    }


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def build_manifest(
    spec: ArchitectureSpec, dataset: str, flops: dict[str, Any], params: dict[str, Any], accuracy: dict[str, Any],
    graph: GraphCheck, verification: Verification, files: dict[str, str], source_run: Path,
) -> dict[str, Any]:
    return {
        "format": PACKAGE_FORMAT,
        "model": spec.model,
        "dataset": dataset,
        "input": {
            "name": INPUT_NAME, "shape": [spec.in_channels, spec.input_size, spec.input_size],
            "mean": list(spec.mean), "std": list(spec.std), "layout": "NCHW",
            "scale": "pixels/255 then (x - mean) / std",
        },
        "output": {"name": OUTPUT_NAME, "num_classes": spec.num_classes},
        "class_names": list(spec.class_names),
        "widths": dict(spec.widths),
        "dense_widths": dict(spec.dense_widths),
        "bypass_folded": spec.bypass,
        "flops": flops,
        "params": params,
        "accuracy": accuracy,
        "graph": {"op_counts": graph.op_counts, "conv_nodes": graph.conv_nodes},
        "verification": asdict(verification),
        "export": {"exporter": EXPORTER, "opset": OPSET, "dynamic_axes": {INPUT_NAME: [0], OUTPUT_NAME: [0]}, "versions": versions()},
        "source_run": str(source_run),
        "files": files,
    }


def prepare_out_dir(out: Path, weights_sha: str, spec_sha: str) -> bool:
    """True if `out` already holds this very model (same slim weights and spec), False if it is
    free (absent or empty). Anything else there is refused with nothing touched."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return False
    if not (out / MANIFEST).is_file():
        raise UserError(f"--out {out} already holds files that are not a model package; choose another --out")
    existing = load_package(out)  # raises on a tampered package
    files = existing.manifest["files"]
    if files.get(SLIM_WEIGHTS) == weights_sha and files.get(SLIM_SPEC) == spec_sha:
        return True
    raise UserError(f"--out {out} already holds a different model ({existing.manifest.get('model')}); "
                    "remove it or choose another --out")


def export_run(
    run_dir: str | Path, out_dir: str | Path, data_dir: str | None = None, images: int = VERIFY_IMAGES,
) -> dict[str, Any]:
    """Fuse, export, verify and package a finished run; returns the manifest.

    Re-exporting the identical model (same slim_model.pt and architecture.json) into a
    package that already holds it changes nothing: that package is re-verified and its
    manifest returned. Any other non-empty --out is refused."""
    run, out = Path(run_dir), Path(out_dir)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    report = read_run_report(run)
    model, spec = load_slim_model(run)
    weights_bytes, spec_bytes = (run / SLIM_WEIGHTS).read_bytes(), (run / SLIM_SPEC).read_bytes()
    weights_sha, spec_sha = hashlib.sha256(weights_bytes).hexdigest(), hashlib.sha256(spec_bytes).hexdigest()
    if prepare_out_dir(out, weights_sha, spec_sha):
        verify_package(out, data_dir, images)
        return load_package(out).manifest

    dataset, run_data_dir = run_dataset(run, report)
    flops, params = model_figures(model, spec)
    check_report_matches(run, report, flops, params)
    input_shape = (spec.in_channels, spec.input_size, spec.input_size)
    fused = fuse_model(model)
    onnx_bytes = export_onnx(fused, input_shape)
    graph = check_graph(onnx_bytes, fused)
    if graph.problem():
        raise UserError(f"export of {run} is not fully fused: {graph.problem()}")
    verification = compare_with_torch(ort_session(onnx_bytes), model, dataset, data_dir or run_data_dir, images,
                                      expected_stats=(spec.mean, spec.std))
    if not verification.passed:
        raise UserError(f"{run} was not exported: {verification.failure()}")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        atomic_write_bytes(staging / MODEL_FILE, onnx_bytes)
        atomic_write_bytes(staging / SLIM_WEIGHTS, weights_bytes)
        atomic_write_bytes(staging / SLIM_SPEC, spec_bytes)
        files = {name: sha256_of(staging / name) for name in (MODEL_FILE, SLIM_SPEC, SLIM_WEIGHTS)}
        manifest = build_manifest(spec, dataset, flops, params, accuracy_from_report(report), graph, verification,
                                  files, run.resolve())
        atomic_write_json(staging / MANIFEST, manifest)
        load_package(staging)  # the staged package must pass its own hash check
        staging.chmod(0o755)
        try:
            os.replace(staging, out)  # atomic; replaces only an absent or empty directory
        except OSError as error:
            raise UserError(f"cannot move the package into {out}: {error.strerror}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def verify_package(directory: str | Path, data_dir: str | None = None, images: int = VERIFY_IMAGES) -> Verification:
    """Check every file's sha256, rebuild the PyTorch reference from the package's own spec and
    weights, and re-run the ONNX Runtime comparison. Raises UserError on any failure."""
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
    verification = compare_with_torch(session, model, dataset, data_dir, images, expected_stats=(mean, std))
    if not verification.passed:
        raise UserError(f"{package.directory} failed verification: {verification.failure()}")
    return verification


def format_summary(manifest: dict[str, Any], verification: Verification | None = None) -> str:
    """A short human table of a package."""
    flops, params, accuracy = manifest["flops"], manifest["params"], manifest.get("accuracy", {})
    check = verification or Verification(**manifest["verification"])
    c, h, w = manifest["input"]["shape"]
    lines = [
        f"{manifest['model']} on {manifest['dataset']}: input {manifest['input']['name']} [N, {c}, {h}, {w}] -> "
        f"{manifest['output']['name']} [N, {manifest['output']['num_classes']}]",
        f"{'layer':24s} {'width':>5s} {'dense':>5s}",
    ]
    for name, width in manifest["widths"].items():
        lines.append(f"{name:24s} {width:5d} {manifest['dense_widths'].get(name, width):5d}")
    lines.append(f"MACs    dense {flops['dense_macs'] / 1e6:8.3f} M  slim {flops['slim_macs'] / 1e6:8.3f} M  ratio {flops['ratio']:.4f}")
    lines.append(f"params  dense {params['dense'] / 1e3:8.1f} k  slim {params['slim'] / 1e3:8.1f} k  ratio {params['slim'] / params['dense']:.4f}")
    if accuracy.get("test_top1") is not None:
        lines.append(f"test top-1 (training run) {accuracy['test_top1']:.4f}")
    export = manifest.get("export", {})
    lines.append(f"ONNX opset {export.get('opset')} via {export.get('exporter')}; "
                 f"{manifest.get('graph', {}).get('conv_nodes')} Conv nodes, no BatchNormalization")
    lines.append(f"ORT CPU vs PyTorch on {check.images} test images: max |diff| {check.max_abs_diff:.2e}, "
                 f"top-1 agreement {check.top1_agreement:.4f}, ONNX top-1 {check.onnx_top1:.4f}")
    return "\n".join(lines)
