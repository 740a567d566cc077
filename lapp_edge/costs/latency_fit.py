"""The per-target latency model: whole-network latency predicted from FLOPs by a fitted line.

`lapp-edge calibrate-latency` (lapp_edge/latency/calibrate.py, which imports runtimes)
measures random width configurations of one model family on one target, each as a latency
RATIO to the dense model measured interleaved in the same process, and fits

    latency_ratio = a + b * macs_ratio [+ c * memory_ratio]

(a memory-traffic term only where it measurably lowers the held-out error). The fit is a
JSON file in the latency data (`latency-fit-<target>-<model>-<machine>.json`, beside the dense
reference ONNX it was measured against), one per machine: the same profile runs other kernels on
an AVX2, an AVX-512 or an AMX CPU, so a fit holds only where it was measured (`find_fit_file`). This module reads and
evaluates such fits and holds the fit arithmetic; it imports only json and numpy, never a
runtime or the training side, so a cost model or a report can use it anywhere.

Fit quality follows DEPLOY_NOTES ("Predicting whole-network latency"): R^2 on all points,
and held-out error: over many random splits (2/3 fit, 1/3 held out), the median absolute
percentage error of the held-out points; the figure reported is the median over splits
(and the median over splits of the worst held-out point). The "training mean" predictor
(no model) is reported beside it, so a fit that explains nothing shows.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.errors import UserError
from lapp_edge.fileio import read_json

FIT_FORMAT = "lapp-edge-latency-fit/1"
FEATURES = ("macs_ratio", "params_ratio", "activations_ratio")   # what a measurement row carries
SPLITS = 500
FIT_FRACTION = 2 / 3


def machine_slug(machine: str) -> str:
    """A file-name-safe short form of a machine key ("AMD EPYC; avx2" -> "amd-epyc-avx2")."""
    return re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")[:80] or "unknown"


def fit_file_name(target: str, model: str, machine: str = "") -> str:
    """The file name of a target's fit for a model family measured on `machine` (a
    `deploy.measure.machine_key`); without a machine, the name fits had before they were keyed
    by machine (the three shipped that way were measured on an AMD EPYC whose ISA flags they
    do not record)."""
    suffix = f"-{machine_slug(machine)}" if machine else ""
    return f"latency-fit-{target}-{model}{suffix}.json"


def find_fit_file(target: str, model: str, machine: str) -> Path | None:
    """The fit for (target, model) to use on `machine`: the one measured on it (./latency-data
    first, then the shipped one), else the unkeyed fit from before fits were keyed by machine,
    else None. A fit from another machine is still returned (its `load.machine` says where it
    was measured): callers warn (`deploy.bench.fit_machine_note`) or skip the check
    (`deploy.regression`) rather than use it silently."""
    from lapp_edge.resources import find_latency_file

    return find_latency_file(fit_file_name(target, model, machine)) or find_latency_file(fit_file_name(target, model))


# --- fit arithmetic ----------------------------------------------------------------------

def design_matrix(features: np.ndarray) -> np.ndarray:
    """[1, x_1, ..., x_k] per row, for a rows x k feature array."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    return np.hstack([np.ones((len(x), 1)), x])


