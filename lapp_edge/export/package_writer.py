"""Export a finished run's slim model as a verified, self-contained model package.

    run dir (architecture.json, slim_model.pt, report.json)
        -> fuse (every BN folded, every bypass added to its main kernel: plain convs with bias)
        -> ONNX (torch.onnx.export(dynamo=True), opset 18, dynamic batch, "input" -> "logits")
        -> onnx.checker + graph check (no BatchNormalization, one Conv per fused nn.Conv2d)
        -> ONNX Runtime CPU (ORT_ENABLE_ALL) vs the unfused PyTorch eval model on 1000 real
           test images: |diff| <= 1e-4 + 1e-4 * max|logit| per image and the same top-1
           (outside near ties; `lapp_edge.deploy.tolerance`)
        -> package dir: model.onnx, architecture.json, slim_model.pt, manifest.json

The package is assembled in a temporary sibling directory and renamed into place only after
verification passed, so a model that fails is never written as shipped. The package carries
the architecture spec and the slim state dict, so `verify_package` can rebuild the PyTorch
reference without the training run. The manifest follows the contract in
`lapp_edge/deploy/package.py`.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lapp_edge.data.imagefolder import FolderLayout, eval_resize
from lapp_edge.data.readers import data_directory
from lapp_edge.deploy.package import MANIFEST, MODEL_FILE, PACKAGE_FORMAT, load_package, sha256_of
from lapp_edge.errors import UserError
from lapp_edge.export.onnx import EXPORTER, INPUT_NAME, OPSET, OUTPUT_NAME, GraphCheck, check_graph, export_onnx
from lapp_edge.export.verify import VERIFY_IMAGES, Verification, compare_with_torch, ort_session, verify_package
from lapp_edge.fileio import (
    atomic_write_bytes, atomic_write_json, check_output_location, missing_text, open_regular_under, read_bounded, read_json_under, regular_files_under,
)
from lapp_edge.lapp.flops import deployed_figures
from lapp_edge.models import rebuild_model
from lapp_edge.models.fuse import fuse_model
from lapp_edge.models.spec import SLIM_SPEC, SLIM_WEIGHTS, ArchitectureSpec, load_slim_model

RUN_REPORT = "report.json"
RUN_CONFIG = "config.json"
MAX_REPORT_BYTES = 64 << 20
MAX_WEIGHTS_BYTES = 16 << 30


def run_dataset(run_dir: Path, report: dict[str, Any]) -> tuple[str, str | None]:
    """The run's dataset name and data directory (config.json, else the report)."""
    config = read_json_under(run_dir, RUN_CONFIG, 1 << 20) if os.path.lexists(run_dir / RUN_CONFIG) else report.get("config", {})
    if not isinstance(config, dict):
        raise UserError(f"{run_dir / RUN_CONFIG} is not a run configuration")
    name = config.get("dataset") or report.get("dataset")
    if not isinstance(name, str):
        raise UserError(f"{run_dir} does not say which dataset it was trained on")
    data_dir = config.get("data_dir")
    return name, data_dir if isinstance(data_dir, str) else None


def data_record(run_dir: Path, report: dict[str, Any], spec: ArchitectureSpec, data_dir: str | None) -> dict[str, Any]:
    """The manifest's `data` section: where the model's data came from (so verify and bench find it
    without --data-dir) and, for ImageFolder data, how its images become the input."""
    dataset, run_data_dir = run_dataset(run_dir, report)
    config = read_json_under(run_dir, RUN_CONFIG, 1 << 20) if os.path.lexists(run_dir / RUN_CONFIG) else report.get("config", {})
    directory = data_dir or run_data_dir
    try:
        resolved: str | None = str(data_directory(dataset, directory).resolve())
    except UserError:
        resolved = str(Path(directory).resolve()) if directory else None
    record: dict[str, Any] = {"dataset": dataset, "data_dir": resolved, "test_split": "val" if dataset == "imagefolder" else "test",
                              "resize_shorter_side": None, "center_crop": None, "image_mode": None}
    if dataset == "imagefolder":
        augment = config.get("augment") if isinstance(config, dict) else None
        layout = FolderLayout(spec.input_size, spec.in_channels, eval_resize(spec.input_size, str(augment or "small")))
        record.update(resize_shorter_side=layout.resize, center_crop=layout.size, image_mode=layout.mode)
    return record


