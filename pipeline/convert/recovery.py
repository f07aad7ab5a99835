"""Which layers int8 hurts most, by what keeping them in float measurably does: ranked on the host and cached.

Per-tensor RMSE / scale (TensorFlow's QuantizationDebugger; about 0.29 is ideal, above about 0.7 suspect) is a
cheap first signal, not an answer: an activation outlier widens its tensor's scale, so its error reads tiny in steps
of that scale exactly where int8 did the damage. So the ranking (convert/layer_effect.py, in the quiet worker)
preselects ops by that signal and by the error relative to the float tensor's own magnitude, then measures with
LiteRT what keeping each in float (alone, and with the ops reading its output) does to the model's outputs on a
held-out part of the calibration data, and ranks by that measured benefit. The names are op output tensor names,
exactly what the int8 recipe's `keep_float` (the debugger's `denylisted_nodes`) and `int16_layers` take.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.convert.cache import require_tensorflow, tf_version
from pipeline.convert.calibration import Calibration
from pipeline.convert.converter import with_source_options
from pipeline.convert.data import bind_inputs
from pipeline.convert.layer_effect import SUSPECT_REL_ERROR, measure_effects
from pipeline.convert.manifest import ModelInfo, activation_dtypes, canonical_json
from pipeline.convert.recipes import make_recipe
from pipeline.convert.source import ModelSource
from pipeline.convert.worker import run_quiet
from pipeline.files import write_atomic

IDEAL_RMSE_SCALE = 0.29
SUSPECT_RMSE_SCALE = 0.7
RANKING_VERSION = 2
HOLDOUT = 0.25             # share of the calibration samples held out to measure the effect on ...
HOLDOUT_MAX = 64           # ... at most this many
EIGHT_BIT = ("int8", "uint8")
Progress = Callable[[str, str], None]


@dataclass
class LayerError:
    """One quantized op: its local int8 error, and (when measured) what keeping it in float does to the outputs."""

    name: str                    # the op's output tensor name (what keep_float takes)
    op: str
    rmse_scale: float            # RMSE in quantization steps of its output
    max_abs_error: float
    rel_error: float = 0.0       # error relative to the float tensor's own per-channel magnitude
    keep_float: list[str] = field(default_factory=list)   # what keeping it in float takes: it, or it and its readers
    effect: dict[str, Any] | None = None   # scores with `keep_float` in float: agreement, snr_db, top1, benefit

    @property
    def suspect(self) -> bool:
        if self.effect is not None:
            return self.effect["benefit"] > 0
        return self.rmse_scale > SUSPECT_RMSE_SCALE or self.rel_error > SUSPECT_REL_ERROR


@dataclass
class Ranking:
    """The layers, measured ones first by measured benefit, and what full int8 scores on the same samples."""

    layers: list[LayerError]
    int8: dict[str, Any] = field(default_factory=dict)   # full int8's agreement, snr_db, top1 vs float
    metric: str = "agreement"   # what `benefit` is in: top1 (labels), agreement (a class axis) or snr_db
    holdout: int = 0
    seconds: float = 0.0        # host time of the ranking when it was computed (cached ones keep it)
    cached: bool = False

    def measured(self) -> list[LayerError]:
        return [x for x in self.layers if x.effect is not None]


def primary(scores: dict[str, Any]) -> tuple[str, float]:
    """The figure a ranking orders by: top-1 against labels, else agreement with float, else SNR."""
    for key in ("top1", "agreement"):
        if scores.get(key) is not None:
            return key, float(scores[key])
    return "snr_db", float(scores.get("snr_db") or 0.0)


def _labels(calibration: Calibration, src: ModelSource) -> np.ndarray | None:
    """Class labels in the calibration data (`y`, or its only label array), if it has them."""
    try:
        labels = bind_inputs(calibration.arrays, src.inputs or [], calibration.source, "calibration")[1]
    except Exception:   # noqa: BLE001 - labels are optional here; the data itself was checked by load_calibration
        return None
    a = labels.get("y") if "y" in labels else (next(iter(labels.values())) if len(labels) == 1 else None)
    return None if a is None or np.asarray(a).dtype.kind not in "iu" else np.asarray(a)


def build_ranking(doc: dict[str, Any]) -> Ranking:
    """A Ranking from the worker's measurements (see layer_effect.measure_effects): each op with its best fix."""
    base = doc["int8"]
    metric, base_value = primary(base)
    tol = 0.5 if metric == "snr_db" else 0.01   # a smaller fix within this of a bigger one is as good
    best: dict[str, dict[str, Any]] = {}
    for m in doc["measured"]:
        value = primary(m)[1]
        effect = {"agreement": m["agreement"], "snr_db": m["snr_db"], "top1": m["top1"],
                  "benefit": round(value - base_value, 4), "keep_float": m["keep_float"]}
        old = best.get(m["layer"])   # measured alone first, then with its readers
        if old is None or effect["benefit"] > old["benefit"] + tol:
            best[m["layer"]] = effect
    layers = []
    for row in doc["rows"]:
        eff = best.get(row["name"])
        layers.append(LayerError(row["name"], row["op"], row["rmse_scale"], row["max_abs_error"], row["rel_error"],
                                 list(eff["keep_float"]) if eff else [row["name"]],
                                 {k: v for k, v in eff.items() if k != "keep_float"} if eff else None))
    cheap = lambda x: max(x.rmse_scale / SUSPECT_RMSE_SCALE, x.rel_error / SUSPECT_REL_ERROR)  # noqa: E731
    layers.sort(key=lambda x: (x.effect is None, -(x.effect or {}).get("benefit", 0.0),
                               -(x.effect or {}).get("snr_db", 0.0), len(x.keep_float), -cheap(x)))
    return Ranking(layers, base, metric, doc.get("holdout", 0), doc.get("seconds", 0.0))