def fit_linear(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares coefficients [intercept, slope_1, ..., slope_k]."""
    coefficients, *_ = np.linalg.lstsq(design_matrix(features), np.asarray(target, dtype=np.float64), rcond=None)
    return np.asarray(coefficients, dtype=np.float64)


def predict_linear(coefficients: np.ndarray, features: np.ndarray) -> np.ndarray:
    return design_matrix(features) @ np.asarray(coefficients, dtype=np.float64)


def r_squared(measured: np.ndarray, predicted: np.ndarray) -> float:
    y = np.asarray(measured, dtype=np.float64)
    residual = float(np.sum((y - np.asarray(predicted, dtype=np.float64)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - residual / total if total > 0 else (1.0 if residual == 0 else 0.0)


@dataclass
class HeldOut:
    """Held-out absolute percentage errors over random splits (medians over the splits)."""

    splits: int
    fit_points: int
    held_out_points: int
    median_abs_pct: float          # median over splits of the held-out points' median |error| in %
    max_abs_pct: float             # median over splits of the worst held-out point's |error| in %
    mean_predictor_median_abs_pct: float   # the same for the training mean (no model)
    mean_predictor_max_abs_pct: float


def held_out_errors(features: np.ndarray, target: np.ndarray, splits: int = SPLITS, fit_fraction: float = FIT_FRACTION,
                    seed: int = 0) -> HeldOut:
    x = np.asarray(features, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    y = np.asarray(target, dtype=np.float64)
    count = len(y)
    fit_points = int(round(count * fit_fraction))
    if fit_points < x.shape[1] + 1 or count - fit_points < 1:
        raise UserError(f"{count} measurements are too few for a held-out estimate of a {x.shape[1]}-feature fit")
    rng = np.random.default_rng(seed)
    medians, worst, mean_medians, mean_worst = [], [], [], []
    for _ in range(splits):
        order = rng.permutation(count)
        fit_rows, test_rows = order[:fit_points], order[fit_points:]
        coefficients = fit_linear(x[fit_rows], y[fit_rows])
        errors = 100.0 * np.abs(predict_linear(coefficients, x[test_rows]) / y[test_rows] - 1.0)
        medians.append(np.median(errors))
        worst.append(errors.max())
        mean_errors = 100.0 * np.abs(y[fit_rows].mean() / y[test_rows] - 1.0)
        mean_medians.append(np.median(mean_errors))
        mean_worst.append(mean_errors.max())
    return HeldOut(splits, fit_points, count - fit_points, float(np.median(medians)), float(np.median(worst)),
                   float(np.median(mean_medians)), float(np.median(mean_worst)))


@dataclass
class CandidateFit:
    """One linear model: latency_ratio = intercept + sum(slope_i * feature_i)."""

    features: list[str]
    coefficients: list[float]      # [intercept, slope per feature]
    r2: float
    held_out: HeldOut

    def predict(self, values: dict[str, float]) -> float:
        missing = [name for name in self.features if name not in values]
        if missing:
            raise UserError(f"the latency fit needs {', '.join(missing)}")
        row = np.array([[values[name] for name in self.features]], dtype=np.float64)
        return float(predict_linear(np.array(self.coefficients), row)[0])


def fit_candidate(rows: list[dict[str, float]], y: np.ndarray, features: list[str], seed: int = 0) -> CandidateFit:
    x = np.array([[row[name] for name in features] for row in rows], dtype=np.float64)
    coefficients = fit_linear(x, y)
    return CandidateFit(list(features), [float(c) for c in coefficients], r_squared(y, predict_linear(coefficients, x)),
                        held_out_errors(x, y, seed=seed))


# A memory-traffic term must earn its place: it is kept only if it lowers the held-out median
# error by at least this much (relative) AND this many percentage points.
MEMORY_TERM_MIN_GAIN = 0.15
MEMORY_TERM_MIN_POINTS = 0.3
MEMORY_TERM_MIN_CONFIGS = 6      # fewer points cannot hold out a third and still fit three coefficients sensibly
TWO_TERMS_MIN_CONFIGS = 12       # and four coefficients (base + two extra terms) need twice as many


def choose_fit(rows: list[dict[str, float]], y: np.ndarray, seed: int = 0, base: str = "macs_ratio",
               extras: tuple[str, ...] = ("params_ratio", "activations_ratio"),
               max_extra_terms: int = 1) -> tuple[CandidateFit, list[CandidateFit]]:
    """The line in `base` alone (the MACs ratio for a FLOPs fit, the table ratio for a layer table), unless
    `base` + extra terms (one, or with `max_extra_terms=2` also two) is measurably better held out (>= 15%
    relative and >= 0.3 points lower than the fit chosen so far, candidates taken in order) and
    monotone: every slope >= 0. Each feature is a cost (more MACs, a slower table sum, more bytes), so a
    negative slope says the terms are collinear, not that the cost lowers latency; trained against, it
    would reward a network for making that term larger (measured: OpenVINO's ResNet-20 table at batch 1
    fitted -0.04 on its table term beside MACs; docs/RESULTS.md). Candidates are returned in the order
    tried: base, base + each extra, then base + each pair of extras."""
    candidates = [fit_candidate(rows, y, [base], seed)]
    for memory in extras if len(y) >= MEMORY_TERM_MIN_CONFIGS else ():
        candidates.append(fit_candidate(rows, y, [base, memory], seed))
    if max_extra_terms >= 2 and len(y) >= TWO_TERMS_MIN_CONFIGS:
        for i, first in enumerate(extras):
            for second in extras[i + 1:]:
                candidates.append(fit_candidate(rows, y, [base, first, second], seed))
    chosen = candidates[0]
    for candidate in candidates[1:]:
        if any(slope < 0 for slope in candidate.coefficients[1:]):
            continue
        if measurably_better(candidate, chosen):
            chosen = candidate
    return chosen, candidates


def measurably_better(candidate: CandidateFit, than: CandidateFit) -> bool:
    """`candidate`'s held-out median error is lower than `than`'s by >= 15% relative and >= 0.3 points
    (MEMORY_TERM_MIN_GAIN, MEMORY_TERM_MIN_POINTS): a difference larger than split-to-split scatter."""
    return measurably_lower(candidate.held_out.median_abs_pct, than.held_out.median_abs_pct)


def measurably_lower(candidate_pct: float, than_pct: float) -> bool:
    """`measurably_better` on two held-out median errors (%)."""
    return candidate_pct <= than_pct * (1 - MEMORY_TERM_MIN_GAIN) and than_pct - candidate_pct >= MEMORY_TERM_MIN_POINTS


# --- the stored fit ----------------------------------------------------------------------

@dataclass
class BatchFit:
    """The chosen fit for one batch size, its alternatives, and the reference's absolute latency."""

    batch: int
    chosen: CandidateFit
    candidates: list[CandidateFit]
    reference_median_ms: float     # the dense reference's median latency in the calibrating process

    def predict_ratio(self, values: dict[str, float]) -> float:
        return self.chosen.predict(values)


@dataclass
class LatencyFit:
    format: str
    target: str
    model: str
    backend: str
    precision_requested: str
    precision_used: str
    threads: int
    input_shape: list[int]
    dense_widths: dict[str, int]
    dense: dict[str, float]        # macs, params, activations of the dense reference
    batches: dict[int, BatchFit]
    measurements: list[dict[str, Any]] = field(default_factory=list)
    profile: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    command: str = ""
    dense_reference: str = ""      # file name of the dense reference ONNX, beside the fit

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["batches"] = {str(batch): asdict(fit) for batch, fit in self.batches.items()}
        return payload

    def predict_ratio(self, batch: int, values: dict[str, float]) -> float:
        """Predicted latency / dense latency on this target at `batch`."""
        if batch not in self.batches:
            raise UserError(f"the latency fit for {self.target}/{self.model} has no batch {batch} (it has {sorted(self.batches)})")
        return self.batches[batch].predict_ratio(values)

    def ratios_of(self, macs: float, params: float = 0.0, activations: float = 0.0) -> dict[str, float]:
        """The fit's features for a model with these absolute MACs / params / activation elements."""
        return {"macs_ratio": macs / self.dense["macs"], "params_ratio": params / self.dense["params"],
                "activations_ratio": activations / self.dense["activations"]}


def _held_out(payload: dict[str, Any]) -> HeldOut:
    return HeldOut(**payload)


def _candidate(payload: dict[str, Any]) -> CandidateFit:
    return CandidateFit(list(payload["features"]), [float(c) for c in payload["coefficients"]], float(payload["r2"]),
                        _held_out(payload["held_out"]))


def fit_from_dict(payload: Any, where: str = "latency fit") -> LatencyFit:
    if not isinstance(payload, dict) or payload.get("format") != FIT_FORMAT:
        raise UserError(f"{where} is not a latency fit ({FIT_FORMAT})")
    try:
        batches = {
            int(batch): BatchFit(int(fit["batch"]), _candidate(fit["chosen"]), [_candidate(c) for c in fit["candidates"]],
                                 float(fit["reference_median_ms"]))
            for batch, fit in payload["batches"].items()
        }
        values = {key: value for key, value in payload.items() if key != "batches"}
        reference = values.get("dense_reference", "")
        if reference and (not isinstance(reference, str) or "/" in reference or reference in (".", "..")
                          or not reference.isprintable() or len(reference) > 255):
            raise ValueError("dense_reference must be a plain file name beside the fit")
        return LatencyFit(batches=batches, **values)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{where} is a malformed latency fit: {type(error).__name__}: {str(error)[:200]}") from None


def write_fit_json(fit: LatencyFit) -> bytes:
    return (json.dumps(fit.to_dict(), indent=1) + "\n").encode("utf-8")


def load_fit(path: str | Path) -> LatencyFit:
    """Read a fit JSON; UserError for a missing, unreadable or malformed file."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"latency fit {file} does not exist")
    try:
        payload = read_json(file)      # bounded in size and nesting (fileio)
    except UserError as error:
        raise UserError(f"cannot read latency fit: {error}") from None
    return fit_from_dict(payload, str(file))
