"""`edgepipe optimize`: measure every candidate format on one device per class, recover int8 by keeping the layers
it hurts most in float (or at 16-bit activations on a CPU; `pipeline.int8_recovery`), and choose per class the best
candidate within the accuracy budget, counting only latency advantages that hold up against noise.

Device classes come from the probe (`pipeline.optimize.classes`). Candidates are measured with the run machinery
(`run.execute`: same conversion cache, content-addressed push, agent, host scoring), so a second optimize converts
nothing new; a decisive latency advantage is re-timed interleaved with its rival (`pipeline.optimize.choice`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pipeline.errors import ConfigError
from pipeline.int8_recovery import recover, short
from pipeline.metrics.score import TASK_METRICS
from pipeline.optimize.candidates import (CANDIDATES, DEFAULT_MIN_GAIN, OBJECTIVES, Candidate, DeviceClass,
                                          OptimizeResult, fill)
from pipeline.optimize.choice import Decision, Evidence, among, decide, layer_text, why_chosen
from pipeline.optimize.classes import device_classes, settle
from pipeline.run import RunInputs, execute, new_run_id

Event = Callable[[str, str, str], None]
MAX_ROUNDS = 3      # rounds of interleaved re-timing per optimize (each round only pairs not timed yet)


# ---------------------------------------------------------------- host-side checks (no device touched)

def check_options(objective: str, max_drop: float | None, max_float_layers: int | None = None,
                  min_gain: float | None = None, modes: Sequence[str] | None = None) -> None:
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
    if min_gain is not None and not (0 <= min_gain < 100):
        raise ConfigError(f"--min-gain {min_gain:g} is out of range", field="--min-gain",
                          hint=f"percent a candidate must be faster by to count as faster, 0..100 (default "
                               f"{DEFAULT_MIN_GAIN:g})")
    known = sorted({m for ms in CANDIDATES.values() for m in ms})
    for mode in modes or ():
        if mode not in known:
            raise ConfigError(f"--candidates {mode!r} is not a format optimize measures", field="--candidates",
                              hint=f"use some of: {', '.join(known)} (comma-separated or repeated)")


def check_candidates(modes: Sequence[str] | None, kinds: Iterable[str]) -> None:
    """--candidates must leave each selected target kind something to measure."""
    for kind in sorted(set(kinds)) if modes else ():
        if not set(CANDIDATES[kind]) & set(modes):
            raise ConfigError(f"--candidates {','.join(modes)} leaves the {kind} targets nothing to measure",
                              field="--candidates", hint=f"add one of {', '.join(CANDIDATES[kind])} for {kind}, "
                                                         "or --select other targets")


def candidate_modes(kind: str, modes: Sequence[str] | None) -> list[str]:
    """The formats measured on a class of `kind`: its candidates, narrowed to `modes` (--candidates) if given."""
    return [m for m in CANDIDATES[kind] if not modes or m in modes]


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


# ---------------------------------------------------------------- measuring

class Measurer:
    """Measures candidates with `run.execute` on the classes' devices, one synthetic target per (device, variant)."""

    def __init__(self, inventory: Any, prepared: RunInputs, metric: str, float_value: float | None, *,
                 out_dir: Path, cache_dir: Any, on_event: Event | None, cancel: Any, lease: Any = None) -> None:
        self.inventory, self.prepared, self.metric, self.float_value = inventory, prepared, metric, float_value
        self.out_dir, self.cache_dir, self.on_event, self.cancel = out_dir, cache_dir, on_event, cancel
        self.lease = lease   # the device lease hook (pipeline.release.leases.Leases): no run measures alongside
        self.run_ids: list[str] = []

    def _synthetic(self, name: str, cand: Candidate, suffix: str = "") -> Any:
        t = self.inventory.target(name)
        return replace(t, name=f"{name}[{cand.variant}{suffix}]", mode=cand.mode, keep_float=tuple(cand.keep_float),
                       int16_layers=tuple(cand.int16_layers))

    def _execute(self, targets: list[Any], interleave: dict[str, dict[str, Any]] | None = None) -> Any:
        run_id = new_run_id()
        self.run_ids.append(run_id)
        return execute(replace(self.inventory, targets=targets), out_dir=self.out_dir, cache_dir=self.cache_dir,
                       on_event=self.on_event, run_id=run_id, cancel=self.cancel, prepared=self.prepared,
                       lease=self.lease, interleave=interleave)

    def measure(self, jobs: list[tuple[DeviceClass, Candidate]]) -> None:
        targets, owner = [], {}
        for cls, cand in jobs:
            for name in cls.measured_on:
                syn = self._synthetic(name, cand)
                targets.append(syn)
                owner[syn.name] = cand
        if not targets:
            return
        by_cand: dict[int, list[Any]] = {}
        for res in self._execute(targets).devices:
            by_cand.setdefault(id(owner[res.name]), []).append(res)
        for cls, cand in jobs:
            fill(cand, by_cand.get(id(cand), []), self.metric, self.float_value, cls.budget)
            if cand not in cls.candidates:
                cls.candidates.append(cand)

    def interleave(self, pairs: list[tuple[DeviceClass, Candidate, Candidate]]) -> None:
        """Time b with a interleaved on each of the class's devices (b measured with `--baseline-model` a); the
        agent's `paired` block goes to the class's evidence."""
        targets, owner, interleave = [], {}, {}
        for cls, a, b in pairs:
            for name in cls.measured_on:
                syn = self._synthetic(name, b, f" vs {a.variant}")
                targets.append(syn)
                owner[syn.name] = (cls, a, b, name)
                interleave[syn.name] = {"sha256": a.sha256, "path": a.path}
        run = self._execute(targets, interleave)
        seen = set()
        for res in run.devices:
            cls, a, b, name = owner[res.name]
            seen.add(res.name)
            block = res.measured.paired if res.ok else {"error": f"{res.error.code}: {res.error.message}"}
            cls.evidence.add_paired(name, b, a, block)
        for syn, (cls, a, b, name) in owner.items():
            if syn not in seen:
                cls.evidence.add_paired(name, b, a, None)


