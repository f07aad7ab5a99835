"""The statistical regression tests: significant AND larger than the allowed amount, on real and known samples."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.release.regression import compare_accuracy, compare_latency
from tests.gate_support import gate_models  # noqa: F401  (fixture)


def _lognormal(median: float, n: int, seed: int, sigma: float = 0.15) -> np.ndarray:
    """Latency-like samples (right-skewed) with a known median."""
    return median * np.random.default_rng(seed).lognormal(0.0, sigma, n)


def test_same_distribution_is_not_a_regression():
    cmp = compare_latency(_lognormal(5.0, 300, 1), _lognormal(5.0, 300, 2), 0.10)
    assert not cmp.regressed
    assert cmp.ci_low <= 1.0 + 0.05 and abs(cmp.ratio - 1.0) < 0.05


def test_large_significant_slowdown_is_a_regression():
    cmp = compare_latency(_lognormal(5.0, 300, 1), _lognormal(6.0, 300, 2), 0.10)
    assert cmp.significant and cmp.regressed
    assert cmp.ci_low > 1.0 and cmp.ci_low < cmp.ratio < cmp.ci_high
    assert cmp.slowdown == pytest.approx(0.2, abs=0.05)


def test_significant_but_small_slowdown_passes():
    """5 % slower with many samples: real, but under a 10 % allowance."""
    cmp = compare_latency(_lognormal(5.0, 3000, 1, 0.05), _lognormal(5.25, 3000, 2, 0.05), 0.10)
    assert cmp.significant and not cmp.regressed


def test_absolute_floor_keeps_microsecond_drift_from_failing_but_not_real_slowdowns():
    """A 30 % slowdown of a 2 us model adds 0.6 us: under a 0.05 ms floor. The same 30 % on 5 ms fails."""
    tiny = compare_latency(_lognormal(0.002, 300, 1), _lognormal(0.0026, 300, 2), 0.10, min_delta_ms=0.05)
    assert tiny.significant and tiny.ratio > 1.2 and not tiny.regressed
    big = compare_latency(_lognormal(5.0, 300, 1), _lognormal(6.5, 300, 2), 0.10, min_delta_ms=0.05)
    assert big.regressed


def test_large_but_noisy_slowdown_with_few_samples_is_not_significant():
    base = np.array([5, 9, 4, 12, 5, 8, 3, 11], dtype=float)
    new = base[::-1] * 1.25
    cmp = compare_latency(base, new, 0.10)
    assert cmp.ratio > 1.10 and not cmp.significant and not cmp.regressed


def test_speedup_is_never_a_regression():
    cmp = compare_latency(_lognormal(6.0, 200, 1), _lognormal(3.0, 200, 2), 0.10)
    assert cmp.ratio < 1 and not cmp.significant and not cmp.regressed


def test_too_few_samples_is_an_error_not_a_verdict():
    with pytest.raises(ValueError, match="at least"):
        compare_latency([1.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0], 0.1)


def test_real_agent_samples_detect_a_runtime_slowdown(gate_models):
    """tflite-runtime's float kernels vs LiteRT on the same model: raw samples from the real agent."""
    fast = gate_models.measure("float32", "litert", runs=200)["samples_ms"]
    slow = gate_models.measure("float32", "tflite-runtime", runs=200)["samples_ms"]
    assert compare_latency(fast, slow, 0.10).regressed
    assert not compare_latency(slow, fast, 0.10).regressed


def test_accuracy_drop_needs_significance_and_size():
    # 1 point on 540 examples: within noise.
    small = compare_accuracy(0.98, 540, 0.97, 540, 0.5)
    assert not small.significant and not small.regressed
    # 27 points: significant and far beyond a 1-point allowance.
    big = compare_accuracy(0.98, 540, 0.71, 540, 1.0)
    assert big.significant and big.regressed and big.drop_points == pytest.approx(27.0)
    # 3 points on 20 000 examples: significant, but allowed up to 5 points.
    allowed = compare_accuracy(0.90, 20000, 0.87, 20000, 5.0)
    assert allowed.significant and not allowed.regressed
    # Better accuracy is never a regression.
    assert not compare_accuracy(0.80, 540, 0.95, 540, 0.0).regressed


def test_identical_perfect_accuracy_is_not_a_regression():
    cmp = compare_accuracy(1.0, 100, 1.0, 100, 0.0)
    assert cmp.p_value == 1.0 and not cmp.regressed
