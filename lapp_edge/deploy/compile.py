"""The one path from (model, target profile, batch) to a compiled `Runner`.

`bench`, latency calibration, the regression tests and every benchmark compile through
`compile_runner`, so the int8 route, the calibration images and the threads a target is
measured with are decided in one place:

- the backend is the profile's; the precision and threads are the profile's;
- int8: the route is the one asked for, else the profile's first `int8_routes`, else the
  backend's first; the calibration images are the profile's calibration set drawn from its
  dataset and normalised with the model's own mean/std (`int8_calibration`), unless given.

Imports no torch and no runtime (the backend imports its runtime when it loads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lapp_edge.data.imagefolder import FolderLayout
from lapp_edge.deploy.backends import LoadRequest, Runner, get_backend
from lapp_edge.deploy.calibration_set import CalibrationSet, draw_calibration, load_definition
from lapp_edge.deploy.package import ModelPackage
from lapp_edge.deploy.measure import COMPILES_PER_RATIO, RatioProtocol, quiet_block_ratios
from lapp_edge.deploy.targets import TargetProfile, channel_multiple_for, check_input_shape
from lapp_edge.errors import UserError


@dataclass(frozen=True)
class OnnxModel:
    """An fp32 ONNX classifier to compile: NCHW input with a dynamic batch axis."""

    onnx_path: Path
    input_name: str
    input_shape: tuple[int, int, int]       # C, H, W
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


def onnx_model_of(model: ModelPackage | OnnxModel) -> OnnxModel:
    """The ONNX model of a package (its model.onnx, input name and shape, normalisation)."""
    if isinstance(model, OnnxModel):
        return model
    manifest_input = model.manifest.get("input", {})
    return OnnxModel(model.onnx_path, model.input_name, model.input_shape,
                     tuple(manifest_input.get("mean", ())), tuple(manifest_input.get("std", ())))


def int8_route(profile: TargetProfile, route: str | None = None) -> str:
    """The int8 route a profile compiles with ("" for other precisions)."""
    if profile.precision != "int8":
        return ""
    if route:
        return route
    return profile.int8_routes[0] if profile.int8_routes else get_backend(profile.backend).int8_routes[0]


def int8_calibration(profile: TargetProfile, mean: tuple[float, ...] | list[float], std: tuple[float, ...] | list[float],
                     data_dir: str | None = None, folder: tuple[FolderLayout, list[str]] | None = None) -> CalibrationSet | None:
    """The profile's calibration set normalised with `mean`/`std`, or None for a non-int8 profile.
    Raises UserError for a missing definition or dataset."""
    if profile.precision != "int8":
        return None
    if not mean or not std:
        raise UserError(f"target {profile.name} is int8 but the model states no mean/std to normalise its calibration set")
    return draw_calibration(load_definition(profile.calibration), list(mean), list(std), data_dir=data_dir, folder=folder)


def dataset_calibration(profile: TargetProfile, data_dir: str | None = None) -> np.ndarray | None:
    """The profile's int8 calibration images normalised with their own dataset's mean/std (for
    models that carry none, such as the latency reference models), or None for a non-int8 profile."""
    if profile.precision != "int8":
        return None
    from lapp_edge.data.readers import load_arrays

    info = load_arrays(load_definition(profile.calibration).dataset, data_dir).info
    drawn = int8_calibration(profile, info.mean, info.std, data_dir)
    return None if drawn is None else drawn.images


def compile_runner(model: ModelPackage | OnnxModel, profile: TargetProfile, batch: int, work_dir: Path,
                   calibration: np.ndarray | None = None, route: str | None = None, data_dir: str | None = None,
                   profile_nodes: bool = False) -> Runner:
    """Compile `model` for `profile` at `batch` (artifacts in `work_dir`) and return its runner
    (close it, or use it as a context manager, when done).

    `calibration`: float32 N x C x H x W normalised images for int8 (default: the profile's set).
    `profile_nodes`: the runtime's per-node profiler on (`Runner.node_times`; it slows every inference a little:
    never for a latency measurement). Raises UserError for an input shape the profile does not take, BackendUnavailable when the
    runtime is missing."""
    onnx_model = onnx_model_of(model)
    check_input_shape(profile, onnx_model.input_shape, str(onnx_model.onnx_path))
    backend = get_backend(profile.backend)
    if profile.precision == "int8" and calibration is None:
        drawn = int8_calibration(profile, onnx_model.mean, onnx_model.std, data_dir)
        calibration = None if drawn is None else drawn.images
    request = LoadRequest(
        onnx_path=onnx_model.onnx_path, input_name=onnx_model.input_name, input_shape=onnx_model.input_shape,
        precision=profile.precision, threads=profile.threads, batch=batch, work_dir=work_dir,
        calibration=calibration, int8_route=int8_route(profile, route), profile_nodes=profile_nodes,
        channel_multiple=channel_multiple_for(profile),
    )
    return backend.load(request)


@dataclass
class CompiledRatio:
    """An A/B latency ratio taken over several fresh compiles of both models: per compile, the
    median of its interleaved block ratios (`measure.quiet_block_ratios`), and the median of those.

    Why: a fresh compile of the same ONNX moves the ratio (measured on the AVX2 box, ResNet-20 at
    batch 32, slim/dense over four compiles: 0.502-0.518 on ONNX Runtime, 0.463-0.506 on OpenVINO;
    docs/RESULTS.md, the efficiency frontier), more than the interleaving's own noise."""

    per_compile: list[float]
    other_cpu_share: float           # the largest of the compiles' (others' share of the machine)
    flagged: bool                    # some compile's measurement stayed above the allowed load

    @property
    def median(self) -> float:
        return float(np.median(self.per_compile))


def ratio_over_compiles(model_a: ModelPackage | OnnxModel, model_b: ModelPackage | OnnxModel, profile: TargetProfile,
                        batch: int, work_dir: Path, data: np.ndarray, compiles: int = COMPILES_PER_RATIO,
                        protocol: RatioProtocol | None = None, calibration: np.ndarray | None = None,
                        route: str | None = None) -> CompiledRatio:
    """latency(A) / latency(B) on `profile` at `batch` (data: `batch` x C x H x W float32), each of
    `compiles` times from a fresh compile of both in its own work folder (no artifact reuse);
    `calibration` and `route` as `compile_runner` (int8 targets).
    Raises ValueError for compiles < 1; UserError / BackendUnavailable as `compile_runner`."""
    if compiles < 1:
        raise ValueError(f"compiles must be at least 1, got {compiles}")
    protocol = protocol or RatioProtocol()
    ratios, shares, flagged = [], [], False
    for index in range(compiles):
        with compile_runner(model_a, profile, batch, Path(work_dir) / f"compile-{index}-a", calibration, route) as runner_a, \
                compile_runner(model_b, profile, batch, Path(work_dir) / f"compile-{index}-b", calibration, route) as runner_b:
            measured = quiet_block_ratios(runner_a, runner_b, data, protocol)
        ratios.append(float(np.median(measured.block_ratios)))
        shares.append(measured.other_cpu_share)
        flagged = flagged or measured.flagged
    return CompiledRatio(ratios, max(shares), flagged)
