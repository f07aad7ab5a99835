"""`edgepipe optimize`'s int8 recovery: when int8 misses a class's accuracy budget, keep the layers int8 hurts most
in float, in order of their measured benefit, re-measuring on the devices until the budget holds; then, on CPU
classes, offer the same layers at 16-bit activations instead (16x8 mixed precision), which the Edge TPU cannot run.

The ranking is measured on the host (`pipeline.convert.recovery.rank_layers`). Device classes and candidates are
optimize's (`pipeline.optimize`); this module only needs their fields and gets the candidate type and the measuring
function passed in, so it never imports optimize back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import ConversionError

MAX_FLOAT_SHARE = 0.2        # default cap: this share of the compute ops kept in float ...
MIN_MAX_FLOAT_LAYERS = 3     # ... but never fewer than this many
# Runtimes that cannot load an int8 model with int16 layers: tflite-runtime 2.14's QUANTIZE kernel cannot
# requantize int8 to int16 ("output->type == kTfLiteUInt8 || output->type == kTfLiteInt8 was not true"; measured).
NO_MIXED_16X8 = ("tflite-runtime", "pycoral")
Notice = Callable[[str], None]


def default_cap(compute_ops: int) -> int:
    """`--max-float-layers` when not given: 20 % of the compute ops, never fewer than 3."""
    return max(MIN_MAX_FLOAT_LAYERS, int(compute_ops * MAX_FLOAT_SHARE))


def short(name: str) -> str:
    """A layer's readable name: the first part of a fused op's name, without the model's scope prefix."""
    head = name.split(";", 1)[0]
    parts = [p for p in head.split("/") if p]
    return "/".join(parts[-2:]) if len(parts) > 2 else head


def needs_recovery(cls: Any) -> bool:
    """int8 was measured on this class and missed the budget, and no recovered int8 passed yet."""
    int8 = [c for c in cls.candidates if c.mode == "int8"]
    return bool(int8) and int8[0].drop is not None and not any(c.within_budget for c in int8)


@dataclass
class Step:
    """One greedy step: the layers in float after adding `added` (a measured fix: a layer, or it and its readers)."""

    keep: list[str]
    added: Any                       # recovery.LayerError


def steps(ranking: Any, cap: int, notice: Notice) -> Iterator[Step]:
    """Measured fixes in order of benefit, each step adding the next to the layers already kept in float; stops at
    a fix that measured no gain on the host, or where the cap would be passed (saying so when it gets there)."""
    keep: list[str] = []
    for layer in ranking.measured():
        if layer.effect["benefit"] <= 0:
            notice("no further layer kept in float measurably helped on the host (held-out calibration samples)"
                   if keep else "no layer kept in float measurably helped on the host; int8 cannot be recovered "
                   "this way")
            return
        new = sorted(set(keep) | set(layer.keep_float))
        if new == keep:
            continue
        if len(new) > cap:
            notice(f"the next layer ({short(layer.name)}) would keep {len(new)} layers in float, over the cap of "
                   f"{cap} (--max-float-layers): recovery stops there")
            return
        keep = new
        yield Step(keep, layer)


def _compute_ops(classes: list[Any]) -> int | None:
    from pipeline.convert.manifest import read_model
    from pipeline.convert.recovery import quantized_share

    for cls in classes:
        for c in cls.candidates:
            if c.mode == "int8" and not c.keep_float and c.path and Path(c.path).exists():
                return quantized_share(read_model(c.path))[1]
    return None


def _effect_text(layer: Any, base: dict[str, Any], metric: str) -> str:
    e = layer.effect
    return (f"host: {metric} {base.get(metric) or 0:.2f} -> {e.get(metric) or 0:.2f}, SNR {base['snr_db']:.1f} -> "
            f"{e['snr_db']:.1f} dB")


