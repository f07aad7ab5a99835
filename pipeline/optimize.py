"""`edgepipe optimize`: measure every candidate format on one device per class, recover int8 by keeping the layers
it hurts most in float (or at 16-bit activations on a CPU; `pipeline.int8_recovery`), and choose per class the best
candidate within the accuracy budget.

A device class is kind + runtime + accelerator. Candidates are measured with the run machinery (`run.execute`:
same conversion cache, content-addressed push, agent, host scoring), so a second optimize converts nothing new.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import ConfigError
from pipeline.int8_recovery import recover, short
from pipeline.metrics.gates import budget_gates
from pipeline.metrics.score import TASK_METRICS
from pipeline.run import RunInputs, execute, new_run_id

OBJECTIVES = ("latency", "size", "balanced")
DEFAULT_MAX_DROP = 1.0          # points of the task's main metric below float, when neither flag nor gate says
CANDIDATES = {"edgetpu": ("int8",), "gpu": ("float16", "float32"),
              "cpu": ("float32", "dynamic", "float16", "int8", "int16x8")}
LOWER_IS_BETTER = ("mae", "rmse")
Event = Callable[[str, str, str], None]


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    @property
    def label(self) -> str:
        return f"{self.kind} · {self.runtime} · {self.accelerator}"

    def to_dict(self) -> dict[str, Any]:
        return {"targets": self.targets, "measured_on": self.measured_on, "kind": self.kind, "runtime": self.runtime,
                "accelerator": self.accelerator, "budget": asdict(self.budget),
                "candidates": [c.to_dict() for c in self.candidates],
                "chosen": self.chosen.to_dict() if self.chosen else None, "advice": self.advice, "notes": self.notes}


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

    @property
    def exit_code(self) -> int:
        return 0 if all(c.chosen is not None for c in self.classes) else 1

    def to_dict(self) -> dict[str, Any]:
        return {"classes": [c.to_dict() for c in self.classes], "objective": self.objective, "metric": self.metric,
                "float_value": self.float_value, "layers": self.layers, "ranking": self.ranking,
                "runs": self.run_ids,
                "report": str(self.report_path) if self.report_path else None,
                "targets_written": str(self.written) if self.written else None, "changes": self.changes}


# ---------------------------------------------------------------- host-side checks (no device touched)

def check_options(objective: str, max_drop: float | None, max_float_layers: int | None = None) -> None:
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}", field="--objective", hint=f"use one of: "
                                                                                      f"{', '.join(OBJECTIVES)}")
    if max_drop is not None and not (0 <= max_drop <= 100):
        raise ConfigError(f"--max-drop {max_drop:g} is out of range", field="--max-drop",
                          hint="points of the task's metric below float, 0..100 (e.g. 1 = one point of top-1)")
    if max_float_layers is not None and max_float_layers < 1:
        raise ConfigError(f"--max-float-layers {max_float_layers} is out of range", field="--max-float-layers",
                          hint="how many layers int8 recovery may keep in float: 1 or more (default: 20 % of "
                               "the ops, at least 3)")


def check_model(model: Any) -> None:
    """optimize converts the model itself: a .tflite is refused before any data is read or device touched."""
    path = getattr(model, "path", model)
    if str(path).lower().endswith(".tflite"):
        raise ConfigError("optimize converts the model to each candidate format; a .tflite cannot be re-converted",
                          file=str(path), field="MODEL", hint="pass the SavedModel/.keras model")


def main_metric(prepared: RunInputs) -> tuple[str, float | None]:
    """The task's main metric and the float model's value; agreement with float when there are no labels."""
    task = getattr(prepared.task, "task", None) or "raw"
    names = TASK_METRICS.get(task) or ()
    fm = prepared.float_metrics or {}
    if names and fm.get(names[0]) is not None:
        return names[0], float(fm[names[0]])
    return "top1_agreement", 1.0


def budget_for(inventory: Any, target: Any, metric: str, max_drop: float | None) -> Budget:
    """--max-drop, else the target's accuracy gates in targets.yaml, else DEFAULT_MAX_DROP points."""
    if max_drop is not None:
        return Budget(float(max_drop), None, "--max-drop")
    gates = inventory.gates_for(target)
    drop_gate, floor_gate = budget_gates(metric)
    drop, floor = gates.get(drop_gate or ""), gates.get(floor_gate or "")
    if drop or floor:
        return Budget(float(drop[0]) if drop else None, float(floor[0]) if floor else None,
                      ", ".join(g[1] for g in (drop, floor) if g))
    return Budget(DEFAULT_MAX_DROP, None, "default")


