"""Which layers int8 hurts most: TensorFlow's QuantizationDebugger per-layer RMSE / scale, ranked and cached.

The documented reading: about 0.29 (uniform rounding of one step) is ideal, above about 0.7 is suspect. The names
ranked are op output tensor names, exactly what the int8 recipe's `keep_float` (the debugger's `denylisted_nodes`)
takes. TensorFlow runs in the quiet worker process, like a conversion.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.convert.cache import require_tensorflow, tf_version
from pipeline.convert.calibration import Calibration
from pipeline.convert.converter import with_source_options
from pipeline.convert.manifest import ModelInfo, canonical_json
from pipeline.convert.recipes import Recipe, make_recipe
from pipeline.convert.source import ModelSource
from pipeline.convert.worker import run_quiet
from pipeline.files import write_atomic

IDEAL_RMSE_SCALE = 0.29
SUSPECT_RMSE_SCALE = 0.7
RANKING_VERSION = 1
QUANT_DTYPES = ("int8", "uint8", "int16")
Progress = Callable[[str, str], None]


@dataclass
class LayerError:
    """One quantized op's error against float on the same inputs, in quantization steps of its output."""

    name: str            # the op's output tensor name (what keep_float takes)
    op: str
    rmse_scale: float
    max_abs_error: float

    @property
    def suspect(self) -> bool:
        return self.rmse_scale > SUSPECT_RMSE_SCALE


def _debug_layers(src: ModelSource, r: Recipe, calib: Calibration, progress: Progress | None = None) -> list[dict]:
    """Run QuantizationDebugger on the int8 recipe (worker side); rows sorted worst first."""
    import tensorflow as tf

    from pipeline.convert.converter import prepared_converter

    report = progress or (lambda stage, detail: None)
    with tempfile.TemporaryDirectory(prefix="edgepipe-recovery-") as tmp:
        converter = prepared_converter(src, r, calib, report, Path(tmp))
        report("debug", "measuring per-layer quantization error (QuantizationDebugger)")
        samples = converter.representative_dataset   # captured now: converting wraps it in a RepresentativeDataset
        dataset = lambda: ([*d.values()] if isinstance(d, dict) else d for d in samples())   # noqa: E731
        dbg = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=dataset)
        dbg.run()
        buf = io.StringIO()
        dbg.layer_statistics_dump(buf)
    rows = []
    for row in csv.DictReader(io.StringIO(buf.getvalue())):
        scale, mse = float(row["scale"] or 0), float(row["mean_squared_error"] or 0)
        rows.append({"name": row["tensor_name"], "op": row["op_name"],
                     "rmse_scale": round(mse ** 0.5 / scale, 4) if scale > 0 else 0.0,
                     "max_abs_error": round(float(row["max_abs_error"] or 0), 6)})
    return sorted(rows, key=lambda x: -x["rmse_scale"])


def rank_layers(src: ModelSource, calibration: Calibration, *, cache_dir: str | Path | None, log_dir: str | Path,
                io_type: str = "int8", progress: Progress | None = None) -> list[LayerError]:
    """The int8 model's layers, worst quantization error first (cached by model, calibration and TF version)."""
    r = with_source_options(make_recipe("int8", io_type=io_type, qat=src.qat), src)
    key = hashlib.sha256(canonical_json({"v": RANKING_VERSION, "model": src.sha256, "recipe": r.key(),
                                         "calibration": calibration.sha256, "tf": tf_version()}).encode()).hexdigest()
    where = Path(cache_dir) / "recovery" / f"{key}.json" if cache_dir else None
    if where is not None and where.exists():
        rows = json.loads(where.read_text())
    else:
        require_tensorflow("ranking the int8 model's layers", file=str(src.path))
        rows = run_quiet(_debug_layers, src, r, calibration, progress=progress,
                         log=Path(log_dir) / "logs" / f"{src.name}.recovery.log",
                         what="per-layer quantization debugging", file=str(src.path))
        if where is not None:
            where.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(where, json.dumps(rows, indent=1))
    return [LayerError(**row) for row in rows]


def layers_json(layers: list[LayerError]) -> list[dict[str, Any]]:
    return [dict(asdict(x), suspect=x.suspect) for x in layers]


def quantized_share(info: ModelInfo) -> tuple[int, int]:
    """(ops computing on quantized tensors, compute ops): QUANTIZE/DEQUANTIZE are conversions, not counted."""
    compute = [op for op in info.ops if op.name not in ("QUANTIZE", "DEQUANTIZE")]
    quantized = 0
    for op in compute:
        first = next((info.tensors[i] for i in op.inputs if i >= 0 and not info.tensors[i].is_constant), None)
        if first is not None and first.dtype in QUANT_DTYPES:
            quantized += 1
    return quantized, len(compute)


def kept_ops(info: ModelInfo, keep_float: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """Where each kept-float layer sits in the artifact: {name, op, index} (index None when renamed away)."""
    by_output = {info.tensors[o].name: op for op in info.ops for o in op.outputs}
    out = []
    for name in keep_float:
        op = by_output.get(name)
        out.append({"name": name, "op": op.name if op else None, "index": op.index if op else None})
    return out
