"""What `edgepipe optimize` measures and decides, as data: a candidate format, a device class, the accuracy budget,
and the whole result (`--json` is `OptimizeResult.to_dict()`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

OBJECTIVES = ("latency", "size", "balanced")
DEFAULT_MAX_DROP = 1.0          # points of the task's main metric below float, when neither flag nor gate says
DEFAULT_MIN_GAIN = 5.0          # percent: a latency advantage below this is no advantage (--min-gain)
CANDIDATES = {"edgetpu": ("int8",), "gpu": ("float16", "float32"),
              "cpu": ("float32", "dynamic", "float16", "int8", "int16x8")}
LOWER_IS_BETTER = ("mae", "rmse")
INTERNAL = ("samples",)         # kept for the decision, left out of the JSON


@dataclass
class Candidate:
    """One format measured on a class's device(s); the first eight keys are the JSON contract."""

    mode: str
    variant: str
    bytes: int | None = None
    p50_ms: float | None = None
    metric: str | None = None
    value: float | None = None
    drop: float | None = None
    within_budget: bool = False
    keep_float: list[str] = field(default_factory=list)
    int16_layers: list[str] = field(default_factory=list)   # int8 with these ops at 16-bit activations (CPU)
    agreement: float | None = None
    int8_share: float | None = None
    sha256: str | None = None
    path: str | None = None
    error: str | None = None
    edgetpu: dict[str, Any] | None = None
    edgetpu_cost: list[dict[str, Any]] | None = None
    fallback: bool = False                 # timed on the CPU although its class asked for an accelerator
    fallback_reason: str | None = None
    runtime: str | None = None             # what the device measured it with, e.g. "tflite-runtime==2.14.0"
    tie: bool = False                      # as fast as the class's fastest within noise or --min-gain (≈)
    vs_fastest: dict[str, Any] | None = None   # its latency against the fastest's: ratio, interval, method
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)   # device -> timed invokes (ms)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in INTERNAL}


@dataclass
class Budget:
    """The accuracy a candidate must keep: a drop in points below float, and/or an absolute floor."""

    max_drop: float | None
    min_value: float | None
    source: str

    def holds(self, value: float | None, drop: float | None) -> bool:
        if value is None:
            return False
        if self.max_drop is not None and (drop is None or drop > self.max_drop + 1e-9):
            return False
        return self.min_value is None or value >= self.min_value

    def text(self) -> str:
        parts = ([f"drop <= {self.max_drop:g} points"] if self.max_drop is not None else []) + \
                ([f">= {self.min_value:g}"] if self.min_value is not None else [])
        return " and ".join(parts) + f" ({self.source})"


@dataclass
class DeviceClass:
    """Targets that run the same thing: kind, the runtime (and version) their probe found or targets.yaml declares,
    the accelerator asked for and the one really there. `fallback`: its figures are CPU timings of an accelerator
    class (no accelerator found, allow_fallback), never presented as the accelerator's."""

    kind: str
    runtime: str
    accelerator: str
    targets: list[str]
    measured_on: list[str]
    budget: Budget
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    advice: str = ""
    notes: list[str] = field(default_factory=list)   # what recovery decided for this class (e.g. why it stopped)
    accelerator_used: str | None = None    # what its boards really run on (None: not known before measuring)
    fallback: bool = False
    fallback_reason: str | None = None
    runtime_source: str = "probe"          # probe | targets.yaml (a declared runtime wins)
    comparisons: list[dict[str, Any]] = field(default_factory=list)   # the latency comparisons that decided
    evidence: Any = field(default=None, repr=False)   # pipeline.optimize.choice.Evidence (interleaved timings)

    @property
    def label(self) -> str:
        used = self.accelerator_used or self.accelerator
        return f"{self.kind} · {self.runtime} · {self.accelerator}" + (
            f" (on {used}: fallback)" if self.fallback else "")

    def to_dict(self) -> dict[str, Any]:
        return {"targets": self.targets, "measured_on": self.measured_on, "kind": self.kind, "runtime": self.runtime,
                "accelerator": self.accelerator, "budget": asdict(self.budget),
                "candidates": [c.to_dict() for c in self.candidates],
                "chosen": self.chosen.to_dict() if self.chosen else None, "advice": self.advice, "notes": self.notes,
                "accelerator_used": self.accelerator_used, "fallback": self.fallback,
                "fallback_reason": self.fallback_reason, "runtime_source": self.runtime_source,
                "comparisons": self.comparisons}


