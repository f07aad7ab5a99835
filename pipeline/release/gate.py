"""The release gate: per-target thresholds, fleet rules and baseline regression turned into one Verdict.

A device fails when it was not measured, one of its per-target gates failed, it measured on the CPU what its
target requires an accelerator for (`require_accelerator`), or it regressed against the baseline. The run passes
when the share of failed devices is at most `max_fail_percent` (default 0), every kind in `require_all_kinds` was
measured, at most `max_fallback_percent` of the accelerator targets fell back to the CPU, and no device regressed;
exit 3 when no device was measured. Every check records the gate key, the measured value, the threshold and where
the threshold came from, so a failed release explains itself; every fallback is named in the verdict.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable

from pipeline.metrics.gates import STARTUP_GATES, readings, resource_reading
from pipeline.metrics.score import TASK_METRICS
from pipeline.release.conditions import resource_figures, throttle_text
from pipeline.release.regression import (CONFIDENCE, LatencyComparison, compare_accuracy, compare_across_runs,
                                         compare_paired)
from pipeline.results import DeviceResult, RunResult

LATENCY_GATES = {"max_p50_ms": "p50", "max_p90_ms": "p90", "max_p99_ms": "p99"}
DEFAULT_MAX_TOP1_REGRESSION = 1.0       # points; a z-test on counts, exact for identical artifacts
EMULATED_NOTE = "emulated device: its latency says nothing about real hardware, so latency is not gated"
NOT_ON_PATH = "edgetpu_compiler not on PATH"
# (device, artifact sha256) -> medians (ms) of that artifact on that device in earlier complete runs
LatencyHistory = Callable[[DeviceResult, str], list]
# a throttled baseline device -> (run id, its latest unthrottled result before the baseline run), or None
UnthrottledBaseline = Callable[[DeviceResult], "tuple[str, DeviceResult] | None"]

EXIT_PASSED, EXIT_FAILED, EXIT_NO_DEVICE = 0, 1, 3


@dataclass
class Check:
    """One gate applied to one device (target) or to the fleet (target None)."""

    target: str | None
    gate: str
    measured: Any
    threshold: Any
    source: str
    passed: bool
    note: str = ""
    skipped: bool = False
    family: str = "target"  # target | fleet | regression
    output: str | None = None  # task gates: the output tensor and the metric the check looked at
    metric: str | None = None

    @property
    def subject(self) -> str:
        return self.target if self.target is not None else "fleet"

    @property
    def label(self) -> str:
        """The gate key, with the output and metric it read: `min_snr_db[boxes snr_db]`."""
        what = " ".join(str(p) for p in (self.output, self.metric) if p)
        return f"{self.gate}[{what}]" if what else self.gate

    def message(self) -> str:
        """`pi4: max_p90_ms: measured 12.4 > threshold 10 (from targets[pi4].gates.max_p90_ms)`."""
        if self.skipped:
            return f"{self.subject}: {self.label}: skipped ({self.note})"
        verdict = "ok" if self.passed else "FAILED"
        text = (f"{self.subject}: {self.label}: {verdict}: measured {fmt(self.measured)}, "
                f"threshold {fmt(self.threshold)} (from {self.source})")
        return text + (f"; {self.note}" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Verdict:
    run_id: str
    passed: bool
    exit_code: int
    checks: list[Check] = field(default_factory=list)
    baseline_run_id: str | None = None
    devices: dict[str, str] = field(default_factory=dict)  # name -> passed | failed | unmeasured
    # name -> {"requested", "used", "reason"}: measured on the CPU instead of the accelerator the target asks for
    fallbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. "coral: not compiled: edgetpu_compiler not on PATH"
    cross_model: dict[str, Any] | None = None  # {"model", "baseline_model"} when the baseline is another model
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> task figures (for JUnit/Markdown)
    # name -> memory, start-up and conditions figures (resource_figures), for JUnit and Markdown
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed and not c.skipped]

    def checks_for(self, target: str | None) -> list[Check]:
        return [c for c in self.checks if c.target == target]

    def fallback_text(self, name: str) -> str:
        """`ran on cpu instead of edgetpu: <reason>` for a device that fell back."""
        fb = self.fallbacks[name]
        return f"ran on {fb.get('used')} instead of {fb.get('requested')}" + (
            f": {fb['reason']}" if fb.get("reason") else "")

    def headline(self) -> str:
        """One line that reads right in every case: what passed, what failed, what fell back, what was compared."""
        n = len(self.devices)
        failed = [k for k, s in self.devices.items() if s == "failed"]
        unmeasured = [k for k, s in self.devices.items() if s == "unmeasured"]
        fb = len(self.fallbacks)
        fb_text = (f"{fb} fallback{_s(fb)} to the CPU ({', '.join(self.fallbacks)})") if fb else ""
        if self.exit_code == EXIT_NO_DEVICE:
            head = "NOTHING MEASURED: " + (f"none of {n} device{_s(n)} returned a result" if n else "no device selected")
        elif self.passed:
            bad = len(failed) + len(unmeasured)
            body = (f"all {n} device{_s(n)} passed" if n != 1 else "1 of 1 device passed") if not bad else (
                f"{n - bad} of {n} devices passed; {bad} failed or not measured, within gates.max_fail_percent")
            head = (f"PASSED with {fb} fallback{_s(fb)}: " if fb else "PASSED: ") + body + (
                f"; {fb_text}" if fb else "")
        else:
            parts = []
            if failed:
                k = sum(1 for c in self.failures if c.target in failed)
                parts.append(f"{len(failed)} of {n} device{_s(n)} failed {k} check{_s(k)}")
            if unmeasured:
                parts.append(f"{len(unmeasured)} of {n} device{_s(n)} not measured")
            fleet = sorted({c.gate for c in self.failures if c.target is None
                            and not (c.gate == "max_fail_percent" and (failed or unmeasured))})
            if fleet:
                parts.append(("all devices passed, but " if not (failed or unmeasured) else "")
                             + f"fleet check{_s(len(fleet))} failed: {', '.join(fleet)}")
            head = "FAILED: " + "; ".join(parts) + (f"; {fb_text}" if fb else "")
        if self.cross_model:
            head += (f"; cross-model comparison: {self.cross_model.get('model')} against baseline model "
                     f"{self.cross_model.get('baseline_model')}")
        return head

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "passed": self.passed, "exit_code": self.exit_code,
                "baseline_run_id": self.baseline_run_id, "devices": dict(self.devices),
                "headline": self.headline(), "checks": [c.to_dict() for c in self.checks],
                "fallbacks": dict(self.fallbacks), "notes": list(self.notes), "cross_model": self.cross_model,
                "metrics": dict(self.metrics), "resources": dict(self.resources)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Verdict":
        return cls(run_id=d["run_id"], passed=d["passed"], exit_code=d["exit_code"],
                   checks=[Check(**c) for c in d.get("checks", [])], baseline_run_id=d.get("baseline_run_id"),
                   devices=dict(d.get("devices", {})), fallbacks=dict(d.get("fallbacks") or {}),
                   notes=list(d.get("notes") or []), cross_model=d.get("cross_model"),
                   metrics=dict(d.get("metrics") or {}), resources=dict(d.get("resources") or {}))


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


class _NoInventory:
    """Stands in for an Inventory when a stored run is gated without targets.yaml: no thresholds declared."""

    targets: list = []

    def __init__(self) -> None:
        from pipeline.inventory import GatesSpec

        self.gates = GatesSpec()


def _target(inventory: Any, name: str) -> Any:
    return next((t for t in inventory.targets if t.name == name), None)


def _thresholds(inventory: Any, device: DeviceResult) -> tuple[dict[str, tuple[Any, str]], str]:
    """Inventory.gates_for(target); a device no longer in the inventory gets fleet, kind and group gates."""
    t = _target(inventory, device.name)
    if t is not None:
        return inventory.gates_for(t), ""
    return (inventory.gates.thresholds_for(device.kind, device.groups),
            "" if isinstance(inventory, _NoInventory) else "target not in this inventory: fleet, kind and group "
                                                           "gates applied")


def float_top1(run: RunResult) -> float | None:
    """Host float accuracy carried by the run (RunResult.float_top1, else a float32 artifact's manifest)."""
    if run.float_top1 is not None:
        return float(run.float_top1)
    for a in run.artifacts:
        for src in (a, a.get("manifest") or {}):
            for key in ("float_top1", "reference_top1"):
                if isinstance(src.get(key), (int, float)):
                    return float(src[key])
    return None


def edgetpu_info(device: DeviceResult, run: RunResult | None = None) -> dict[str, Any]:
    """The Edge TPU op-mapping report of the device's artifact (DeviceResult.artifact, else the run's manifest)."""
    art = device.artifact or {}
    if art.get("edgetpu"):
        return art["edgetpu"]
    for a in (run.artifacts if run is not None else []):
        manifest = a.get("manifest") if isinstance(a.get("manifest"), dict) else a
        if art.get("sha256") and a.get("sha256") == art.get("sha256") and manifest.get("edgetpu"):
            return manifest["edgetpu"]
    return {}


def edgetpu_predicted(tpu: dict[str, Any]) -> bool:
    """True when the mapping comes from the static preflight (no edgetpu_compiler), not a compile report."""
    return bool(tpu.get("predicted")) or tpu.get("status") == "predicted"


def _measure(device: DeviceResult, gate: str, run: RunResult) -> tuple[Any, str]:
    """(measured value or None, note) for a per-target gate."""
    m = device.measured
    acc, agr = m.block("accuracy"), m.block("agreement")
    if gate in LATENCY_GATES:
        return m.latency.at(LATENCY_GATES[gate]), ""
    found = resource_reading(m.doc, gate, None)
    if found is not None:
        return found.value, found.note
    if gate == "min_top1":
        return m.top1, "" if acc else "no accuracy: the evaluation data has no labels (y)"
    if gate == "max_top1_drop":
        ref = float_top1(run)
        if m.top1 is None:
            return None, "no accuracy: the evaluation data has no labels (y)"
        if ref is None:
            return None, "the run carries no host float top-1 to compare with"
        return (ref - m.top1) * 100.0, f"float top-1 {ref:.4f}, device {m.top1:.4f}"
    if gate == "min_agreement":
        return m.agreement_top1, "" if agr else "no agreement: the evaluation data has no float reference (ref)"
    if gate == "min_snr_db":
        if agr and m.snr_db is None and agr.get("max_abs") == 0:
            return float("inf"), "outputs identical to the float reference"
        return m.snr_db, "" if agr else "no agreement: the evaluation data has no float reference (ref)"
    if gate == "max_bytes":
        art = device.artifact or {}
        return art.get("bytes", m.model_bytes), ""
    if gate == "min_edgetpu_mapped":
        tpu = edgetpu_info(device, run)
        share = tpu.get("mapped_share")
        if share is None:
            return None, "no Edge TPU op-mapping report for this artifact"
        if edgetpu_predicted(tpu):
            return share, "predicted by the preflight (edgetpu_compiler absent), not from a compile report"
        return share, "from the edgetpu_compiler report"
    raise ValueError(gate)


def _accelerator_check(device: DeviceResult, inventory: Any) -> Check | None:
    """require_accelerator: the device ran on the accelerator its target asks for (edgetpu or gpu)."""
    use = device.measured.accelerator
    if use.requested in (None, "cpu"):
        return None
    t = _target(inventory, device.name)
    if t is not None:
        required = bool(getattr(t, "require_accelerator", False))
        source = (f"targets[{t.name}].require_accelerator (default: true for an accelerator target unless "
                  "allow_fallback: true)")
    else:  # no inventory entry: the agent says whether falling back was allowed
        required = not (use.fallback if use.allow_fallback is None else use.allow_fallback)
        source = "default (an accelerator target requires it unless allow_fallback: true)"
    fell_back = bool(device.fallback)
    note = (f"ran on {use.used} instead of {use.requested}: {device.fallback_reason}" if fell_back
            else f"ran on {use.used}")
    if fell_back and not required:
        note += "; allowed (allow_fallback: true): its figures are CPU figures"
    return Check(device.name, "require_accelerator", use.used, use.requested if required else "any",
                 source, not (fell_back and required), note=note)


def conditions_policy(inventory: Any, device: DeviceResult) -> Any:
    """The device's resolved `gates.conditions` (its target's; fleet, kind and group ones when it left the
    inventory)."""
    t = _target(inventory, device.name)
    if t is not None and getattr(t, "conditions", None) is not None:
        return t.conditions
    return inventory.gates.conditions_for(device.kind, device.groups)


def conditions_checks(device: DeviceResult, policy: Any) -> list[Check]:
    """gates.conditions: a device throttled during its timed runs (after its re-measure) fails, unless the policy
    is `warn`; a re-measured device passes with what happened; `governor: performance` is checked when set."""
    cond = device.measured.conditions
    checks = []
    if cond.get("throttled") or cond.get("remeasured"):
        throttled = bool(cond.get("throttled"))
        warn = policy.throttled == "warn"
        note = throttle_text(cond) + ("; kept with a warning (throttled: warn)" if throttled and warn else "")
        checks.append(Check(device.name, "conditions.throttled", throttled, policy.throttled,
                            policy.source("throttled"), not throttled or warn, note=note))
    if policy.governor == "performance":
        governor = cond.get("governor") if cond else (device.result or {}).get("device", {}).get("governor")
        checks.append(Check(device.name, "conditions.governor", governor, "performance", policy.source("governor"),
                            governor == "performance",
                            note="" if governor else "the governor is not readable on this device (no cpufreq)"))
    return checks


def _target_checks(device: DeviceResult, thresholds: dict[str, tuple[Any, str]], extra_note: str,
                   run: RunResult) -> list[Check]:
    if not device.ok:
        err = device.error
        return [Check(device.name, "measured", err.code if err else "error", "a valid result", "run", False,
                      note=err.message if err else "")]
    checks = []
    asked = device.measured.accelerator.requested
    cpu_note = (f"measured on the CPU after a fallback from {asked}: these are CPU timings"
                if device.fallback else "")
    for gate, (threshold, source) in thresholds.items():
        if gate == "min_edgetpu_mapped" and device.kind != "edgetpu":
            continue  # a fleet-wide Edge TPU gate does not apply to CPU/GPU targets
        if (gate in LATENCY_GATES or gate in STARTUP_GATES) and device.emulated:
            checks.append(Check(device.name, gate, None, threshold, source, True, note=EMULATED_NOTE, skipped=True))
            continue
        task = task_checks(device, gate, threshold, source, extra_note)
        if task is not None:
            checks.extend(task)
            continue
        measured, note = _measure(device, gate, run)
        timed = gate in LATENCY_GATES or gate in STARTUP_GATES
        note = "; ".join(n for n in (note, extra_note, cpu_note if timed else "") if n)
        if measured is None:
            checks.append(Check(device.name, gate, None, threshold, source, False, note=note or "not measured"))
            continue
        passed = measured <= threshold if gate.startswith("max_") else measured >= threshold
        checks.append(Check(device.name, gate, measured, threshold, source, bool(passed), note=note))
    return checks


def _median(device: DeviceResult) -> float | None:
    return device.measured.latency.p50


def task_checks(device: DeviceResult, gate: str, threshold: Any, source: str, extra_note: str) -> list[Check] | None:
    """Checks of a task gate (mAP, MAE, mIoU, AUC, per-output SNR...) from the host-computed metrics, one per
    output and metric looked at; None when the gate is measured the legacy way (latency, classification top-1)."""
    found = readings(device.metrics, gate, threshold)
    if found is None:
        return None
    checks = []
    for r in found:
        note = "; ".join(n for n in (r.note, extra_note) if n)
        src = f"{source}.{r.output}" if isinstance(threshold, dict) else source
        if not r.applies:
            checks.append(Check(device.name, gate, None, r.threshold, src, True, note=note, skipped=True,
                                output=r.output, metric=r.metric))
        elif r.value is None:
            checks.append(Check(device.name, gate, None, r.threshold, src, False, note=note or "not measured",
                                output=r.output, metric=r.metric))
        else:
            passed = r.value <= r.threshold if gate.startswith("max_") else r.value >= r.threshold
            checks.append(Check(device.name, gate, r.value, r.threshold, src, bool(passed), note=note,
                                output=r.output, metric=r.metric))
    return checks


def task_figures(device: DeviceResult) -> dict[str, Any]:
    """The device's task and headline figures (no per-output detail), as JUnit and Markdown show them."""
    m = device.metrics or {}
    if not m.get("task"):
        return {}
    keys = TASK_METRICS.get(m["task"], ()) + ("top1_agreement", "map50_vs_float", "map_vs_float")
    out = {"task": m["task"]}
    out.update({k: m[k] for k in keys if m.get(k) is not None})
    snrs = [o.get("snr_db") for o in (m.get("outputs") or {}).values() if o.get("snr_db") is not None]
    if snrs:
        out["min_snr_db"] = min(snrs)
    return out


def _latency_comparison(d: DeviceResult, b: DeviceResult, thr: float, floor_ms: float,
                        history: LatencyHistory | None) -> tuple[LatencyComparison | None, str]:
    """Paired when the device re-measured the baseline's model in this run, else across runs against the history's
    spread of that artifact on that device; (None, why) when neither can be trusted."""
    paired = d.measured.paired
    base_sha = (b.artifact or {}).get("sha256")
    if b.throttled and not (paired and not paired.get("error")):
        return None, (f"the baseline's result on {b.name} was throttled ({throttle_text(b.measured.conditions)}): "
                      "never used as a baseline, and the baseline's model was not re-measured in this run")
    new_sha = (d.artifact or {}).get("sha256")
    why_not_paired = ("same artifact as the baseline" if base_sha and base_sha == new_sha
                      else paired.get("error") or "the baseline's model was not re-measured in this run")
    if paired and not paired.get("error") and (paired.get("baseline") or {}).get("sha256") == base_sha:
        try:
            return compare_paired(paired["baseline_samples_ms"], paired["samples_ms"], paired.get("rounds", 0), thr,
                                  min_delta_ms=floor_ms), ""
        except ValueError as exc:
            why_not_paired = str(exc)
    hist = history(b, base_sha) if history is not None and base_sha else []
    try:
        return compare_across_runs(_median(b) or 0.0, _median(d) or 0.0, hist, thr, min_delta_ms=floor_ms), ""
    except ValueError as exc:
        return None, f"{exc}; not compared side by side either ({why_not_paired})"


def _describe(cmp: LatencyComparison, floor_ms: float, baseline_id: str) -> str:
    if cmp.method == "paired":
        how = (f"baseline's model re-measured on the device in this run, interleaved over {cmp.rounds} rounds: "
               f"x{cmp.ratio:.3f}, {100 * CONFIDENCE:.0f}% lower bound x{cmp.ci_low:.3f}")
    else:
        how = (f"median {cmp.base_median:.4g} -> {cmp.new_median:.4g} ms across runs: x{cmp.ratio:.3f}, lower bound "
               f"x{cmp.ci_low:.3f} after the run-to-run spread of this artifact here ({100 * cmp.spread:.1f}% over "
               f"{cmp.history_runs} runs)")
    return (how + f", {'significant' if cmp.significant else 'not significant'} vs {baseline_id}"
            + (f"; fails only if also > {floor_ms:g} ms slower (gates.min_latency_regression_ms)" if floor_ms else ""))


def regression_checks(run: RunResult, baseline: RunResult, inventory: Any,
                      history: LatencyHistory | None = None,
                      unthrottled: UnthrottledBaseline | None = None) -> list[Check]:
    """Latency and top-1 regression of each device against the same target and mode in the baseline run.

    The latency gate applies only when `gates.max_latency_regression` is set; otherwise the comparison is shown as
    a skipped check. `history` gives earlier medians of an artifact on a device (the run-to-run spread). A baseline
    result that was throttled is never compared with: `unthrottled` finds that device's latest clean one instead.
    """
    gates = inventory.gates
    lat_thr = gates.max_latency_regression
    lat_src = "gates.max_latency_regression"
    acc_thr, acc_src = ((gates.max_top1_regression, "gates.max_top1_regression")
                        if gates.max_top1_regression is not None
                        else (DEFAULT_MAX_TOP1_REGRESSION, "default (gates.max_top1_regression unset)"))
    floor_ms = float(gates.min_latency_regression_ms or 0.0)
    base = {(d.name, d.mode): d for d in baseline.devices if d.ok}
    cross = _cross_model(run, baseline)
    prefix = (f"cross-model comparison ({cross['model']} vs baseline model {cross['baseline_model']}); "
              if cross else "")

    def skip(name: str, note: str, measured: Any = None) -> Check:
        return Check(name, "max_latency_regression", measured, lat_thr, lat_src if lat_thr is not None else
                     "not set", True, note=prefix + note, skipped=True, family="regression")

    checks: list[Check] = []
    for d in run.devices:
        if not d.ok:
            continue
        b = base.get((d.name, d.mode))
        if b is None:
            checks.append(skip(d.name, f"no result for {d.name} in mode {d.mode} in baseline {baseline.run_id}"))
            continue
        stand_in = unthrottled(b) if b.throttled and unthrottled is not None else None
        if stand_in is not None:
            checks += _stand_in_note(d.name, baseline.run_id, stand_in[0])
            b = stand_in[1]
        used_new, used_base = d.measured.accelerator.used, b.measured.accelerator.used
        if d.emulated or b.emulated:
            checks.append(skip(d.name, EMULATED_NOTE))
        elif d.throttled:
            checks.append(skip(d.name, f"throttled in this run ({throttle_text(d.measured.conditions)}): its "
                                       "latency is not compared"))
        elif used_new != used_base:
            checks.append(skip(d.name, f"not comparable: the baseline ran on {used_base}, this run on {used_new}"))
        elif lat_thr is None and b.throttled:
            checks.append(skip(d.name, f"not gated; the baseline's result on {b.name} was throttled: never used as "
                                       "a baseline"))
        elif lat_thr is None:
            new_m, base_m = _median(d), _median(b)
            ratio = (new_m / base_m) if new_m and base_m else None
            checks.append(skip(d.name, "not gated: gates.max_latency_regression is not set" + (
                f" (median {base_m:.4g} -> {new_m:.4g} ms, x{ratio:.3f} vs {baseline.run_id}, one run against "
                "another)" if ratio else ""), None if ratio is None else round(ratio - 1.0, 4)))
        else:
            cmp, why = _latency_comparison(d, b, lat_thr, floor_ms, history)
            if cmp is None:
                checks.append(skip(d.name, why))
            else:
                checks.append(Check(d.name, "max_latency_regression", round(cmp.slowdown, 4), lat_thr, lat_src,
                                    not cmp.regressed, note=prefix + _describe(cmp, floor_ms, baseline.run_id),
                                    family="regression"))
        acc_new, acc_base = d.measured.block("accuracy"), b.measured.block("accuracy")
        if acc_new.get("top1") is not None and acc_base.get("top1") is not None and acc_new.get("n") and acc_base.get("n"):
            a = compare_accuracy(acc_base["top1"], acc_base["n"], acc_new["top1"], acc_new["n"], acc_thr)
            note = (f"top-1 {a.base_top1:.4f} -> {a.new_top1:.4f} (p={a.p_value:.3g}, "
                    f"{'significant' if a.significant else 'not significant'}) vs {baseline.run_id}")
            checks.append(Check(d.name, "max_top1_regression", round(a.drop_points, 3), acc_thr, acc_src,
                                not a.regressed, note=prefix + note, family="regression"))
    return checks


def _stand_in_note(name: str, baseline_id: str, stand_in_id: str) -> list[Check]:
    return [Check(name, "baseline", stand_in_id, "an unthrottled result", "gates.conditions", True, skipped=True,
                  family="regression", note=f"{name} was throttled in baseline {baseline_id}: compared with its "
                                            f"latest unthrottled result, from run {stand_in_id}")]


def _cross_model(run: RunResult, baseline: RunResult | None) -> dict[str, Any] | None:
    """{"model", "baseline_model"} when the baseline run measured a model of another name."""
    if baseline is None or not run.model_name or not baseline.model_name or run.model_name == baseline.model_name:
        return None
    return {"model": run.model_name, "baseline_model": baseline.model_name, "baseline_run_id": baseline.run_id}


def fallbacks(devices: Iterable[DeviceResult]) -> dict[str, dict[str, Any]]:
    """Devices that measured on the CPU instead of the accelerator their target asks for."""
    out = {}
    for d in devices:
        if d.ok and d.fallback:
            use = d.measured.accelerator
            out[d.name] = {"requested": use.requested, "used": use.used or "cpu", "reason": d.fallback_reason}
    return out


def _notes(devices: Iterable[DeviceResult], run: RunResult) -> list[str]:
    """What the verdict must say although no check fails on it: Edge TPU models that were not compiled."""
    notes = []
    for d in devices:
        art = d.artifact or {}
        tpu = edgetpu_info(d, run)
        if art.get("not_compiled"):
            why = art["not_compiled"]
        elif d.kind == "edgetpu" and tpu and edgetpu_predicted(tpu) and not art.get("compiled"):
            why = NOT_ON_PATH
        else:
            continue
        notes.append(f"{d.name}: not compiled: {why}" + (
            "; its Edge TPU op mapping is predicted by the preflight" if edgetpu_predicted(tpu) else ""))
    for d in devices:
        cond = d.measured.conditions if d.ok else {}
        if cond.get("throttled") or cond.get("remeasured"):
            notes.append(f"{d.name}: {'THROTTLED' if cond.get('throttled') else 'throttled, then re-measured'}: "
                         f"{throttle_text(cond)}" + ("; left out of regression baselines and history spreads"
                                                     if cond.get("throttled") else ""))
    return notes


def _fleet_checks(run: RunResult, inventory: Any, device_state: dict[str, str],
                  selected_kinds: set[str] | None = None) -> list[Check]:
    gates = inventory.gates
    n = len(device_state)
    bad = sum(1 for s in device_state.values() if s != "passed")
    share = 100.0 * bad / n if n else 100.0
    if gates.max_fail_percent is not None:
        thr, src = gates.max_fail_percent, "gates.max_fail_percent"
    else:
        thr, src = 0.0, "default (gates.max_fail_percent unset: every device must pass)"
    names = ", ".join(k for k, s in device_state.items() if s != "passed")
    checks = [Check(None, "max_fail_percent", round(share, 2), thr, src, share <= thr, family="fleet",
                    note=f"{bad} of {n} device(s) failed or unmeasured" + (f": {names}" if names else ""))]
    if gates.max_fallback_percent is not None:
        asked = [d for d in run.devices if d.ok and d.measured.accelerator.requested not in (None, "cpu")]
        fell = [d.name for d in asked if d.fallback]
        if not asked:
            checks.append(Check(None, "max_fallback_percent", None, gates.max_fallback_percent,
                                "gates.max_fallback_percent", True, family="fleet", skipped=True,
                                note="no measured device asked for an accelerator"))
        else:
            pct = 100.0 * len(fell) / len(asked)
            checks.append(Check(None, "max_fallback_percent", round(pct, 2), gates.max_fallback_percent,
                                "gates.max_fallback_percent", pct <= gates.max_fallback_percent, family="fleet",
                                note=f"{len(fell)} of {len(asked)} accelerator device(s) ran on the CPU"
                                     + (f": {', '.join(fell)}" if fell else "")))
    measured_kinds = {d.kind for d in run.devices if d.ok}
    for kind in gates.require_all_kinds or []:
        if selected_kinds is not None and kind not in selected_kinds:   # `--select` left this kind out
            checks.append(Check(None, "require_all_kinds", None, f">= 1 measured {kind} device",
                                "gates.require_all_kinds", True, family="fleet", skipped=True,
                                note=f"kind {kind}: no {kind} target selected"))
            continue
        count = sum(1 for d in run.devices if d.ok and d.kind == kind)
        checks.append(Check(None, "require_all_kinds", count, f">= 1 measured {kind} device",
                            "gates.require_all_kinds", kind in measured_kinds, family="fleet",
                            note=f"kind {kind}: {count} measured device(s)"))
    return checks


def evaluate(run: RunResult, inventory: Any, baseline: RunResult | None = None,
             select: Iterable[str] | None = None, history: LatencyHistory | None = None,
             unthrottled: UnthrottledBaseline | None = None) -> Verdict:
    """Apply every gate to `run`. `select` limits the gate to some device names (default: all in the run), and
    `require_all_kinds` to the kinds of the selected targets.

    Without an inventory (None) only the defaults apply: every device must be measured, an accelerator target
    must have used it unless its agent was allowed to fall back, top-1 regression vs baseline.
    """
    if inventory is None:
        inventory = _NoInventory()
    wanted = set(select) if select else None
    devices = [d for d in run.devices if wanted is None or d.name in wanted]
    gated = replace(run, devices=devices)   # the run itself (task, float metrics, interruption), these devices
    checks: list[Check] = []
    state: dict[str, str] = {}
    for d in devices:
        thresholds, note = _thresholds(inventory, d)
        mine = _target_checks(d, thresholds, note, run)
        mine += conditions_checks(d, conditions_policy(inventory, d)) if d.ok else []
        acc = _accelerator_check(d, inventory) if d.ok else None
        if acc is not None:
            mine.append(acc)
        checks.extend(mine)
        state[d.name] = "unmeasured" if not d.ok else ("failed" if any(not c.passed for c in mine) else "passed")
    selected_kinds = None if wanted is None else (
        {t.kind for t in inventory.targets if t.name in wanted} | {d.kind for d in devices})
    checks.extend(_fleet_checks(gated, inventory, state, selected_kinds))
    if baseline is not None:
        regression = regression_checks(gated, baseline, inventory, history, unthrottled)
        checks.extend(regression)
        for c in regression:
            if not c.passed and not c.skipped and state.get(c.target) == "passed":
                state[c.target] = "failed"
    gate_checks = [c for c in checks if c.family in ("fleet", "regression")]
    passed = all(c.passed for c in gate_checks)
    if not any(d.ok for d in devices):
        exit_code, passed = EXIT_NO_DEVICE, False
    else:
        exit_code = EXIT_PASSED if passed else EXIT_FAILED
    return Verdict(run_id=run.run_id, passed=passed, exit_code=exit_code, checks=checks,
                   baseline_run_id=baseline.run_id if baseline is not None else None, devices=state,
                   fallbacks=fallbacks(devices), notes=_notes(devices, run), cross_model=_cross_model(run, baseline),
                   metrics={d.name: task_figures(d) for d in devices if d.metrics},
                   resources={d.name: resource_figures(d) for d in devices if d.ok})


def gate_stored_run(store: Any, run_id: str, inventory: Any, baseline: str | None = "last",
                    select: Iterable[str] | None = None, save: bool = True,
                    origin: str = "run") -> tuple[RunResult, RunResult | None, Verdict]:
    """Load a stored run, resolve its baseline, evaluate, and (with `save`) store the verdict beside the run's
    others with its `origin`: 'run' (the run's own, by `run`) or 'gate' (`gate --record`)."""
    from pipeline.release.store import runtime_label

    run = store.load_run(run_id)
    base = store.resolve_baseline(baseline, exclude=run.run_id)

    def history(device: DeviceResult, sha: str) -> list:
        return store.latency_history(device.name, sha, runtime_label(device), before=run.started)

    def unthrottled(device: DeviceResult) -> Any:
        return store.last_unthrottled(device.name, device.mode, base.model_name, before=base.started)

    verdict = evaluate(run, inventory, base, select=select, history=history,
                       unthrottled=unthrottled if base is not None else None)
    if save:
        store.save_verdict(run.run_id, verdict, origin=origin, targets=getattr(inventory, "path", None))
    return run, base, verdict
