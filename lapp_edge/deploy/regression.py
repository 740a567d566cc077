"""Latency regression per target: is a pruned model still as much faster as it was?

For one target profile, two reference models shipped in the latency data are compiled the way
every target compiles (`deploy.compile.compile_runner`) and measured interleaved in one process
(`measure.quiet_block_ratios`: blocks alternating A/B, order reversed each block, retried while
other processes load the machine):

- speedup = dense latency / slim latency on this target (the shipped slim reference is a LAPP
  ResNet-20 with coupled groups; its widths and MACs are in `reference-models.json`);
- ratio to reference = dense latency on this target / dense latency on the profile's reference
  target (e.g. int8 or bf16 against ORT fp32).

A result fails when the speedup falls below the profile's recorded baseline for this machine x
(1 - tolerance), when the ratio to the reference target exceeds its baseline x (1 + tolerance),
or when the speedup misses the one this machine's latency model for the target predicts by more
than the tolerance: its layer table (`lapp-edge profile-layers`) where one was measured here, else
its FLOPs fit (`lapp-edge calibrate-latency`) where that was; a prediction from another machine is
not held against this one (a note says so). Baselines are per machine (`targets.target_machine_key`: CPU model + ISA flags, and the GPU for a GPU target),
since the same profile runs different kernels on an AVX2, an AVX-512 or an AMX CPU; a machine
without a baseline is reported as such (`lapp-edge baseline --target NAME` records one).
Absolute times are never compared. Imports no torch.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lapp_edge.costs.latency_fit import find_fit_file, load_fit
from lapp_edge.costs.latency_table import find_table_file, load_table, onnx_conv_layers
from lapp_edge.deploy.backends import get_backend
from lapp_edge.deploy.compile import OnnxModel, compile_runner, dataset_calibration
from lapp_edge.deploy.measure import COMPILES_PER_RATIO, RatioProtocol, cpu_snapshot, other_cpu_share_since, quiet_block_ratios
from lapp_edge.deploy.targets import TargetProfile, check_input_shape, load_target, target_machine_key
from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_text
from lapp_edge.resources import find_latency_file, find_profile

REFERENCE_MODELS = "reference-models.json"      # {"dense": {...}, "slim": {...}}: file, widths, macs per model


@dataclass
class ReferenceModels:
    """The dense and slim reference ONNX files of the latency data, with their MACs."""

    dense: Path
    slim: Path
    input_shape: tuple[int, int, int]
    macs_ratio: float                           # slim MACs / dense MACs
    description: str
    architectures: dict[str, dict[str, Any]] = field(default_factory=dict)   # role -> architecture.json fields

    def path_for(self, role: str, backend: Any, work_dir: Path) -> Path:
        """The file `backend` loads for the dense or slim reference (its `reference_model_path`: the
        ONNX itself, or what a backend that rebuilds the network from its spec needs)."""
        onnx_path = self.dense if role == "dense" else self.slim
        if role not in self.architectures:
            return onnx_path
        return backend.reference_model_path(onnx_path, self.architectures[role], work_dir)


def reference_models() -> ReferenceModels:
    """The shipped reference models (UserError when the latency data lacks them)."""
    info_path = find_latency_file(REFERENCE_MODELS)
    if info_path is None:
        raise UserError(f"the latency data holds no {REFERENCE_MODELS}: the regression reference models are missing")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    files = {role: find_latency_file(info[role]["file"]) for role in ("dense", "slim")}
    missing = [info[role]["file"] for role, path in files.items() if path is None]
    if missing:
        raise UserError(f"the latency data lacks the reference model(s) {', '.join(missing)}")
    assert files["dense"] is not None and files["slim"] is not None
    shape = tuple(info["input_shape"])
    architectures = {}
    if "num_classes" in info and "coupled" in info:      # written since the torch-cuda target needed them
        architectures = {role: {"model": info["model"], "in_channels": shape[0], "num_classes": info["num_classes"],
                                "input_size": shape[1], "bypass": False, "widths": info[role]["widths"],
                                "dense_widths": info["dense"]["widths"], "coupled": info["coupled"]}
                         for role in ("dense", "slim")}
    return ReferenceModels(files["dense"], files["slim"], shape,  # type: ignore[arg-type]
                           float(info["slim"]["macs"]) / float(info["dense"]["macs"]), str(info.get("description", "")),
                           architectures)


@dataclass
class RegressionResult:
    """One target at one batch: what was measured, what it is held to, and what failed."""

    target: str
    batch: int
    machine: str
    speedup: float                              # dense / slim on this target (median over compiles of block-ratio medians)
    speedup_iqr: list[float]                    # of all block ratios, pooled over compiles
    ratio_to_reference: float | None            # dense here / dense on the reference target
    other_cpu_share: float
    flagged: bool                               # measured while other processes loaded the machine beyond the limit
    tolerance: float
    expected_speedup: float | None = None       # this machine's recorded baseline
    expected_ratio_to_reference: float | None = None
    predicted_speedup: float | None = None      # from this machine's layer table or FLOPs fit for the target
    predicted_by: str = ""                      # the file that predicted it
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    speedup_per_compile: list[float] = field(default_factory=list)   # each fresh compile's speedup (the compile noise)
    ratio_to_reference_per_compile: list[float] = field(default_factory=list)
    target_argument: str = ""                   # how a command line names the profile (its path for a user's own)


def measure_target(profile: TargetProfile, batches: list[int], work_dir: Path, protocol: RatioProtocol | None = None,
                   slim_override: Path | None = None, compiles: int = COMPILES_PER_RATIO) -> list[RegressionResult]:
    """Measure one target's speedup (and ratio to its reference target) at each batch and check
    them against its baselines: each figure is the median over `compiles` fresh compiles of the
    models (one compile's ratio moves by a few percent: docs/RESULTS.md), each compile's the median
    of its interleaved block ratios. `slim_override` swaps in another slim model (a test uses a
    deliberately widened one to show the check fails). Raises ValueError for compiles < 1."""
    if compiles < 1:
        raise ValueError(f"compiles must be at least 1, got {compiles}")
    protocol = protocol or RatioProtocol()
    models = reference_models()
    check_input_shape(profile, models.input_shape, "the regression references")
    calibration = dataset_calibration(profile)
    backend = get_backend(profile.backend)
    dense = OnnxModel(models.path_for("dense", backend, work_dir), "input", models.input_shape)
    slim = OnnxModel(slim_override or models.path_for("slim", backend, work_dir), "input", models.input_shape)
    baselines = profile.baselines
    machine = target_machine_key(profile.backend)
    recorded = baselines.machines.get(machine) if baselines else None
    reference_profile = None
    if baselines is not None and baselines.reference_target != profile.name:
        reference_profile = load_target(baselines.reference_target)
    rng = np.random.default_rng(0)
    results = []
    for batch in batches:
        data = rng.standard_normal((batch, *models.input_shape)).astype(np.float32)
        start = cpu_snapshot()
        speedups: list[float] = []
        to_reference: list[float] = []
        blocks: list[float] = []
        flagged = False
        for index in range(compiles):
            folder = work_dir / f"{profile.name}-b{batch}-compile-{index}"      # a fresh compile: nothing shared
            with compile_runner(dense, profile, batch, folder, calibration) as dense_runner, \
                    compile_runner(slim, profile, batch, folder, calibration) as slim_runner:
                quiet = quiet_block_ratios(dense_runner, slim_runner, data, protocol)
                speedups.append(float(np.median(quiet.block_ratios)))
                blocks += quiet.block_ratios
                flagged = flagged or quiet.flagged
                if reference_profile is not None:
                    with compile_runner(dense, reference_profile, batch, folder, dataset_calibration(reference_profile)) as ref:
                        to_reference.append(float(np.median(quiet_block_ratios(dense_runner, ref, data, protocol).block_ratios)))
        ratio_to_reference = float(np.median(to_reference)) if to_reference else (1.0 if baselines is not None else None)
        result = RegressionResult(
            target=profile.name, target_argument=profile.argument, batch=batch, machine=machine, speedup=float(np.median(speedups)),
            speedup_iqr=[float(np.percentile(blocks, 25)), float(np.percentile(blocks, 75))],
            ratio_to_reference=ratio_to_reference, other_cpu_share=other_cpu_share_since(start), flagged=flagged,
            tolerance=baselines.tolerance if baselines else 0.0, speedup_per_compile=speedups,
            ratio_to_reference_per_compile=to_reference,
        )
        if recorded is not None:
            result.expected_speedup = recorded.speedup.get(batch)
            result.expected_ratio_to_reference = recorded.ratio_to_reference.get(batch)
        result.predicted_speedup = predicted_speedup(profile, models, batch, machine, result)
        check(result)
        results.append(result)
    return results


def predicted_speedup(profile: TargetProfile, models: ReferenceModels, batch: int, machine: str,
                      result: RegressionResult) -> float | None:
    """dense / slim latency of the references as this machine's latency model for the target
    predicts it: the layer table measured here (`costs.latency_table`, from the references' ONNX
    convs; held-out error 1.4-2.5% on the CPUs it ships for, docs/RESULTS.md) where there is one
    with this batch, else the FLOPs fit measured here (from the MACs ratio; 3-6% off, and 8-17%
    for networks shaped for latency). None, with a note in `result.notes`, where neither was
    measured on this machine; `result.predicted_by` names the file used."""
    table_path = find_table_file(profile.name, "resnet20", models.input_shape, machine)
    if table_path is not None:
        table = load_table(table_path)
        if batch in table.batches:
            try:
                dense_ratio = table.batches[batch].predict_ratio(onnx_conv_layers(models.dense))
                slim_ratio = table.batches[batch].predict_ratio(onnx_conv_layers(models.slim))
            except UserError as error:          # a layer shape the table lacks
                result.notes.append(f"{table_path.name} cannot predict the references ({error}): trying the FLOPs fit")
            else:
                result.predicted_by = table_path.name
                return float(dense_ratio / slim_ratio)
    path = find_fit_file(profile.name, "resnet20", machine)
    if path is None:
        result.notes.append(f"no layer table or latency fit for {profile.name} on this machine: no prediction to hold the speedup to "
                            f"(lapp-edge profile-layers --target {result.target_argument or profile.name} --model resnet20)")
        return None
    fit = load_fit(path)
    fit_machine = fit.load.get("machine") or ""
    if fit_machine != machine:
        result.notes.append(f"the latency fit was recorded on '{fit_machine or fit.load.get('cpu', '?')}', not this machine, "
                            "and this machine has no layer table for the target: prediction not checked (lapp-edge profile-layers "
                            f"--target {result.target_argument or profile.name} --model resnet20 makes one)")
        return None
    if batch not in fit.batches:
        return None
    result.predicted_by = path.name
    return 1.0 / fit.predict_ratio(batch, {"macs_ratio": models.macs_ratio})


def check(result: RegressionResult) -> None:
    """Fill `result.problems` (one line each, naming the target, the expected and the measured figure)."""
    tolerance = result.tolerance
    where = f"target {result.target}, batch {result.batch}"
    if result.expected_speedup is None and result.expected_ratio_to_reference is None:
        result.notes.append(f"no baseline recorded for this machine ({result.machine}): "
                            f"record one with `lapp-edge baseline --target {result.target_argument or result.target}`")
    if result.expected_speedup is not None and result.speedup < result.expected_speedup * (1 - tolerance):
        result.problems.append(f"{where}: dense/slim speedup {result.speedup:.3f}, expected >= {result.expected_speedup:.3f} "
                               f"x (1 - {tolerance:g}) = {result.expected_speedup * (1 - tolerance):.3f}")
    expected_ratio = result.expected_ratio_to_reference
    if expected_ratio is not None and result.ratio_to_reference is not None and \
            result.ratio_to_reference > expected_ratio * (1 + tolerance):
        result.problems.append(f"{where}: latency {result.ratio_to_reference:.3f} x the reference target's, expected <= "
                               f"{expected_ratio:.3f} x (1 + {tolerance:g}) = {expected_ratio * (1 + tolerance):.3f}")
    if result.predicted_speedup is not None and abs(result.speedup / result.predicted_speedup - 1) > tolerance:
        result.problems.append(f"{where}: dense/slim speedup {result.speedup:.3f}, the target's latency model "
                               f"({result.predicted_by or 'this machine'}) predicts {result.predicted_speedup:.3f} (allowed +-{tolerance:g})")


_COLUMN_ZERO = re.compile(r"^\S", re.MULTILINE)     # a line at column 0: the next top-level entry, or a comment above one


def baselines_block_span(text: str) -> tuple[int, int]:
    """Where the top-level `baselines:` entry of a profile's YAML text starts and ends (character offsets; the
    end is the next line at column 0, a top-level entry or a comment above one, or the end of the text);
    (len, len) where the file has none."""
    start = re.search(r"^baselines:", text, re.MULTILINE)
    if start is None:
        return len(text), len(text)
    following = _COLUMN_ZERO.search(text, start.end())
    return start.start(), following.start() if following else len(text)


def record_baseline(profile: TargetProfile, results: list[RegressionResult], command: str = "") -> Path:
    """Write this machine's measured ratios into the profile's YAML file (atomically), keeping the
    other machines' baselines. Only the top-level `baselines:` entry is rewritten; every other line of the
    file (comments, inline comments, key order, flow style) stays as its author wrote it. A YAML
    round-trip library (ruamel.yaml) would keep comments too, but the profile is read with PyYAML's
    safe loader and its alias limits (`deploy.targets`); one loader for untrusted files, and a
    textual splice of the one block this tool owns. Returns the file written."""
    path = find_profile(profile.path or profile.name)
    text = path.read_text(encoding="utf-8")
    payload: Any = yaml.safe_load(text)
    start, end = baselines_block_span(text)
    baselines = payload.setdefault("baselines", {"reference_target": "x86-ort-fp32",
                                                 "model": "resnet20, fused, 1x28x28 (dense, and the shipped slim reference)",
                                                 "tolerance": 0.25})
    machines = baselines.setdefault("machines", {}) or {}
    baselines["machines"] = machines
    machines[results[0].machine] = {
        "ratio_to_reference": {r.batch: round(r.ratio_to_reference, 4) for r in results if r.ratio_to_reference is not None},
        "speedup": {r.batch: round(r.speedup, 4) for r in results},
        "speedup_per_compile": {r.batch: [round(v, 4) for v in r.speedup_per_compile] for r in results},
        "ratio_to_reference_per_compile": {r.batch: [round(v, 4) for v in r.ratio_to_reference_per_compile]
                                           for r in results if r.ratio_to_reference_per_compile},
        "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load": {"other_cpu_share_max": round(max(r.other_cpu_share for r in results), 3),
                 "flagged": any(r.flagged for r in results)},
        "versions": runtime_versions(profile.backend),
        "command": command,
    }
    before, after = text[:start], text[end:]
    if before and not before.endswith("\n"):
        before += "\n"
    block = yaml.safe_dump({"baselines": baselines}, sort_keys=False, default_flow_style=None, width=120)
    atomic_write_text(path, before + block + after)
    return path


def runtime_versions(backend: str = "") -> dict[str, str]:
    """Installed versions of the runtimes and numpy (for baseline records), and for a GPU `backend` its
    accelerator stack (`Backend.device_versions`: torch, CUDA, cuDNN) and TensorRT where installed."""
    import importlib.metadata

    versions = {}
    device_versions = get_backend(backend).device_versions() if backend else {}
    packages = ("onnxruntime", "openvino", "nncf", "numpy", "lapp-edge") + (("tensorrt",) if device_versions else ())
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {**versions, **device_versions}


def format_results(results: list[RegressionResult]) -> str:
    """One line per target and batch, then problems and notes."""
    lines = [f"{'target':22s} {'batch':>5s} {'speedup':>8s} {'expected':>9s} {'predicted':>9s} {'x ref':>6s} {'exp x ref':>9s} {'others':>6s}"]
    for r in results:
        def cell(value: float | None, width: int) -> str:
            return f"{value:{width}.3f}" if value is not None else f"{'-':>{width}s}"

        lines.append(f"{r.target:22s} {r.batch:5d} {r.speedup:8.3f} {cell(r.expected_speedup, 9)} {cell(r.predicted_speedup, 9)} "
                     f"{cell(r.ratio_to_reference, 6)} {cell(r.expected_ratio_to_reference, 9)} {r.other_cpu_share:6.2f}"
                     + ("  (measured under load)" if r.flagged else ""))
    for r in results:
        lines += [f"FAIL {p}" for p in r.problems] + [f"note {r.target}/b{r.batch}: {n}" for n in r.notes]
    lines += [f"predicted ({r.target}): {r.predicted_by}" for r in results if r.predicted_by]
    lines.append("speedup = dense / slim reference latency on the target; x ref = dense latency on the target / on its "
                 "reference target; all interleaved in one process; others = other processes' CPU share while measuring")
    return "\n".join(dict.fromkeys(lines))


def results_json(results: list[RegressionResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