def rank_layers(src: ModelSource, calibration: Calibration, *, cache_dir: str | Path | None, log_dir: str | Path,
                io_type: str = "int8", progress: Progress | None = None,
                float_model: str | Path | None = None) -> Ranking:
    """The int8 model's layers by the measured benefit of keeping them in float (cached by model, recipe,
    calibration and TF version, like a conversion). `float_model`: its float32 .tflite, when already converted."""
    r = with_source_options(make_recipe("int8", io_type=io_type, qat=src.qat), src)
    calibration = calibration.bind(src.inputs) if src.inputs else calibration
    key = hashlib.sha256(canonical_json({"v": RANKING_VERSION, "model": src.sha256, "recipe": r.key(),
                                         "calibration": calibration.sha256, "tf": tf_version()}).encode()).hexdigest()
    where = Path(cache_dir) / "recovery" / f"{key}.json" if cache_dir else None
    if where is not None and where.exists():
        ranking = build_ranking(json.loads(where.read_text()))
        ranking.cached = True
        return ranking
    n = calibration.count
    holdout = min(HOLDOUT_MAX, int(n * HOLDOUT)) if n >= 8 else n   # too few to hold any out: measure on all
    labels = _labels(calibration, src)
    require_tensorflow("ranking the int8 model's layers", file=str(src.path))
    doc = run_quiet(measure_effects, src, r, calibration, holdout, labels[n - holdout:] if labels is not None
                    else None, progress=progress, log=Path(log_dir) / "logs" / f"{src.name}.recovery.log",
                    what="ranking int8 layers by measured effect", file=str(src.path),
                    float_model=Path(float_model).read_bytes() if float_model else None)
    if where is not None:
        where.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(where, json.dumps(doc, indent=1))
    return build_ranking(doc)


def layers_json(ranking: Ranking | list[LayerError]) -> list[dict[str, Any]]:
    layers = ranking.layers if isinstance(ranking, Ranking) else ranking
    return [dict(asdict(x), suspect=x.suspect) for x in layers]


def quantized_share(info: ModelInfo) -> tuple[int, int]:
    """(compute ops working on 8-bit integers, compute ops): QUANTIZE/DEQUANTIZE are conversions, not counted;
    an op at 16-bit activations is not 8-bit."""
    acts = activation_dtypes(info)
    return sum(d in EIGHT_BIT for d in acts), len(acts)


def kept_ops(info: ModelInfo, keep_float: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """Where each kept-float layer sits in the artifact: {name, op, index} (index None when renamed away)."""
    by_output = {info.tensors[o].name: op for op in info.ops for o in op.outputs}
    out = []
    for name in keep_float:
        op = by_output.get(name)
        out.append({"name": name, "op": op.name if op else None, "index": op.index if op else None})
    return out