def read_run_report(run_dir: Path) -> dict[str, Any]:
    if not os.path.lexists(run_dir / RUN_REPORT):
        raise UserError(f"{run_dir} holds no finished model ({RUN_REPORT} is missing)")
    report = read_json_under(run_dir, RUN_REPORT, MAX_REPORT_BYTES)
    if not isinstance(report, dict) or not isinstance(report.get("flops"), dict) or not isinstance(report.get("accuracy"), dict):
        raise UserError(f"{run_dir / RUN_REPORT} is not a lapp-edge run report")
    return report


def package_figures(model: nn.Module, spec: ArchitectureSpec) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The manifest's `flops`, `params` and `figures` sections: MACs, params and conv/linear output
    elements of the deployed network, dense (the family at full width) and slim. `figures` is what
    the deploy side predicts latency from, without rebuilding a PyTorch model."""
    input_shape = (spec.in_channels, spec.input_size, spec.input_size)
    dense_model = rebuild_model(spec.model, spec.in_channels, spec.num_classes, False, input_size=spec.input_size)
    dense = deployed_figures(dense_model, input_shape)
    slim = deployed_figures(model, input_shape)
    flops = {
        "unit": "MACs (multiply-accumulates) of convs and linear layers of the deployed network; FLOPs = 2 x MACs",
        "dense_macs": dense.macs, "slim_macs": slim.macs, "ratio": slim.macs / dense.macs,
    }
    params = {
        "unit": "parameters of the deployed network (BN and bypass folded)",
        "dense": int(dense.params), "slim": int(slim.params),
    }
    figures = {"unit": "deployed network at batch 1: MACs, parameters, conv/linear output elements",
               "dense": dense.to_dict(), "slim": slim.to_dict()}
    return flops, params, figures


def check_report_matches(run_dir: Path, report: dict[str, Any], flops: dict[str, Any], params: dict[str, Any]) -> None:
    reported_macs = report["flops"].get("slim_macs")
    reported_params = report["params"].get("slim") if isinstance(report.get("params"), dict) else None
    if not isinstance(reported_macs, (int, float)) or not math.isclose(reported_macs, flops["slim_macs"], rel_tol=1e-9):
        raise UserError(f"{run_dir / RUN_REPORT} reports {reported_macs} slim MACs, the slim model has {flops['slim_macs']:.0f}: "
                        "the report does not belong to this model")
    if reported_params is not None and reported_params != params["slim"]:
        raise UserError(f"{run_dir / RUN_REPORT} reports {reported_params} slim params, the slim model has {params['slim']}")


def accuracy_from_report(report: dict[str, Any]) -> dict[str, Any]:
    epochs = report.get("epochs") or []
    config = report.get("config") or {}

    def fraction(value: Any) -> float | None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1
        return float(value) if number else None

    last = epochs[-1] if isinstance(epochs, list) and epochs and isinstance(epochs[-1], dict) else {}
    subset = config.get("test_subset") if isinstance(config, dict) else None
    return {
        "test_top1": fraction(report["accuracy"].get("test_top1")),
        "test_images": subset if isinstance(subset, int) and not isinstance(subset, bool) and subset > 0 else "all",
        "train_top1_last_epoch": fraction(last.get("train_top1")),
        "note": "from the run's report.json; train top-1 is the running figure over the last epoch's augmented batches",
    }


def latency_budgets_from_report(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The latency budgets a latency-constrained run was shaped for (its report's `shaped_for`), as the
    manifest's `latency_budgets`: [{"target", "budget_ratio", "batch"[, "ceiling": true]}], so `bench` can say how
    far off budget the package measures (`ceiling`: a --land-on-flops run, whose latency need only stay under
    its budget). [] for a FLOPs-constrained or dense run, or entries that do not parse."""
    budgets = []
    ceiling = report.get("land_on_flops") is True
    for entry in report.get("shaped_for") or []:
        if not isinstance(entry, dict):
            continue
        target, ratio, batch = entry.get("target"), entry.get("budget_ratio"), entry.get("batch")
        if (isinstance(target, str) and isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio <= 1
                and isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
            budgets.append({"target": target, "budget_ratio": float(ratio), "batch": batch} | ({"ceiling": True} if ceiling else {}))
    return budgets


def versions() -> dict[str, str]:
    """torch, onnx and onnxruntime versions for the manifest."""
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def build_manifest(
    spec: ArchitectureSpec, dataset: str, flops: dict[str, Any], params: dict[str, Any], accuracy: dict[str, Any],
    graph: GraphCheck, verification: Verification, files: dict[str, str], source_run: Path,
    figures: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
    latency_budgets: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The package manifest (contract in `lapp_edge.deploy.package`)."""
    return {
        "format": PACKAGE_FORMAT,
        "model": spec.model,
        "dataset": dataset,
        "data": data or {"dataset": dataset, "data_dir": None},
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
        "figures": figures or {},
        "accuracy": accuracy,
        "latency_budgets": latency_budgets or [],
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
    check_output_location(out_dir, "--out", "dir", staged_beside=True)    # the string: Path("") would read as "."
    if not run.is_dir():
        raise UserError(f"run directory {run} {missing_text(run)}")
    regular_files_under(run, f"run directory {run}", skip=(".lock",))    # no link or special file anywhere in it
    report = read_run_report(run)
    model, spec = load_slim_model(run)
    weights_bytes = read_bounded(open_regular_under(run, SLIM_WEIGHTS, str(run)), MAX_WEIGHTS_BYTES, str(run / SLIM_WEIGHTS))
    spec_bytes = read_bounded(open_regular_under(run, SLIM_SPEC, str(run)), 1 << 20, str(run / SLIM_SPEC))
    weights_sha, spec_sha = hashlib.sha256(weights_bytes).hexdigest(), hashlib.sha256(spec_bytes).hexdigest()
    if prepare_out_dir(out, weights_sha, spec_sha):
        verify_package(out, data_dir, images)
        return load_package(out).manifest

    dataset, _ = run_dataset(run, report)
    data = data_record(run, report, spec, data_dir)
    flops, params, figures = package_figures(model, spec)
    check_report_matches(run, report, flops, params)
    input_shape = (spec.in_channels, spec.input_size, spec.input_size)
    fused = fuse_model(model)
    onnx_bytes = export_onnx(fused, input_shape)
    graph = check_graph(onnx_bytes, fused)
    if graph.problem():
        raise UserError(f"export of {run} is not fully fused: {graph.problem()}")
    layout = FolderLayout(spec.input_size, spec.in_channels, data["resize_shorter_side"]) if dataset == "imagefolder" else None
    verification = compare_with_torch(ort_session(onnx_bytes), model, dataset, spec, data["data_dir"], images, layout)
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
                                  files, run.resolve(), figures, data, latency_budgets_from_report(report))
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


def tolerance_text(tolerance: object) -> str:
    """The tolerance of a verification as text (older packages recorded a plain absolute limit)."""
    if isinstance(tolerance, dict):
        return f"allowed {tolerance.get('atol')} + {tolerance.get('rtol')} * max|logit| per image"
    return f"allowed {tolerance} absolute"


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
    lines.append(f"ORT CPU vs PyTorch on {check.images} test images: max |diff| {check.max_abs_diff:.2e} "
                 f"({check.max_rel_diff:.1e} of max|logit|; {tolerance_text(check.tolerance)}), "
                 f"top-1 agreement {check.top1_agreement:.4f}, ONNX top-1 {check.onnx_top1:.4f}")
    return "\n".join(lines)
