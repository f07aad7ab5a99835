"""The conditions a device was measured under, as the gate, the report and the CI outputs name them.

The agent reads `vcgencmd get_throttled`, cpufreq and temperatures before and after its timed runs and marks the
result `conditions.throttled`; the fleet re-measures a throttled device once (`gates.conditions.throttled:
remeasure`) and adds `remeasured`. Memory is the agent's `memory` block (MB of 2^20 bytes from a mark after
imports), start-up its `latency_ms.init` and `latency_ms.first`.
"""
from __future__ import annotations

from typing import Any

from pipeline.results import DeviceResult


def throttle_text(cond: dict[str, Any]) -> str:
    """`under_voltage, throttled during the timed runs (re-measured after 30 s: throttled again)`."""
    flags = ", ".join(cond.get("flags") or []) or "throttled"
    text = f"{flags} during the timed runs"
    first = cond.get("first") or {}
    if cond.get("remeasure_error"):   # the first result stands
        return text + f"; the re-measurement after the cooldown failed: {cond['remeasure_error']}"
    if cond.get("remeasured"):
        again = f"throttled again ({flags})" if cond.get("throttled") else "clean"
        text = (f"{', '.join(first.get('flags') or []) or 'throttled'} during the first timed runs; re-measured "
                f"after {first.get('cooldown_s', 0):g} s: {again}")
    return text


def resource_figures(device: DeviceResult) -> dict[str, Any]:
    """Memory, start-up and conditions figures of a measured device, flat, as JUnit and Markdown show them."""
    if not device.ok:
        return {}
    m = device.measured
    mem, lat, cond = m.memory, m.block("latency_ms"), m.conditions
    out = {k: mem.get(k) for k in ("process_peak_mb", "model_load_mb", "model_peak_mb") if mem.get(k) is not None}
    if mem.get("source"):
        out["memory_source"] = mem["source"]
    out.update({k: lat.get(src) for k, src in (("init_ms", "init"), ("first_inference_ms", "first"),
                                               ("p90_ms", "p90"), ("p99_ms", "p99"), ("samples", "n"))
                if lat.get(src) is not None})
    if cond:
        out.update(throttled=cond.get("throttled"), remeasured=bool(cond.get("remeasured")),
                   flags=", ".join(cond.get("flags") or []), governor=cond.get("governor"))
    return out
