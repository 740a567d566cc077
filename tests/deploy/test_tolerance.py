"""Issue 14, kind 2: every numerical check is scale-aware, |y - e| <= atol + rtol * max|e| per
sample (lapp_edge.deploy.tolerance), so a correct model is never refused for having large logits
and a wrong one is refused at any scale. Torch-free, milliseconds."""

from __future__ import annotations

import numpy as np
import pytest

from lapp_edge.deploy.bundle import TOLERANCES
from lapp_edge.deploy.tolerance import EXPORT_FP32, RULE, RUNTIME_FP32, Tolerance, compare_logits


def logits(scale: float, seed: int = 0, count: int = 64) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((count, 10)) * scale).astype(np.float64)


@pytest.mark.parametrize("scale", [1e-2, 1.0, 10.0, 6000.0, 1e6])
def test_fp32_rounding_passes_at_every_logit_scale(scale: float) -> None:
    expected = logits(scale)
    result = (expected * (1 + np.random.default_rng(1).uniform(-2e-6, 2e-6, expected.shape))).astype(np.float32)
    check = compare_logits(result, expected, EXPORT_FP32)
    assert check.passed and check.top1_disagreements == 0, check
    if scale >= 6000:
        assert check.max_abs_diff > 1e-4          # an absolute 1e-4 limit would have refused it


@pytest.mark.parametrize("scale", [1.0, 10.0, 6000.0, 1e6])
def test_an_error_of_a_thousandth_of_the_logits_fails_at_every_scale(scale: float) -> None:
    expected = logits(scale)
    result = expected + 1e-3 * np.abs(expected).max(axis=1, keepdims=True)
    check = compare_logits(result, expected, EXPORT_FP32)
    assert not check.passed and check.worst_excess > 1.0
    assert check.max_rel_diff == pytest.approx(1e-3)


def test_the_rule_is_per_sample() -> None:
    # a sample with small logits is judged by its own scale, not by the batch's largest logit
    expected = np.array([[1000.0, -1000.0], [1.0, -1.0]])
    result = expected + np.array([[0.05, 0.05], [0.05, 0.05]])
    check = compare_logits(result, expected, Tolerance(rtol=1e-4, atol=1e-4))
    assert check.worst_excess == pytest.approx(0.05 / (1e-4 + 1e-4 * 1.0))
    assert not check.passed


def test_non_finite_never_passes() -> None:
    expected = logits(1.0)
    for bad in (np.nan, np.inf):
        result = expected.copy()
        result[3, 2] = bad
        assert not compare_logits(result, expected, EXPORT_FP32).passed


def test_a_top1_flip_fails_unless_it_is_a_near_tie() -> None:
    expected = np.array([[5.0, 1.0, 0.0], [2.0, 2.0 - 1e-7, 0.0]])
    flipped = expected[:, [1, 0, 2]]
    assert compare_logits(flipped[:1], expected[:1], EXPORT_FP32).top1_disagreements == 1
    tie = compare_logits(expected[1:] + np.array([[-1e-6, 1e-6, 0.0]]), expected[1:], EXPORT_FP32)
    assert tie.passed and tie.near_ties == 1 and tie.top1_agreement == 0.0


def test_merging_batches_equals_comparing_them_together() -> None:
    expected, result = logits(10.0), logits(10.0) + logits(1e-4, seed=2)
    whole = compare_logits(result, expected, EXPORT_FP32)
    merged = compare_logits(result[:40], expected[:40], EXPORT_FP32).merge(compare_logits(result[40:], expected[40:], EXPORT_FP32))
    assert merged.max_abs_diff == whole.max_abs_diff and merged.samples == whole.samples
    assert (merged.worst_excess, merged.top1_disagreements, merged.near_ties) == (whole.worst_excess, whole.top1_disagreements, whole.near_ties)
    assert merged.top1_agreement == pytest.approx(whole.top1_agreement)


def test_every_check_states_the_same_rule() -> None:
    for tolerance in (EXPORT_FP32, RUNTIME_FP32, *TOLERANCES.values()):
        assert tolerance.to_dict()["rule"] == RULE
        assert tolerance.rtol > 0 and tolerance.atol > 0
