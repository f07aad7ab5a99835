"""Choosing among measured candidates so that noise does not choose.

A latency advantage counts only when it is significant in the same run and larger than --min-gain: the regression
gate's comparisons (`pipeline.release.regression`) answer "is b slower than a, significantly and by more than the
allowed amount?" with a = the faster candidate. Two candidates timed interleaved in one agent process (the agent's
`--baseline-model`, alternating rounds) are compared round by round (`compare_paired`: drift hits both alike);
otherwise each one's own samples are bootstrapped (`compare_latency`). Where an advantage decides against a smaller
candidate and was not timed interleaved yet, `Decision.pending` asks for it. Candidates whose difference does not
count tie, and a tie goes to the smaller artifact, then to the more integer one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.int8_recovery import short
from pipeline.optimize.candidates import DEFAULT_MIN_GAIN, Candidate
from pipeline.release.regression import compare_latency, compare_paired

MODE_ORDER = ("int8", "int16x8", "dynamic", "float16", "float32")   # most integer first
MAX_SAMPLES = 2000       # samples per side kept for the bootstrap (evenly spaced): long runs stay cheap to compare
MAX_PAIRS = 6            # pairs timed interleaved per class and round


def integer_rank(c: Candidate) -> tuple[float, int]:
    """The more integer first: a larger share of 8-bit ops, then the mode."""
    return -(c.int8_share or 0.0), MODE_ORDER.index(c.mode) if c.mode in MODE_ORDER else len(MODE_ORDER)


def preference(c: Candidate) -> tuple[Any, ...]:
    """How a tie is broken: the smaller artifact, then the more integer one."""
    return (c.bytes or 0, *integer_rank(c), c.variant)


def among(c: Candidate, cands: list[Candidate]) -> bool:
    """Membership by identity (a dataclass's == would compare every field, samples included)."""
    return any(c is x for x in cands)


def _thin(samples: list[float]) -> np.ndarray:
    a = np.asarray(samples, dtype=float)
    return a if len(a) <= MAX_SAMPLES else a[np.linspace(0, len(a) - 1, MAX_SAMPLES).astype(int)]


class Evidence:
    """One class's latency evidence: each candidate's own samples (on the candidate) and the pairs timed
    interleaved on a device. `compare(a, b)`: does a's advantage over b count?"""

    def __init__(self, min_gain: float = DEFAULT_MIN_GAIN) -> None:
        self.min_gain = float(min_gain) / 100.0
        self.paired: dict[tuple[str, str, str], dict[str, Any]] = {}   # (x, y, device) -> x, y samples, rounds
        self.tried: set[frozenset[str]] = set()
        self._memo: dict[tuple[str, str], dict[str, Any]] = {}

    def add_paired(self, device: str, model: Candidate, baseline: Candidate, block: dict[str, Any] | None) -> None:
        """The agent's `paired` block of `model` measured with `baseline` interleaved (or why it is missing)."""
        self.tried.add(frozenset((model.variant, baseline.variant)))
        self._memo.clear()
        block = block or {"error": "not measured"}
        if block.get("error") or not block.get("samples_ms"):
            self.paired[(baseline.variant, model.variant, device)] = {"error": block.get("error") or "no samples"}
            return
        self.paired[(baseline.variant, model.variant, device)] = {
            "x": block["baseline_samples_ms"], "y": block["samples_ms"], "rounds": block.get("rounds", 0)}

    def interleaved(self, a: Candidate, b: Candidate) -> bool:
        return frozenset((a.variant, b.variant)) in self.tried

    def _pair(self, a: Candidate, b: Candidate, device: str) -> tuple[Any, Any, int] | str | None:
        """(a's, b's interleaved samples, rounds), the reason they are missing, or None when never tried."""
        for (x, y), flip in (((a.variant, b.variant), False), ((b.variant, a.variant), True)):
            got = self.paired.get((x, y, device))
            if got is not None:
                if "error" in got:
                    return got["error"]
                return (got["y"], got["x"], got["rounds"]) if flip else (got["x"], got["y"], got["rounds"])
        return None

    def _one(self, a: Candidate, b: Candidate, device: str) -> dict[str, Any]:
        pair, note = self._pair(a, b, device), None
        try:
            if isinstance(pair, tuple):
                cmp = compare_paired(pair[0], pair[1], pair[2], self.min_gain)
                method = "interleaved"
            else:
                note = f"not interleaved: {pair}" if isinstance(pair, str) else None
                cmp = compare_latency(_thin(a.samples[device]), _thin(b.samples[device]), self.min_gain)
                method = "within-run"
        except ValueError as exc:   # too few samples or rounds to bound the ratio: the advantage does not count
            return {"device": device, "method": "too few samples", "counts": False, "significant": False,
                    "ratio": b.p50_ms / a.p50_ms if a.p50_ms else None, "ci_low": None, "ci_high": None,
                    "note": str(exc)}
        return {"device": device, "method": method, "counts": bool(cmp.regressed), "significant": cmp.significant,
                "ratio": cmp.ratio, "ci_low": cmp.ci_low, "ci_high": cmp.ci_high, "rounds": cmp.rounds, "note": note}

    def compare(self, a: Candidate, b: Candidate) -> dict[str, Any]:
        """a's latency advantage over b: counts when significant and b slower by more than --min-gain on every
        device both were measured on. Without samples (a hand-made candidate), the p50s as they stand."""
        key = (a.variant, b.variant)
        if key not in self._memo:
            devices = [d for d in a.samples if d in b.samples]
            if not devices or not a.p50_ms or b.p50_ms is None:
                ratio = b.p50_ms / a.p50_ms if a.p50_ms and b.p50_ms is not None else None
                out = {"device": None, "method": "p50", "significant": None, "ci_low": None, "ci_high": None,
                       "ratio": ratio, "counts": ratio is not None and ratio > 1.0 + self.min_gain, "note": None}
            else:
                each = [self._one(a, b, d) for d in devices]
                weakest = [e for e in each if not e["counts"]] or sorted(each, key=lambda e: e["ratio"] or 0)
                out = dict(weakest[0], counts=all(e["counts"] for e in each))
            self._memo[key] = dict(out, faster=a.variant, slower=b.variant)
        return self._memo[key]

    def counts(self, a: Candidate, b: Candidate) -> bool:
        return a is not b and bool(self.compare(a, b)["counts"])


@dataclass
class Decision:
    chosen: Candidate | None
    fastest: Candidate | None = None
    tied: list[Candidate] = field(default_factory=list)      # as fast as the fastest (itself included)
    pending: list[tuple[Candidate, Candidate]] = field(default_factory=list)   # (a, b) to time interleaved
    ok: list[Candidate] = field(default_factory=list)        # within budget and measured


def _effective(ok: list[Candidate], ev: Evidence) -> dict[int, float]:
    """Each candidate's latency as far as it counts: the p50 of the fastest candidate it is not slower than."""
    return {id(c): min(g.p50_ms for g in ok if g.p50_ms <= c.p50_ms and not ev.counts(g, c)) for c in ok}


def decide(cands: list[Candidate], objective: str, evidence: Evidence | None = None) -> Decision:
    """The best candidate within budget by the objective, advantages counted as the module says."""
    ev = evidence or Evidence()
    ok = [c for c in cands if c.within_budget and c.p50_ms is not None and c.bytes]
    if not ok:
        return Decision(None)
    fastest = min(ok, key=lambda c: (c.p50_ms, preference(c)))
    tied = [c for c in ok if not ev.counts(fastest, c)]
    eff = _effective(ok, ev) if objective == "balanced" else {id(c): c.p50_ms for c in ok}
    if objective == "size":
        chosen = min(ok, key=lambda c: (c.bytes, integer_rank(c), c.p50_ms))
    elif objective == "latency":
        chosen = min(tied, key=preference)
    else:   # balanced: equal weight to relative latency (as far as it counts) and relative size (geometric)
        b0 = min(c.bytes for c in ok)
        chosen = min(ok, key=lambda c: (round(math.log(max(eff[id(c)], 1e-12) / max(fastest.p50_ms, 1e-12))
                                              + math.log(c.bytes / b0), 9), preference(c)))
    pending: list[tuple[Candidate, Candidate]] = []
    if objective != "size":   # advantages that beat a smaller candidate must hold up interleaved
        for b in sorted((b for b in ok if preference(b) < preference(chosen)), key=preference):
            rivals = [fastest] if objective == "latency" else [g for g in ok if g.p50_ms < eff[id(b)]]
            pending += [(a, b) for a in rivals if ev.counts(a, b) and not ev.interleaved(a, b)]
    return Decision(chosen, fastest, tied, pending[:MAX_PAIRS], ok)


def choose(candidates: list[Candidate], objective: str, evidence: Evidence | None = None) -> Candidate | None:
    return decide(candidates, objective, evidence).chosen


# ---------------------------------------------------------------- saying why

def times(r: float) -> str:
    """3.5× (1.03× when close to 1, where one decimal would read 1.0×)."""
    return f"{r:.2f}×" if r < 1.95 else f"{r:.1f}×"


def ratio_text(cmp: dict[str, Any]) -> str:
    """'×1.021, 90 % interval ×0.983–1.062, timed interleaved over 20 rounds'."""
    if cmp.get("ratio") is None:
        return "not comparable"
    parts = [f"×{cmp['ratio']:.3f}"]
    if cmp.get("ci_low") is not None:
        parts.append(f"90 % interval ×{cmp['ci_low']:.3f}–{cmp['ci_high']:.3f}")
    how = {"interleaved": f"timed interleaved over {cmp.get('rounds')} rounds",
           "within-run": "timed one after the other", "p50": "p50s as given"}.get(cmp["method"], cmp["method"])
    return ", ".join(parts + [how])


def why_chosen(d: Decision, objective: str, ev: Evidence) -> str:
    """Why the winner won, in a phrase: 'int8: as fast as float32 within noise (×1.02, ...), 3.5× smaller'."""
    c, f = d.chosen, d.fastest
    if c is None or f is None:
        return ""
    if objective == "size":
        return f"{c.variant}: the smallest within budget"
    gain = f"--min-gain {ev.min_gain * 100:g} %"
    if c is not f:
        cmp = ev.compare(f, c)
        if not among(c, d.tied):   # balanced: slower beyond noise, but smaller by more
            return (f"{c.variant}: the best balance of latency and size ({f.variant} is faster, {ratio_text(cmp)}; "
                    f"{c.variant} is {times(f.bytes / c.bytes)} smaller)")
        lead = "within noise" if not cmp.get("significant") else f"within {gain}"
        smaller = f"{times(f.bytes / c.bytes)} smaller" if f.bytes > c.bytes else "as small and more integer"
        return f"{c.variant}: as fast as {f.variant} {lead} ({ratio_text(cmp)}), {smaller}"
    smaller = sorted((b for b in d.ok if preference(b) < preference(c)), key=preference)
    if not smaller:
        return f"{c.variant}: the fastest, and nothing smaller is within budget"
    b = smaller[0]
    return (f"{c.variant}: the fastest, ahead of the smaller {b.variant} beyond noise and {gain} "
            f"({b.variant} {ratio_text(ev.compare(c, b))})")


def layer_text(x: dict[str, Any], ranking: dict[str, Any] | None) -> str:
    """One ranked layer with both figures: what keeping it in float measurably did on the host, and its per-tensor
    error (RMSE in steps of its scale, and relative to the float tensor's own magnitude)."""
    cheap = f"rmse/scale {x['rmse_scale']:.2f}, relative error {x.get('rel_error', 0.0):.2f}"
    e, base = x.get("effect"), (ranking or {}).get("int8") or {}
    if not e:
        return f"{short(x['name'])} ({cheap}; not measured)"
    metric = (ranking or {}).get("metric", "agreement")
    with_readers = f" with {len(x['keep_float']) - 1} reader(s)" if len(x.get("keep_float") or []) > 1 else ""
    return (f"{short(x['name'])} (in float{with_readers}: {metric} {base.get(metric) or 0:.2f} -> "
            f"{e.get(metric) or 0:.2f}, SNR {base.get('snr_db', 0):.1f} -> {e['snr_db']:.1f} dB on "
            f"{(ranking or {}).get('holdout')} held-out calibration samples; {cheap})")
