"""Scale-aware comparison of logits, the one rule every numerical check uses (no torch).

    |y - e| <= atol + rtol * max|e|      per sample (row), e the reference's logits

An absolute limit alone refuses correct models whose logits are large: fp32 rounding grows
with the magnitude of what is summed, so a correct export of a model with logits in the
thousands differs from PyTorch by ~1e-3 (docs/ARCHITECTURE.md, "Verify"). Scaling by the
sample's largest |logit| keeps the check as strict, relative to the numbers, for every model.

Top-1 must agree on every image whose reference margin (top-1 minus runner-up logit) exceeds
twice the allowed difference; below that a flip is within rounding and is counted as a near
tie instead of failing the check.

Numbers (measured on this project's models, docs/ARCHITECTURE.md):
- EXPORT_FP32 (ONNX Runtime fp32 vs PyTorch fp32, same CPU): the per-sample error is
  1e-6..2e-6 of max|e| (ResNet-20, and a ResNet-18 with logits ~2400: 1.7e-6; PyTorch fp32 vs
  fp64 on it: 1.2e-6). rtol 1e-4 leaves a 50x margin and is still far below what a wrong
  weight or missing bias gives (>= 1e-2). atol 1e-4 is the old absolute limit, so nothing it
  passed is refused for logits near zero.
- Other runtimes at fp32 (OpenVINO f32, or bf16 where the CPU falls back to f32) vs the ONNX
  Runtime fp32 reference: the same numbers (OpenVINO vs ORT measured at 1.6e-6 of max|e|).
- bf16 and int8 are lossy by design (int8 vs fp32 differed by 20-60% of max|e| on a small
  model): their logits are reported, not checked; accuracy and top-1 agreement judge them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RULE = "|y - e| <= atol + rtol * max|e| per sample"


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def allowed(self, expected: np.ndarray) -> np.ndarray:
        """The allowed |difference| per sample (a column: N x 1)."""
        return self.atol + self.rtol * np.abs(expected).max(axis=1, keepdims=True)

    def to_dict(self) -> dict[str, object]:
        return {"rtol": self.rtol, "atol": self.atol, "rule": RULE}


EXPORT_FP32 = Tolerance(rtol=1e-4, atol=1e-4)
RUNTIME_FP32 = Tolerance(rtol=1e-4, atol=1e-4)


@dataclass
class LogitComparison:
    """How far `result` is from `expected` (N x classes), under `tolerance`."""

    samples: int
    max_abs_diff: float
    max_rel_diff: float            # max over samples of max|y - e| / max|e|
    worst_excess: float            # max over elements of |y - e| / allowed (<= 1 passes)
    top1_agreement: float          # over all samples
    top1_disagreements: int        # on samples whose reference margin exceeds 2 x allowed
    near_ties: int                 # samples whose reference margin is within 2 x allowed
    tolerance: dict[str, object]

    @property
    def passed(self) -> bool:
        return self.worst_excess <= 1.0 and self.top1_disagreements == 0

    def merge(self, other: "LogitComparison") -> "LogitComparison":
        """The comparison of both sets of samples together."""
        samples = self.samples + other.samples
        agreement = (self.top1_agreement * self.samples + other.top1_agreement * other.samples) / max(1, samples)
        return LogitComparison(samples, max(self.max_abs_diff, other.max_abs_diff), max(self.max_rel_diff, other.max_rel_diff),
                               max(self.worst_excess, other.worst_excess), agreement,
                               self.top1_disagreements + other.top1_disagreements, self.near_ties + other.near_ties,
                               self.tolerance)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "passed": self.passed}


def compare_logits(result: np.ndarray, expected: np.ndarray, tolerance: Tolerance) -> LogitComparison:
    """Compare logits `result` with reference logits `expected` (both N x classes). A NaN or
    infinite difference never passes."""
    result, expected = np.asarray(result, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if result.shape != expected.shape or result.ndim != 2:
        raise ValueError(f"logits of shape {result.shape} cannot be compared with {expected.shape}")
    if len(expected) == 0:
        return LogitComparison(0, 0.0, 0.0, 0.0, 1.0, 0, 0, tolerance.to_dict())
    diff = np.abs(result - expected)
    diff = np.where(np.isfinite(diff), diff, np.inf)
    allowed = tolerance.allowed(expected)
    scale = np.abs(expected).max(axis=1)
    relative = diff.max(axis=1) / np.where(scale > 0, scale, 1.0)
    ordered = np.sort(expected, axis=1)
    margin = ordered[:, -1] - ordered[:, -2] if expected.shape[1] > 1 else np.full(len(expected), np.inf)
    tie = margin <= 2.0 * allowed[:, 0]
    agree = result.argmax(1) == expected.argmax(1)
    return LogitComparison(
        samples=len(expected), max_abs_diff=float(diff.max()), max_rel_diff=float(relative.max()),
        worst_excess=float((diff / allowed).max()), top1_agreement=float(agree.mean()),
        top1_disagreements=int((~agree & ~tie).sum()), near_ties=int(tie.sum()), tolerance=tolerance.to_dict(),
    )