# ---------------------------------------------------------------- choosing and advising

def choose_all(classes: list[DeviceClass], objective: str, measurer: Measurer | None,
               notice: Callable[[str], None]) -> dict[int, Decision]:
    """Decide per class; re-time interleaved the advantages that decide against a smaller candidate (at most
    MAX_ROUNDS rounds, each pair once), then decide again."""
    for cls in classes:
        cls.evidence = cls.evidence or Evidence()
    for _ in range(MAX_ROUNDS if measurer is not None else 0):
        pairs = [(cls, a, b) for cls in classes for a, b in decide(cls.candidates, objective, cls.evidence).pending]
        if not pairs:
            break
        notice("timing interleaved, to see whether a lead holds up against noise: " + "; ".join(
            f"{b.variant} with {a.variant} on {cls.label}" for cls, a, b in pairs))
        measurer.interleave(pairs)
    out = {}
    for cls in classes:
        d = out[id(cls)] = decide(cls.candidates, objective, cls.evidence)
        cls.chosen = d.chosen
        for c in cls.candidates:
            rival = d.fastest is not None and c is not d.fastest and among(c, d.ok)
            c.tie = rival and among(c, d.tied)
            c.vs_fastest = cls.evidence.compare(d.fastest, c) if rival else None
        cls.comparisons = [cls.evidence.compare(a, b) for a in d.ok for b in d.ok
                           if a is not b and a.p50_ms <= b.p50_ms and cls.evidence.interleaved(a, b)]
    return out


