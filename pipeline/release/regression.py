"""Statistical regression tests against a baseline run: latency from raw samples, accuracy from counts.

A regression fails only when it is both statistically significant and larger than the allowed amount, so
noise alone does not fail a release, and a real but negligible change does not either.

Two whole runs of the same model on the same device drift apart by far more than one run's samples vary (up to
x1.5 on a busy machine), so the latency gate never compares two runs' samples as if they were one experiment:
- `compare_paired`: the baseline's model is re-measured on the device in the same run, interleaved with the new
  one in alternating rounds; the ratio is taken round by round, so whatever slows the device slows both;
- `compare_across_runs` (same artifact, or the baseline's model is gone): the new run's median against the
  baseline's, significant only beyond the run-to-run spread of that artifact on that device in the history.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

CONFIDENCE = 0.95      # one-sided: the slowdown is significant when the lower 95 % bound of the ratio exceeds 1
N_BOOTSTRAP = 2000
MIN_SAMPLES = 5
MIN_ROUNDS = 6         # paired rounds needed to bound a ratio
MIN_HISTORY = 5        # earlier runs of the same artifact on the device needed to know its run-to-run spread
ACROSS_RUNS_CONFIDENCE = 0.99  # across runs the spread itself is estimated from few runs: stricter
SPREAD_FLOOR = 0.01    # log-ratio spread never assumed below 1 %, however steady the history looked


@dataclass
class LatencyComparison:
    """Ratio of medians (new / baseline) with a bootstrap confidence bound; regressed = significant AND too large."""

    base_median: float
    new_median: float
    ratio: float
    ci_low: float
    ci_high: float
    n_base: int
    n_new: int
    max_regression: float
    significant: bool
    regressed: bool
    min_delta_ms: float = 0.0
    method: str = "within-run"   # paired | across-runs | within-run (the old sample bootstrap)
    rounds: int = 0              # paired: rounds compared
    spread: float | None = None  # across-runs: run-to-run spread (std of log median) of this artifact
    history_runs: int = 0        # across-runs: earlier runs the spread comes from

    @property
    def slowdown(self) -> float:
        """Fractional slowdown, e.g. 0.2 for 20 % slower."""
        return self.ratio - 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AccuracyComparison:
    """Top-1 drop in points with a one-sided two-proportion z-test; regressed = significant AND too large."""

    base_top1: float
    new_top1: float
    drop_points: float
    n_base: int
    n_new: int
    p_value: float
    max_drop_points: float
    significant: bool
    regressed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_median_ratio(base: np.ndarray, new: np.ndarray, *, n_boot: int = N_BOOTSTRAP,
                           seed: int = 0) -> np.ndarray:
    """Bootstrap distribution of median(new) / median(base), resampling each sample set independently."""
    rng = np.random.default_rng(seed)
    # Chunked so memory stays small for long sample sets (runs=5000 would be 10 M indices at once).
    chunk = max(1, 2_000_000 // max(len(base), len(new)))
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        mb = np.median(base[rng.integers(0, len(base), (k, len(base)))], axis=1)
        mn = np.median(new[rng.integers(0, len(new), (k, len(new)))], axis=1)
        out[start:start + k] = mn / mb
    return out


def compare_latency(base_samples: Sequence[float], new_samples: Sequence[float], max_regression: float, *,
                    min_delta_ms: float = 0.0, confidence: float = CONFIDENCE, n_boot: int = N_BOOTSTRAP,
                    seed: int = 0) -> LatencyComparison:
    """Compare raw per-invoke latency samples (ms) of a baseline and a new run of the same target and mode.

    Significant: the one-sided lower confidence bound of the ratio of medians is above 1. Regressed: significant,
    the ratio itself above 1 + max_regression (e.g. 1.10), and the median at least `min_delta_ms` slower (an
    absolute floor, so microsecond models do not fail on timer and cache noise).
    """
    base = np.asarray(base_samples, dtype=float)
    new = np.asarray(new_samples, dtype=float)
    base = base[np.isfinite(base) & (base > 0)]
    new = new[np.isfinite(new) & (new > 0)]
    if len(base) < MIN_SAMPLES or len(new) < MIN_SAMPLES:
        raise ValueError(f"need at least {MIN_SAMPLES} positive latency samples on each side "
                         f"(baseline {len(base)}, new {len(new)})")
    ratio = float(np.median(new) / np.median(base))
    boot = bootstrap_median_ratio(base, new, n_boot=n_boot, seed=seed)
    alpha = 1.0 - confidence
    ci_low, ci_high = (float(v) for v in np.quantile(boot, [alpha, 1.0 - alpha]))
    significant = ci_low > 1.0
    return LatencyComparison(
        base_median=float(np.median(base)), new_median=float(np.median(new)), ratio=ratio, ci_low=ci_low,
        ci_high=ci_high, n_base=len(base), n_new=len(new), max_regression=float(max_regression),
        significant=significant, min_delta_ms=float(min_delta_ms),
        regressed=significant and ratio > 1.0 + max_regression
        and float(np.median(new) - np.median(base)) > min_delta_ms,
    )


def _clean(samples: Sequence[float]) -> np.ndarray:
    a = np.asarray(samples, dtype=float)
    return a[np.isfinite(a) & (a > 0)]


def compare_paired(base_samples: Sequence[float], new_samples: Sequence[float], rounds: int, max_regression: float,
                   *, min_delta_ms: float = 0.0, confidence: float = CONFIDENCE, n_boot: int = N_BOOTSTRAP,
                   seed: int = 0) -> LatencyComparison:
    """New vs baseline model timed interleaved in one run: `rounds` equal blocks of samples each, in time order.

    The ratio is the median over rounds of median(new round) / median(baseline round); its one-sided lower bound
    comes from resampling rounds. Regressed: significant, above 1 + max_regression, and `min_delta_ms` slower.
    """
    base, new = np.asarray(base_samples, dtype=float), np.asarray(new_samples, dtype=float)
    rounds = int(rounds)
    if rounds < MIN_ROUNDS or len(base) < rounds or len(new) < rounds:
        raise ValueError(f"need at least {MIN_ROUNDS} paired rounds (got {rounds} rounds, "
                         f"{len(base)} baseline and {len(new)} new samples)")
    nb, nn = len(base) // rounds, len(new) // rounds
    logs = np.array([np.log(np.median(new[r * nn:(r + 1) * nn])) - np.log(np.median(base[r * nb:(r + 1) * nb]))
                     for r in range(rounds)])
    if not np.all(np.isfinite(logs)):
        raise ValueError("paired samples hold non-positive latencies")
    rng = np.random.default_rng(seed)
    boot = np.median(logs[rng.integers(0, rounds, (n_boot, rounds))], axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    ratio = float(np.exp(np.median(logs)))
    b, n = _clean(base), _clean(new)
    significant = bool(lo > 0.0)
    return LatencyComparison(
        base_median=float(np.median(b)), new_median=float(np.median(n)), ratio=ratio, ci_low=float(np.exp(lo)),
        ci_high=float(np.exp(hi)), n_base=len(b), n_new=len(n), max_regression=float(max_regression),
        significant=significant, min_delta_ms=float(min_delta_ms), method="paired", rounds=rounds,
        regressed=significant and ratio > 1.0 + max_regression
        and float(np.median(n) - np.median(b)) > min_delta_ms,
    )


def compare_across_runs(base_median: float, new_median: float, history_medians: Sequence[float],
                        max_regression: float, *, min_delta_ms: float = 0.0,
                        confidence: float = ACROSS_RUNS_CONFIDENCE) -> LatencyComparison:
    """The new run's median vs the baseline run's, against the run-to-run spread of the same artifact on the device.

    `history_medians` are earlier runs' medians (at least MIN_HISTORY). With s the standard deviation of their logs,
    log(new / base) has spread s * sqrt(2) between two runs; the lower bound is the ratio divided by
    exp(t(confidence, n-1) * s * sqrt(2)). Regressed: that bound above 1, the ratio above 1 + max_regression, and
    the median `min_delta_ms` slower.
    """
    from scipy.stats import t as student_t

    hist = _clean(history_medians)
    if len(hist) < MIN_HISTORY:
        raise ValueError(f"{len(hist)} earlier run(s) of this artifact on this device; {MIN_HISTORY} are needed to "
                         "know its run-to-run spread")
    if not (base_median > 0 and new_median > 0):
        raise ValueError("medians must be positive")
    spread = max(float(np.std(np.log(hist), ddof=1)), SPREAD_FLOOR)
    band = float(student_t.ppf(confidence, len(hist) - 1)) * spread * np.sqrt(2.0)
    ratio = float(new_median / base_median)
    ci_low, ci_high = ratio / float(np.exp(band)), ratio * float(np.exp(band))
    significant = ci_low > 1.0
    return LatencyComparison(
        base_median=float(base_median), new_median=float(new_median), ratio=ratio, ci_low=ci_low, ci_high=ci_high,
        n_base=1, n_new=1, max_regression=float(max_regression), significant=significant,
        min_delta_ms=float(min_delta_ms), method="across-runs", spread=spread, history_runs=len(hist),
        regressed=significant and ratio > 1.0 + max_regression and new_median - base_median > min_delta_ms,
    )


def _normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def compare_accuracy(base_top1: float, n_base: int, new_top1: float, n_new: int, max_drop_points: float, *,
                     confidence: float = CONFIDENCE) -> AccuracyComparison:
    """One-sided two-proportion z-test that the new top-1 is lower than the baseline's.

    Both runs usually score the same evaluation set, so the samples are paired; the unpaired test is the
    conservative choice when per-example predictions are not kept (it flags fewer drops, never more).
    """
    if n_base <= 0 or n_new <= 0:
        raise ValueError("accuracy comparison needs a positive sample count on both sides")
    drop = (base_top1 - new_top1) * 100.0
    pooled = (base_top1 * n_base + new_top1 * n_new) / (n_base + n_new)
    se = math.sqrt(max(pooled * (1.0 - pooled), 0.0) * (1.0 / n_base + 1.0 / n_new))
    if se == 0.0:
        p_value = 0.0 if drop > 0 else 1.0
    else:
        p_value = _normal_sf((base_top1 - new_top1) / se)
    significant = p_value < 1.0 - confidence
    return AccuracyComparison(
        base_top1=float(base_top1), new_top1=float(new_top1), drop_points=float(drop), n_base=int(n_base),
        n_new=int(n_new), p_value=float(p_value), max_drop_points=float(max_drop_points), significant=significant,
        regressed=significant and drop > max_drop_points,
    )