def greedy(classes: list[Any], measure: Callable[[list[tuple[Any, Any]]], None], make: Callable[..., Any],
           ranking: Any, cap: int, notice: Notice) -> None:
    """Keep the ranked fixes in float, one more per step, re-measuring the classes that still miss their budget; a
    class stops at a step that brought it nothing on its device (said in a notice and in its notes)."""
    pending = [c for c in classes if needs_recovery(c)]
    last = {id(c): next(x for x in c.candidates if x.mode == "int8").drop for c in pending}

    def tell(msg: str) -> None:   # a stop that concerns every class still missing its budget
        notice(msg)
        for c in pending:
            if needs_recovery(c):
                c.notes.append(msg)

    for step in steps(ranking, cap, tell):
        pending = [c for c in pending if needs_recovery(c)]
        if not pending:
            return
        notice(f"recovering int8: keeping {len(step.keep)} layer(s) in float ({short(step.added.name)} added; "
               f"{_effect_text(step.added, ranking.int8, ranking.metric)}) on {', '.join(c.label for c in pending)}")
        jobs = [(c, make("int8", f"int8+float{len(step.keep)}", keep_float=list(step.keep))) for c in pending]
        measure(jobs)
        for cls, cand in jobs:
            if cand.drop is not None and not cand.within_budget and cand.drop >= last[id(cls)] - 1e-9:
                msg = (f"keeping {short(step.added.name)} in float too brought nothing on {cls.label} (drop "
                       f"{last[id(cls)]:.2f} -> {cand.drop:.2f} points): recovery stops there")
                notice(msg)
                cls.notes.append(msg)
                pending.remove(cls)
            elif cand.drop is not None:
                last[id(cls)] = cand.drop


def mixed_16x8(classes: list[Any], measure: Callable[[list[tuple[Any, Any]]], None], make: Callable[..., Any],
               notice: Notice) -> None:
    """On CPU classes that needed recovery: the layers of their best recovered int8 at 16-bit activations instead
    of float (16x8 mixed precision), measured beside it; `choose` takes it when it does better there."""
    jobs = []
    for cls in classes:
        kept = [c for c in cls.candidates if c.keep_float and c.drop is not None]
        if cls.kind != "cpu" or not kept:
            continue
        if cls.runtime.split("==")[0] in NO_MIXED_16X8:
            cls.notes.append(f"no 16x8 mixed candidate: {cls.runtime} cannot requantize int8 to int16")
            continue
        ok = [c for c in kept if c.within_budget]
        best = min(ok, key=lambda c: len(c.keep_float)) if ok else min(kept, key=lambda c: c.drop)
        jobs.append((cls, make("int8", f"int8+int16x{len(best.keep_float)}", int16_layers=list(best.keep_float))))
    if jobs:
        notice("trying the same layers at 16-bit activations (16x8 mixed precision, ai-edge-quantizer) on "
               + ", ".join(c.label for c, _ in jobs))
        measure(jobs)


def edgetpu_cost(cand: Any, plain: Any) -> list[dict[str, Any]]:
    """Per kept-float layer: where it sits and what it costs on the Edge TPU (a float op ends the TPU segment)."""
    from pipeline.convert.manifest import read_model
    from pipeline.convert.recovery import kept_ops

    if not cand.path or not Path(cand.path).exists():
        return []
    info = read_model(cand.path)
    total = len(info.ops)
    tpu = cand.edgetpu or {}
    out = []
    for k in kept_ops(info, cand.keep_float):
        note = ("a float op: the Edge TPU segment ends here, the ops from here on run on the CPU"
                if k["index"] is not None else "not found by name in the artifact")
        out.append({**k, "cpu_ops_from_here": total - k["index"] if k["index"] is not None else None,
                    "mapped_share": tpu.get("mapped_share"),
                    "plain_int8_mapped_share": (plain.edgetpu or {}).get("mapped_share") if plain else None,
                    "status": tpu.get("status"), "note": note})
    return out


def recover(classes: list[Any], measure: Callable[[list[tuple[Any, Any]]], None], *, make: Callable[..., Any],
            rank: Callable[[], Any], max_float_layers: int | None, notice: Notice) -> Any:
    """Recover int8 where it misses a class's budget (see the module doc); returns the ranking (None when nothing
    needed it or the model cannot be ranked)."""
    missing = [c for c in classes if needs_recovery(c)]
    if not missing:
        return None
    notice(f"int8 misses the budget on {', '.join(c.label for c in missing)}: ranking its layers by what keeping "
           "each in float does (on the host, held-out calibration samples; cached after the first time)")
    try:
        ranking = rank()
    except ConversionError as exc:   # the model cannot be ranked: no recovery, the tables still stand
        notice(f"cannot rank int8 layers, so no int8 recovery: {exc.one_line()}")
        return None
    compute = _compute_ops(classes) or len(ranking.layers)
    cap = max_float_layers or default_cap(compute)
    greedy(classes, measure, make, ranking, cap, notice)
    mixed_16x8(classes, measure, make, notice)
    for cls in classes:
        if cls.accelerator == "edgetpu":
            plain = next((c for c in cls.candidates if c.mode == "int8" and not c.keep_float), None)
            for c in cls.candidates:
                if c.keep_float:
                    c.edgetpu_cost = edgetpu_cost(c, plain)
    return ranking
