"""What keeping a layer of an int8 model in float does to the model's outputs, measured on the host with LiteRT.

The worker side of `recovery.rank_layers` (it runs in the quiet worker process, like a conversion):

1. calibrate once, on all but a held-out part of the calibration data;
2. preselect cheaply, per quantized op, from QuantizationDebugger's local error: RMSE in steps of the op's output
   scale (a weight outlier shows there) and the error relative to the float tensor's own per-channel magnitude (an
   activation outlier widens the scale, so it hides in steps of the scale, but not there);
3. for each preselected op, quantize with it kept in float, and with it and the ops that read its output kept in
   float (an activation outlier damages the tensor itself, so its readers must take it in float too), run each
   on the held-out samples with LiteRT and score the outputs against the float model's: top-1 agreement, SNR, and
   top-1 against labels when the calibration data has them.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

Progress = Callable[[str, str], None]
MEASURE_ALL_UP_TO = 16   # a model with this few quantized ops has every op measured
PRESELECT = 6            # otherwise: this many ops by each cheap signal (measuring one costs ~0.1 s)
SUSPECT_REL_ERROR = 0.5  # error at half the float tensor's own magnitude: its values are mostly gone


def rel_error(f: np.ndarray, q: np.ndarray, scale: float, zero_point: int) -> float:
    """One sample's error of a quantized tensor relative to the float tensor's own magnitude: the median over
    channels (last axis) of RMS(error) / RMS(float value), channels that are exactly zero left out. 0.0x for a
    healthy layer; about 1 where int8 rounded the tensor's values away, whatever its scale."""
    f = np.asarray(f, np.float64)
    d = (np.asarray(q, np.float64) - zero_point) * scale - f
    c = f.shape[-1] if f.ndim else 1
    mag = np.sqrt((f.reshape(-1, c) ** 2).mean(0))
    err = np.sqrt((d.reshape(-1, c) ** 2).mean(0))
    live = mag > 0
    return float(np.median(err[live] / mag[live])) if live.any() else float("nan")


def _stats(debug_model: bytes, dataset: Callable[[], Any]) -> list[dict[str, Any]]:
    """Per quantized op (by output tensor name): rmse/scale, max |error| and rel_error from the debugger."""
    import csv
    import io

    import tensorflow as tf

    opts = tf.lite.experimental.QuantizationDebugOptions(layer_direct_compare_metrics={"rel_error": rel_error})
    dbg = tf.lite.experimental.QuantizationDebugger(quant_debug_model_content=debug_model, debug_dataset=dataset,
                                                    debug_options=opts)
    dbg.run()
    buf = io.StringIO()
    dbg.layer_statistics_dump(buf)
    rows = []
    for row in csv.DictReader(io.StringIO(buf.getvalue())):
        scale, mse = float(row["scale"] or 0), float(row["mean_squared_error"] or 0)
        rel = float(row.get("rel_error") or "nan")
        rows.append({"name": row["tensor_name"], "op": row["op_name"],
                     "rmse_scale": round(mse ** 0.5 / scale, 4) if scale > 0 else 0.0,
                     "max_abs_error": round(float(row["max_abs_error"] or 0), 6),
                     "rel_error": round(rel, 4) if np.isfinite(rel) else 0.0})
    return rows


