"""The health check of an installed release: the agent measures the file `current` points to (`--expect-sha256`,
the run's smoke inputs, `--outputs-out`), and the host compares what it computed with what was gated for the
board's device class: the runtime and accelerator it ran on, each output (class outputs by top-1 agreement, others
by SNR in dB; thresholds in targets.yaml `deploy.health`) and the p50 (`max_latency_regression`, with an absolute
floor `min_latency_regression_ms`, as the gate's regression check).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.devices.board import guard_argv
from pipeline.devices.fleet import agent_argv, result_from_output
from pipeline.devices.push import PushItem, fetch_verified, safe_name
from pipeline.errors import EdgepipeError
from pipeline.metrics.agreement import compare
from pipeline.results import ErrorInfo


@dataclass
class Check:
    name: str
    ok: bool
    measured: Any = None
    threshold: Any = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "measured": self.measured, "threshold": self.threshold,
                **({"note": self.note} if self.note else {})}


@dataclass
class Health:
    """The verdict on one board after a switch: ok, each check, the figures."""

    ok: bool
    checks: list[Check] = field(default_factory=list)
    p50_ms: float | None = None
    gated_p50_ms: float | None = None
    runtime: str | None = None
    error: ErrorInfo | None = None

    def failed(self, code: str, message: str) -> "Health":
        self.ok, self.error = False, ErrorInfo(code, message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "p50_ms": self.p50_ms, "gated_p50_ms": self.gated_p50_ms, "runtime": self.runtime,
                "checks": [c.to_dict() for c in self.checks],
                "error": self.error.to_dict() if self.error else None}


def _threshold(value: Any, name: str) -> float | None:
    return value.get(name) if isinstance(value, dict) else value


def probabilities(a: np.ndarray) -> bool:
    """Rows of class probabilities (a softmax): [N, C>1], values in [0, 1], each row summing to 1."""
    if a.ndim != 2 or a.shape[1] < 2 or a.dtype.kind != "f":
        return False
    x = a.astype(np.float64)
    return bool(np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1 and np.allclose(x.sum(axis=1), 1, atol=0.02))


def compare_outputs(dev: dict[str, np.ndarray], ref: dict[str, np.ndarray], thresholds: Any) -> list[Check]:
    """Checks per gated output: integer (argmax-reduced) outputs by agreement; float outputs by SNR against the
    gated ones, and class probabilities also by top-1 agreement."""
    checks = []
    for name, want in sorted(ref.items()):
        got = dev.get(name)
        if got is None or len(got) < len(want):
            checks.append(Check(f"output {name}", False, note="missing from the board's outputs"))
            continue
        got = got[: len(want)]
        if want.dtype.kind in "iu" or got.dtype.kind in "iu":
            value = float((got.reshape(len(want), -1) == want.reshape(len(want), -1)).mean())
            checks.append(Check(f"output {name} agreement", value >= thresholds.min_agreement, round(value, 4),
                                thresholds.min_agreement))
            continue
        is_class = probabilities(want)
        try:
            figures = compare(got, want, class_output=is_class)
        except ValueError as exc:
            checks.append(Check(f"output {name}", False, note=str(exc)))
            continue
        limit = _threshold(thresholds.min_snr_db, name)
        checks.append(Check(f"output {name} snr_db", limit is None or figures["snr_db"] >= limit,
                            round(figures["snr_db"], 2), limit))
        if is_class:
            value = figures["top1_agreement"]
            checks.append(Check(f"output {name} agreement", value >= thresholds.min_agreement, round(value, 4),
                                thresholds.min_agreement))
    return checks


def latency_check(p50: float | None, gated: float | None, thresholds: Any) -> Check | None:
    """p50 against the gated p50: too slow when both over the fraction and over the absolute floor (without
    `max_latency_regression` the comparison is shown, not gated, as the run gate's regression check)."""
    limit = thresholds.max_latency_regression
    if not p50 or not gated:
        return None
    slower = p50 / gated - 1.0
    if limit is None:
        return Check("p50 regression", True, round(slower, 4), None,
                     note=f"p50 {p50:.3f} ms vs gated {gated:.3f} ms; not gated (set deploy.health."
                          "max_latency_regression)")
    bad = slower > limit and (p50 - gated) > thresholds.min_latency_regression_ms
    return Check("p50 regression", not bad, round(slower, 4), limit,
                 note=f"p50 {p50:.3f} ms vs gated {gated:.3f} ms (floor {thresholds.min_latency_regression_ms} ms)")


def measure(board: Any, target: Any, reference: Any, cls: Any, items: dict[str, PushItem], *, sha256: str,
            thresholds: Any, work: str, require_class: bool = True) -> Health:
    """Run the agent on the board's `current` model over the smoke inputs and judge it against `reference`
    (a pipeline.rollout.release.Gated of the board's class `cls`). `items`: the pushed "agent" and "smoke".

    `require_class` False (going back to the release a board ran before): a runtime or accelerator other than the
    one gated is noted, not failed; the outputs and p50 must still hold."""
    health = Health(ok=True, gated_p50_ms=reference.p50)
    pusher = board.pusher
    out = pusher.path(f"runs/{work}/{safe_name(target.name)}.json")
    extra = [("--outputs-out", out[: -len(".json")] + ".outputs.npz")]
    extra += [("--reduce", f"{k}={v}") for k, v in sorted((reference.smoke.reduce or {}).items())]
    argv = agent_argv(replace(target, runs=thresholds.runs or target.runs), pusher.path(items["agent"].rel),
                      board.model_path, pusher.path(items["smoke"].rel), out, extra, expect_sha256=sha256,
                      guard=guard_argv(target, f"deploy-{work}", pusher.abs_workdir))   # alone on the board, bound here
    res = board.t.run(argv, timeout=target.timeout, hold_stdin=True)
    if res.timed_out:
        return health.failed("timeout", f"the health check did not finish within {target.timeout:g}s")
    dev = result_from_output(target, res.stdout, res.rc, res.stderr_tail())
    if not dev.ok:
        return health.failed(dev.error.code, f"health check: {dev.error.message}")
    m = dev.measured
    health.p50_ms, health.runtime = m.latency.p50, m.runtime_label
    used = m.accelerator.used or m.accelerator.requested or "cpu"
    for name, got, want in (("runtime", m.runtime, cls.runtime), ("accelerator", used, cls.accelerator)):
        same = got == want
        health.checks.append(Check(name, same or not require_class, got, want,
                                   note="" if same or require_class else "differs from the gated class (noted: "
                                                                         "going back to what the board ran)"))
    try:
        arrays = _fetch(board, m.outputs)
    except (EdgepipeError, OSError, ValueError, KeyError) as exc:
        return health.failed("collect_failed", f"could not fetch the health check's outputs: {exc}")
    health.checks += compare_outputs(arrays, reference.smoke.outputs, thresholds)
    lat = latency_check(health.p50_ms, reference.p50, thresholds)
    if lat is not None:
        health.checks.append(lat)
    bad = [c for c in health.checks if not c.ok]
    if bad:
        first = bad[0]
        code = {"runtime": "runtime_changed", "accelerator": "accelerator_changed",
                "p50 regression": "latency_regression"}.get(first.name, "outputs_differ")
        return health.failed(code, "; ".join(f"{c.name} {c.measured} (expected {c.threshold})" for c in bad))
    return health


def _fetch(board: Any, block: dict[str, Any] | None) -> dict[str, np.ndarray]:
    if not block:
        raise ValueError("the agent wrote no outputs file")
    with tempfile.TemporaryDirectory(prefix="edgepipe-health-") as tmp:
        local = Path(tmp) / "outputs.npz"
        fetch_verified(board.t, block["path"], local, block["sha256"])
        with np.load(local, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
