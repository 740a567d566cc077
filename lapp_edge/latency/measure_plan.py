"""Measure a planned width configuration on a target, as `bench` measures a package: the `Measure`
that `training.landing` calls at freeze (the training side imports no runtime, so `lapp-edge train`
hands it this).

The plan is built from the run's architecture spec at the planned widths with random weights
(latency does not depend on them: measured, docs/RESULTS.md), fused and exported to ONNX as the
latency calibration builds its networks (`latency.calibrate.build_fused`, `export_config`), then compiled on the target next to the
dense network built the same way; the ratio is the median over `compiles` fresh compiles of both,
each the median of interleaved block ratios with load checks (`deploy.compile.ratio_over_compiles`).
Everything is written in a temporary folder and removed: nothing lands in the run directory.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lapp_edge.deploy.compile import OnnxModel, dataset_calibration, ratio_over_compiles
from lapp_edge.deploy.measure import RatioProtocol
from lapp_edge.deploy.targets import TargetProfile, load_target
from lapp_edge.export.onnx import INPUT_NAME
from lapp_edge.latency.calibrate import build_fused, export_config
from lapp_edge.models.spec import ArchitectureSpec
from lapp_edge.training.landing import MeasuredRatio

LANDING_COMPILES = 3      # fresh compiles per measured ratio, as bench's default (one compile moves a ratio by a few %)


class PlanMeasurer:
    """`Measure` for `training.landing.land_on_measured`: (spec at planned widths, target, batch) -> MeasuredRatio.

    Raises UserError / BackendUnavailable as `deploy.compile.compile_runner` (an unknown target,
    a runtime that is not installed)."""

    def __init__(self, compiles: int = LANDING_COMPILES, protocol: RatioProtocol | None = None, seed: int = 0) -> None:
        self.compiles = compiles
        self.protocol = protocol or RatioProtocol()
        self.seed = seed

    def _export(self, spec: ArchitectureSpec, path: Path) -> OnnxModel:
        torch.manual_seed(self.seed)
        shape = (spec.in_channels, spec.input_size, spec.input_size)
        fused = build_fused(spec.model, spec.widths, spec.dense_widths, shape, spec.num_classes, spec.coupled)
        return OnnxModel(export_config(fused, shape, path), INPUT_NAME, shape)

    def __call__(self, spec: ArchitectureSpec, target: str, batch: int) -> MeasuredRatio:
        profile: TargetProfile = load_target(target)
        with tempfile.TemporaryDirectory(prefix="lapp-landing-") as temporary:
            work = Path(temporary)
            slim = self._export(spec, work / "slim.onnx")
            dense = self._export(replace(spec, widths=dict(spec.dense_widths)), work / "dense.onnx")
            rng = np.random.default_rng(self.seed)
            data = rng.standard_normal((batch, *slim.input_shape)).astype(np.float32)
            result = ratio_over_compiles(slim, dense, profile, batch, work, data, self.compiles, self.protocol,
                                         dataset_calibration(profile))
        return MeasuredRatio(result.median, list(result.per_compile), result.other_cpu_share, result.flagged)