def device_classes(inventory: Any, targets: list[Any], metric: str, max_drop: float | None,
                   each: bool) -> list[DeviceClass]:
    """Targets grouped by kind + runtime + accelerator, measured on the first of each (all with `each`)."""
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for t in targets:
        runtime = t.runtime + (f"=={t.runtime_version}" if t.runtime_version else "")
        groups.setdefault((t.kind, runtime, t.accelerator), []).append(t)
    return [DeviceClass(k, r, a, [t.name for t in ts], [t.name for t in (ts if each else ts[:1])],
                        budget_for(inventory, ts[0], metric, max_drop))
            for (k, r, a), ts in groups.items()]


# ---------------------------------------------------------------- measuring

def _drop(metric: str, value: float | None, float_value: float | None) -> float | None:
    """Points below float (x100 for a 0..1 metric); for an error metric, percent above float's error."""
    if value is None or float_value is None:
        return None
    if metric in LOWER_IS_BETTER:
        return round((value - float_value) / float_value * 100.0, 4) if float_value else None
    return round((float_value - value) * 100.0, 4)


def _fill(c: Candidate, results: list[Any], metric: str, float_value: float | None, budget: Budget) -> None:
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
    c.metric = metric
    if all(v is not None for v in values):
        c.value = (max if metric in LOWER_IS_BETTER else min)(float(v) for v in values)
    agreements = [(r.metrics or {}).get("top1_agreement") for r in results]
    c.agreement = min(a for a in agreements if a is not None) if any(a is not None for a in agreements) else None
    c.drop = _drop(metric, c.value, float_value)
    c.within_budget = budget.holds(c.value, c.drop) and c.p50_ms is not None
    plain = None if art.get("compiled") else art.get("path")
    if plain and Path(plain).exists():
        q, n = quantized_share(read_model(plain))
        c.int8_share = round(q / n, 4) if n else None


class Measurer:
    """Measures candidates with `run.execute` on the classes' devices, one synthetic target per (device, variant)."""

    def __init__(self, inventory: Any, prepared: RunInputs, metric: str, float_value: float | None, *,
                 out_dir: Path, cache_dir: Any, on_event: Event | None, cancel: Any, lease: Any = None) -> None:
        self.inventory, self.prepared, self.metric, self.float_value = inventory, prepared, metric, float_value
        self.out_dir, self.cache_dir, self.on_event, self.cancel = out_dir, cache_dir, on_event, cancel
        self.lease = lease   # the device lease hook (pipeline.release.leases.Leases): no run measures alongside
        self.run_ids: list[str] = []

    def measure(self, jobs: list[tuple[DeviceClass, Candidate]]) -> None:
        targets, owner = [], {}
        for cls, cand in jobs:
            for name in cls.measured_on:
                t = self.inventory.target(name)
                syn = replace(t, name=f"{name}[{cand.variant}]", mode=cand.mode, keep_float=tuple(cand.keep_float),
                              int16_layers=tuple(cand.int16_layers))
                targets.append(syn)
                owner[syn.name] = (cls, cand)
        if not targets:
            return
        run_id = new_run_id()
        self.run_ids.append(run_id)
        run = execute(replace(self.inventory, targets=targets), out_dir=self.out_dir, cache_dir=self.cache_dir,
                      on_event=self.on_event, run_id=run_id, cancel=self.cancel, prepared=self.prepared,
                      lease=self.lease)
        by_cand: dict[int, list[Any]] = {}
        for res in run.devices:
            by_cand.setdefault(id(owner[res.name][1]), []).append(res)
        for cls, cand in jobs:
            _fill(cand, by_cand.get(id(cand), []), self.metric, self.float_value, cls.budget)
            if cand not in cls.candidates:
                cls.candidates.append(cand)


# ---------------------------------------------------------------- choosing

def choose(candidates: list[Candidate], objective: str) -> Candidate | None:
    """The best candidate within budget by the objective; a tie goes to the smaller artifact."""
    ok = [c for c in candidates if c.within_budget and c.p50_ms is not None and c.bytes]
    if not ok:
        return None
    if objective == "size":
        return min(ok, key=lambda c: (c.bytes, c.p50_ms))
    if objective == "balanced":   # equal weight to relative latency and relative size (geometric)
        p0, b0 = min(c.p50_ms for c in ok) or 1e-9, min(c.bytes for c in ok)
        return min(ok, key=lambda c: (math.log(max(c.p50_ms, 1e-9) / max(p0, 1e-9)) + math.log(c.bytes / b0),
                                      c.bytes))
    return min(ok, key=lambda c: (c.p50_ms, c.bytes))


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


