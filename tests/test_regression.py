"""The statistical regression tests: significant AND larger than the allowed amount, on real and known samples."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.inventory import load_inventory
from pipeline.release.gate import evaluate
from pipeline.release.regression import compare_accuracy, compare_latency
from tests.fixtures.models import tflite_macs
from tests.gate_support import gate_models, heavy_models, write_targets  # noqa: F401  (fixtures)


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


def test_the_widened_cnn_does_ten_times_the_work_with_the_same_predictions(heavy_models):
    """The slowdown the real-agent tests use is built, not borrowed from a runtime: counted from the .tflite."""
    for mode in ("float32", "int8"):
        base, wide = heavy_models.artifact(mode), heavy_models.artifact(f"{mode}-x10")
        assert 8 <= tflite_macs(wide.path) / tflite_macs(base.path) <= 15
        a, b = (heavy_models.measure(v, runs=5)["accuracy"] for v in (mode, f"{mode}-x10"))
        assert a == b


def test_real_agent_samples_detect_a_tenfold_workload(tmp_path, heavy_models):
    """One runtime, one mode, one thread; only the work differs. At a limit of "more than 3x slower" the 10x model
    is flagged and an independent re-measurement of the same model is not (runs drift up to ~1.6x here)."""
    gm = heavy_models
    pi = [{"name": "pi", "kind": "cpu", "mode": "float32"}]
    inv = load_inventory(write_targets(tmp_path / "targets.yaml", pi,
                                       {"max_latency_regression": 2.0, "min_latency_regression_ms": 0}))
    base_path, wide_path = gm.artifact("float32").path, gm.artifact("float32-x10").path
    # Each run re-measures the other model interleaved on the device, as `edgepipe run` does when the artifact
    # changed; "again" re-measures the very same model beside itself (an A/A pair inside one run).
    base = gm.run("base", [gm.device("pi", "float32", runs=200, baseline_model=wide_path)])
    again = gm.run("again", [gm.device("pi", "float32", runs=200, take=1, baseline_model=base_path)])
    wide = gm.run("wide", [gm.device("pi", "float32-x10", runs=200, baseline_model=base_path)])

    def latency(run, baseline):
        [c] = [c for c in evaluate(run, inv, baseline).checks if c.gate == "max_latency_regression"]
        return c

    slower = latency(wide, base)
    assert not slower.passed and slower.measured > 2.0 and "interleaved" in slower.note
    # the same model beside itself: compared (not skipped), and within the limit
    aa = latency(again, base)
    assert aa.passed and not aa.skipped and aa.measured is not None and aa.measured < 2.0, aa.message()
    faster = latency(base, wide)
    assert faster.passed and not faster.skipped and faster.measured < 0, faster.message()


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