@dataclass
class OptimizeResult:
    classes: list[DeviceClass]
    objective: str
    metric: str
    float_value: float | None
    layers: list[dict[str, Any]] = field(default_factory=list)   # int8 layers ranked by measured effect
    ranking: dict[str, Any] | None = None   # how the layers were ranked: full int8's host scores, samples, time
    run_ids: list[str] = field(default_factory=list)
    report_path: Path | None = None
    written: Path | None = None
    changes: list[str] = field(default_factory=list)
    min_gain: float = DEFAULT_MIN_GAIN   # percent

    @property
    def exit_code(self) -> int:
        return 0 if all(c.chosen is not None for c in self.classes) else 1

    def to_dict(self) -> dict[str, Any]:
        return {"classes": [c.to_dict() for c in self.classes], "objective": self.objective, "metric": self.metric,
                "float_value": self.float_value, "layers": self.layers, "ranking": self.ranking,
                "runs": self.run_ids,
                "report": str(self.report_path) if self.report_path else None,
                "targets_written": str(self.written) if self.written else None, "changes": self.changes,
                "min_gain_percent": self.min_gain}


def drop_of(metric: str, value: float | None, float_value: float | None) -> float | None:
    """Points below float (x100 for a 0..1 metric); for an error metric, percent above float's error."""
    if value is None or float_value is None:
        return None
    if metric in LOWER_IS_BETTER:
        return round((value - float_value) / float_value * 100.0, 4) if float_value else None
    return round((float_value - value) * 100.0, 4)


def runtime_label(name: str | None, version: str | None) -> str | None:
    """'tflite-runtime==2.14.0', the way targets.yaml pins a runtime."""
    return f"{name}=={version}" if name and version else name


def fill(c: Candidate, results: list[Any], metric: str, float_value: float | None, budget: Budget) -> None:
    """A candidate's figures from its device results: the worst device when measured on several."""
    from pipeline.convert.manifest import read_model
    from pipeline.convert.recovery import quantized_share

    bad = [r for r in results if not r.ok]
    if bad or not results:
        c.error = f"{bad[0].name}: {bad[0].error.code}: {bad[0].error.message}" if bad else "not measured"
        return
    p50s = [r.measured.latency.p50 for r in results]
    values = [(r.metrics or {}).get(metric) for r in results]
    art = results[0].artifact or {}
    c.bytes, c.sha256, c.path, c.edgetpu = art.get("bytes"), art.get("sha256"), art.get("path"), art.get("edgetpu")
    c.p50_ms = max(p for p in p50s if p is not None) if any(p is not None for p in p50s) else None
    c.samples = {r.name.partition("[")[0]: r.measured.samples_ms for r in results if r.measured.samples_ms}
    c.runtime = runtime_label(results[0].measured.runtime, results[0].measured.runtime_version)
    fell = [r for r in results if r.fallback]
    c.fallback, c.fallback_reason = bool(fell), (fell[0].fallback_reason if fell else None)
    c.metric = metric
    if all(v is not None for v in values):
        c.value = (max if metric in LOWER_IS_BETTER else min)(float(v) for v in values)
    agreements = [(r.metrics or {}).get("top1_agreement") for r in results]
    c.agreement = min(a for a in agreements if a is not None) if any(a is not None for a in agreements) else None
    c.drop = drop_of(metric, c.value, float_value)
    c.within_budget = budget.holds(c.value, c.drop) and c.p50_ms is not None
    plain = None if art.get("compiled") else art.get("path")
    if plain and Path(plain).exists():
        q, n = quantized_share(read_model(plain))
        c.int8_share = round(q / n, 4) if n else None