def advise(cls: DeviceClass, layers: list[dict[str, Any]], ranking: dict[str, Any] | None = None) -> str:
    """What was chosen, or what would pass: the best candidate and its gap, the layers int8 hurts most by measured
    effect (with their per-tensor error), QAT as next step."""
    if cls.chosen is not None:
        c = cls.chosen
        kept = c.keep_float or c.int16_layers
        how = " in float" if c.keep_float else " at 16-bit activations"
        return (f"{c.variant}: p50 {c.p50_ms:.3f} ms, {c.bytes} bytes, {c.metric} {c.value:.4f} "
                f"(drop {c.drop:+.2f} within {cls.budget.text()})"
                + (f"; {len(kept)} layer(s){how}: {', '.join(short(n) for n in kept)}" if kept else ""))
    measured = [c for c in cls.candidates if c.drop is not None]
    if not measured:
        errors = "; ".join(c.error for c in cls.candidates if c.error) or "no candidate measured"
        return f"no candidate could be measured: {errors}"
    best = min(measured, key=lambda c: c.drop)
    gap = best.drop - (cls.budget.max_drop or 0.0) if cls.budget.max_drop is not None else None
    hurt = [x for x in layers if x.get("effect") and x["effect"]["benefit"] > 0][:3] or layers[:3]
    worst = "; ".join(layer_text(x, ranking) for x in hurt) or "not ranked"
    return (f"nothing within {cls.budget.text()}; closest is {best.variant} with drop {best.drop:.2f} points"
            + (f" ({gap:.2f} over)" if gap is not None else "") + f"; layers int8 hurts most: {worst}; "
            "quantization-aware training of those layers is the next step")


# ---------------------------------------------------------------- the command

def optimize(inventory: Any, prepared: RunInputs, *, select: list[str] | None = None, objective: str = "latency",
             max_drop: float | None = None, each: bool = False, out_dir: str | Path, cache_dir: Any = None,
             on_event: Event | None = None, on_notice: Callable[[str], None] | None = None,
             cancel: Any = None, lease: Any = None, max_float_layers: int | None = None) -> OptimizeResult:
    """Measure the candidates of every device class, recover int8 when it misses the budget, choose per class.
    `lease` holds each device while a candidate is measured on it, as in `run`; `max_float_layers` caps how many
    layers recovery keeps in float (default: 20 % of the compute ops, at least 3)."""
    from pipeline.convert.recovery import layers_json, rank_layers
    from pipeline.run import compute_reference

    check_options(objective, max_drop, max_float_layers)
    check_model(prepared.src)
    notice = on_notice or (lambda msg: None)
    out = Path(out_dir)
    if prepared.calibration is None:
        raise ConfigError("optimize measures int8 candidates and needs calibration data", field="--calibration",
                          hint="pass --calibration DATA.npz (one array per model input, x for one) or an image folder")
    compute_reference(prepared, Path(cache_dir) if cache_dir else None, out)
    metric, float_value = main_metric(prepared)
    classes = device_classes(inventory, inventory.select(list(select or [])), metric, max_drop, each)
    measurer = Measurer(inventory, prepared, metric, float_value, out_dir=out, cache_dir=cache_dir,
                        on_event=on_event, cancel=cancel, lease=lease)
    measurer.measure([(cls, Candidate(m, m)) for cls in classes for m in CANDIDATES[cls.kind]])
    float32 = next((c.path for cls in classes for c in cls.candidates if c.mode == "float32" and c.path
                    and Path(c.path).exists()), None)   # the ranking's float reference, already converted
    ranked = recover(classes, measurer.measure, make=Candidate, max_float_layers=max_float_layers, notice=notice,
                     rank=lambda: rank_layers(prepared.src, prepared.calibration, cache_dir=cache_dir, log_dir=out,
                                              float_model=float32))
    layers = layers_json(ranked) if ranked is not None else []
    about = None if ranked is None else {"int8": ranked.int8, "metric": ranked.metric, "holdout": ranked.holdout,
                                         "seconds": ranked.seconds, "cached": ranked.cached}
    for cls in classes:
        cls.chosen = choose(cls.candidates, objective)
        cls.advice = advise(cls, layers, about)
    res = OptimizeResult(classes, objective, metric, float_value, layers, measurer.run_ids)
    res.ranking = about
    return res