def advise(cls: DeviceClass, layers: list[dict[str, Any]], ranking: dict[str, Any] | None = None,
           why: str = "") -> str:
    """What was chosen and why, or what would pass: the best candidate and its gap, the layers int8 hurts most by
    measured effect (with their per-tensor error), QAT as next step. Fallback timings are said first."""
    fallback = ("from CPU fallback timings, not the accelerator's: " if cls.fallback and cls.chosen is not None
                else "")
    if cls.chosen is not None:
        c = cls.chosen
        kept = c.keep_float or c.int16_layers
        how = " in float" if c.keep_float else " at 16-bit activations"
        return (fallback + (f"{why}; " if why else f"{c.variant}: ") +
                f"p50 {c.p50_ms:.4g} ms, {c.bytes} bytes, {c.metric} {c.value:.4f} "
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

def probe_classes(inventory: Any, targets: list[Any], metric: str, max_drop: float | None, each: bool,
                  on_event: Event | None, cancel: Any) -> list[DeviceClass]:
    """Probe the selected boards (what runtime and accelerator each really has), then group them."""
    from pipeline.devices.probe import probe_fleet

    probes = {p.name: p for p in probe_fleet(targets, max_parallel=inventory.max_parallel, on_event=on_event,
                                             cancel=cancel)}
    if cancel is not None:
        cancel.check("stopped after probing the fleet")
    return device_classes(inventory, targets, metric, max_drop, each, probes)


def optimize(inventory: Any, prepared: RunInputs, *, select: list[str] | None = None, objective: str = "latency",
             max_drop: float | None = None, each: bool = False, out_dir: str | Path, cache_dir: Any = None,
             on_event: Event | None = None, on_notice: Callable[[str], None] | None = None,
             cancel: Any = None, lease: Any = None, max_float_layers: int | None = None,
             min_gain: float = DEFAULT_MIN_GAIN, modes: Sequence[str] | None = None) -> OptimizeResult:
    """Measure the candidates of every device class, recover int8 when it misses the budget, choose per class.
    `lease` holds each device while a candidate is measured on it, as in `run`; `max_float_layers` caps how many
    layers recovery keeps in float (default: 20 % of the compute ops, at least 3); `min_gain` (percent) is how much
    faster a candidate must be, beyond noise, for its speed to count; `modes` narrows the candidate formats
    (--candidates; int8's recovery comes with int8)."""
    from pipeline.convert.recovery import layers_json, rank_layers
    from pipeline.run import compute_reference

    check_options(objective, max_drop, max_float_layers, min_gain, modes)
    check_candidates(modes, (t.kind for t in inventory.select(list(select or []))))
    check_model(prepared.src)
    notice = on_notice or (lambda msg: None)
    out = Path(out_dir)
    if prepared.calibration is None:
        raise ConfigError("optimize measures int8 candidates and needs calibration data", field="--calibration",
                          hint="pass --calibration DATA.npz (one array per model input, x for one) or an image folder")
    compute_reference(prepared, Path(cache_dir) if cache_dir else None, out)
    metric, float_value = main_metric(prepared)
    classes = probe_classes(inventory, inventory.select(list(select or [])), metric, max_drop, each, on_event, cancel)
    for cls in classes:
        cls.evidence = Evidence(min_gain)
    measurer = Measurer(inventory, prepared, metric, float_value, out_dir=out, cache_dir=cache_dir,
                        on_event=on_event, cancel=cancel, lease=lease)
    measurer.measure([(cls, Candidate(m, m)) for cls in classes for m in candidate_modes(cls.kind, modes)])
    float32 = next((c.path for cls in classes for c in cls.candidates if c.mode == "float32" and c.path
                    and Path(c.path).exists()), None)   # the ranking's float reference, already converted
    ranked = recover(classes, measurer.measure, make=Candidate, max_float_layers=max_float_layers, notice=notice,
                     rank=lambda: rank_layers(prepared.src, prepared.calibration, cache_dir=cache_dir, log_dir=out,
                                              float_model=float32))
    layers = layers_json(ranked) if ranked is not None else []
    about = None if ranked is None else {"int8": ranked.int8, "metric": ranked.metric, "holdout": ranked.holdout,
                                         "seconds": ranked.seconds, "cached": ranked.cached}
    for cls in classes:
        settle(cls)
    decisions = choose_all(classes, objective, measurer, notice)
    for cls in classes:
        cls.advice = advise(cls, layers, about, why_chosen(decisions[id(cls)], objective, cls.evidence))
    res = OptimizeResult(classes, objective, metric, float_value, layers, measurer.run_ids, min_gain=min_gain)
    res.ranking = about
    return res