class Runner:
    """Runs .tflite models on the held-out samples with LiteRT (batch by batch, as the model's input shape says):
    outputs in the float model's signature order, dequantized."""

    def __init__(self, inputs: dict[str, np.ndarray]) -> None:
        self.inputs = inputs
        self.n = len(next(iter(inputs.values())))

    def __call__(self, model: bytes) -> list[np.ndarray]:
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_content=model)
        runner = it.get_signature_runner()
        ins, outs = runner.get_input_details(), runner.get_output_details()
        step = max(int(d["shape"][0]) for d in ins.values()) or 1
        got: dict[str, list[np.ndarray]] = {k: [] for k in outs}
        for start in range(0, self.n, step):
            idx = [(start + j) % self.n for j in range(step)]
            feed = {k: _quantize(self.inputs[k][idx], d) for k, d in ins.items()}
            res = runner(**feed)
            keep = min(step, self.n - start)
            for k in outs:
                got[k].append(_dequantize(res[k], outs[k])[:keep])
        return [np.concatenate(got[k]) for k in sorted(got)]


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating):
        scale, zp = detail["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zp), info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


def _dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zp = detail["quantization"]
    if np.issubdtype(y.dtype, np.integer) and scale:
        return (y.astype(np.float64) - zp) * scale
    return y.astype(np.float64)


def score(ref: list[np.ndarray], got: list[np.ndarray], labels: np.ndarray | None) -> dict[str, float | None]:
    """Against the float outputs: SNR in dB (all outputs together), top-1 agreement (outputs with a class axis),
    and top-1 against `labels` (the first such output)."""
    noise = sum(float(((g - r) ** 2).sum()) for r, g in zip(ref, got))
    signal = sum(float((r ** 2).sum()) for r in ref)
    snr = 10 * np.log10(signal / noise) if noise > 0 and signal > 0 else (99.0 if signal > 0 else 0.0)
    classes = [(r, g) for r, g in zip(ref, got) if r.ndim >= 2 and r.shape[-1] >= 2]
    agree = float(np.mean([(r.reshape(len(r), -1).argmax(-1) == g.reshape(len(g), -1).argmax(-1)).mean()
                           for r, g in classes])) if classes else None
    top1 = None
    if labels is not None and classes and len(labels) == len(classes[0][1]):
        top1 = float((classes[0][1].reshape(len(labels), -1).argmax(-1) == labels.reshape(len(labels))).mean())
    return {"snr_db": round(float(min(snr, 99.0)), 3), "agreement": agree, "top1": top1}


def readers(graph: Any, name: str, limit: int = 8) -> list[str]:
    """The ops that take the tensor op `name` writes (in the full int8 model `graph`), followed through the ops
    that keep its quantization scale (pooling, reshape, padding: int8 gives their input and output one scale)
    up to the first op that computes something new from it: those must take it in float when it must stay float."""
    producer = {graph.tensors[o].name: op for op in graph.ops for o in op.outputs}
    op = producer.get(name)
    if op is None:
        return []
    frontier, found = list(op.outputs), []
    while frontier and len(found) < limit:
        t = frontier.pop(0)
        scale = graph.tensors[t].scale
        for c in graph.ops:
            if t in c.inputs and c.outputs and c.name not in ("QUANTIZE", "DEQUANTIZE"):
                out = graph.tensors[c.outputs[0]]
                if out.name not in found:
                    found.append(out.name)
                    if scale and out.scale == scale:   # scale kept: the outlier goes on through it
                        frontier.append(c.outputs[0])
    return found


def fixes(rows: list[dict[str, Any]], graph: Any) -> list[tuple[str, list[str]]]:
    """(op, op set) pairs to measure: each preselected op alone, and with the ops reading its output (`readers`)."""
    names = [r["name"] for r in rows]
    if len(rows) > MEASURE_ALL_UP_TO:
        # damage shows downstream of where it starts too: of the ops whose values are mostly gone, the first
        # ones in the graph (rows are in graph order), then the largest relative errors
        bad = [r for r in rows if r["rel_error"] > SUSPECT_REL_ERROR]
        by_rel = (bad + sorted((r for r in rows if r not in bad), key=lambda r: -r["rel_error"]))[:PRESELECT]
        by_rmse = sorted(rows, key=lambda r: -r["rmse_scale"])[:PRESELECT]
        chosen = {r["name"] for r in by_rel + by_rmse}
        names = [n for n in names if n in chosen]
    quantized = {r["name"] for r in rows}
    pairs: list[tuple[str, list[str]]] = []
    for name in names:
        pairs.append((name, [name]))
        more = set(readers(graph, name)) & quantized
        if more - {name}:
            pairs.append((name, sorted({name, *more})))
    return pairs


def measure_effects(src: Any, r: Any, calib: Any, holdout: int, labels: np.ndarray | None,
                    progress: Progress | None = None, float_model: bytes | None = None) -> dict[str, Any]:
    """The worker's job (see the module doc): returns {"rows": per-op cheap signals, "int8": full int8's score,
    "measured": [{"layer", "keep_float", **score}], "holdout", "seconds"}. `float_model`: the float32 .tflite of
    `src` when the caller has it already (else it is converted here)."""
    from dataclasses import replace

    from tensorflow.lite.python.convert import mlir_quantize

    from pipeline.convert.converter import prepared_converter
    from pipeline.convert.manifest import read_model
    from pipeline.convert.recipes import quantize_selective
    from pipeline.convert.source import static_converter

    report = progress or (lambda stage, detail: None)
    t0 = time.perf_counter()
    calib = calib.bind(src.inputs)
    n = len(next(iter(calib.inputs.values())))
    fit = replace(calib, inputs={k: v[: n - holdout] for k, v in calib.inputs.items()}) if holdout < n else calib
    held = {k: v[n - holdout:] for k, v in calib.inputs.items()}
    converter = prepared_converter(src, r, fit, report)
    report("rank", "calibrating once" if float_model else "converting to float and calibrating once")
    if float_model is None:
        float_model = bytes(static_converter(converter._edgepipe_keepalive, src.inputs).convert())   # the loaded model
    converter.experimental_mlir_quantizer = True
    converter._experimental_calibrate_only = True
    calibrated = bytes(converter.convert())
    per_channel_off = converter._experimental_disable_per_channel
    report("rank", "per-layer error of int8 (QuantizationDebugger)")
    debug_model = mlir_quantize(calibrated, disable_per_channel=per_channel_off, fully_quantize=False,
                                enable_numeric_verify=True)
    steps = fit.samples({s.name: int(s.shape[0]) for s in src.inputs})
    batches = list(steps)[:64]
    rows = _stats(debug_model, lambda: ([*b.values()] if isinstance(b, dict) else b for b in batches))
    run = Runner(held)
    ref = run(float_model)
    int8 = quantize_selective(_keeping(r, ()), converter, calibrated)
    base = score(ref, run(int8), labels)
    graph = read_model(int8)
    order = {graph.tensors[o].name: op.index for op in graph.ops for o in op.outputs}
    rows.sort(key=lambda row: order.get(row["name"], len(order)))   # graph order
    measured, done = [], {}
    pairs = fixes(rows, graph)
    for i, (name, keep) in enumerate(pairs, 1):
        report("rank", f"measuring {i}/{len(pairs)}: {len(keep)} layer(s) in float")
        if tuple(keep) not in done:
            got = run(quantize_selective(_keeping(r, keep), converter, calibrated))
            done[tuple(keep)] = score(ref, got, labels)
        measured.append({"layer": name, "keep_float": keep, **done[tuple(keep)]})
    return {"rows": rows, "int8": base, "measured": measured, "holdout": len(next(iter(held.values()))),
            "seconds": round(time.perf_counter() - t0, 2)}


def _keeping(r: Any, keep: Any) -> Any:
    """The int8 recipe `r` with `keep` as its keep_float (what quantize_selective reads)."""
    from dataclasses import replace

    return replace(r, options={**r.options, "keep_float": list(keep)})
