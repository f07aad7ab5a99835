"""Float reference outputs on the host: every output of the float model, by name, for every evaluation sample.

Devices return their outputs; the host scores them against labels and against these. A SavedModel/Keras model runs
through its signature (TensorFlow), a float .tflite through ai-edge-litert; a quantized or Edge-TPU-compiled .tflite
is not a float model, so its reference comes from `--reference MODEL` or is not measured at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.convert.source import (ModelSource, TensorSpec, describe, ends_in_postprocess, identify,
                                     match_specs)
from pipeline.errors import ConfigError, ConversionError, EdgepipeError
from pipeline.files import write_atomic_with

REFERENCE_VERSION = 3


def _chunks(n: int, step: int) -> list[tuple[list[int], int]]:
    """(sample indices, how many are real) per call; the last chunk wraps around so a fixed batch is always full."""
    return [([(s + j) % n for j in range(step)], min(step, n - s)) for s in range(0, n, step)]


def _tf_outputs(src: ModelSource, inputs: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    import tensorflow as tf

    from pipeline.convert.loaded import loaded_signature

    sig = loaded_signature(src)
    args = sig.fn.structured_input_signature[1]
    missing = [name for name in args if name not in inputs]
    if missing:
        raise ConfigError(f"no data for model input '{missing[0]}'", file=str(src.path), field=missing[0])
    fixed = {args[k].shape[0] for k in args if args[k].shape.rank and args[k].shape[0] is not None}
    step = fixed.pop() if fixed else batch_size
    n = len(next(iter(inputs.values())))
    outs: dict[str, list[np.ndarray]] = {}
    for idx, keep in _chunks(n, step):
        feed = {k: tf.constant(inputs[k][idx], args[k].dtype) for k in args}
        for name, value in sig.fn(**feed).items():
            outs.setdefault(name, []).append(np.asarray(value)[:keep])
    return {k: np.concatenate(v).astype(np.float32, copy=False) for k, v in outs.items()}


def _tflite_outputs(src: ModelSource, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    if src.variant != "float":
        raise ConversionError(f"the host cannot compute float outputs of a {src.variant} .tflite", file=str(src.path),
                              hint="pass the float model with --reference (SavedModel, .keras or float .tflite)")
    it = Interpreter(model_path=str(src.path))
    it.allocate_tensors()
    by_name = {d["name"]: d for d in it.get_input_details()}
    out_details = {d["name"]: d for d in it.get_output_details()}
    feeds = [(by_name[s.tflite_name], inputs[s.name]) for s in src.inputs]
    step = int(feeds[0][0]["shape"][0]) or 1
    n = len(feeds[0][1])
    outs: dict[str, list[np.ndarray]] = {s.name: [] for s in src.outputs}
    for idx, keep in _chunks(n, step):
        for detail, x in feeds:
            it.set_tensor(detail["index"], x[idx].astype(detail["dtype"]).reshape(detail["shape"]))
        it.invoke()
        for s in src.outputs:
            outs[s.name].append(np.array(it.get_tensor(out_details[s.tflite_name]["index"]))[:keep])
    return {k: np.concatenate(v).astype(np.float32, copy=False) for k, v in outs.items()}


def _postprocess_outputs(src: ModelSource, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A SavedModel ending in the detection postprocess composite runs as its float32 .tflite (TF would run only
    the composite's placeholders)."""
    from pipeline.convert.loaded import open_signature
    from pipeline.convert.source import float_tflite, signature_specs

    with tempfile.TemporaryDirectory(prefix="edgepipe-ref-") as tmp:
        sig = open_signature(src, Path(tmp))
        tsrc = identify(float_tflite(sig, signature_specs(sig)[0], Path(tmp) / "float32.tflite"))
        in_map = match_specs(tsrc.inputs, src.inputs, what="model inputs", file=str(src.path))
        outs = _tflite_outputs(tsrc, {t: inputs[s] for t, s in in_map.items()})
    out_map = match_specs(src.outputs, tsrc.outputs, what="model outputs", file=str(src.path))
    return {mine: outs[theirs] for mine, theirs in out_map.items()}


def float_outputs(src: ModelSource, inputs: dict[str, np.ndarray], *, batch_size: int = 64,
                  log: str | Path | None = None) -> dict[str, np.ndarray]:
    """Every output of the float model `src` for every sample, keyed by the model's output names.

    `inputs` is keyed by the model's input names. Results equal batch-1 runs (the host batches only for speed).
    TensorFlow/LiteRT run in the quiet worker process; their output goes to `log` (default: a file in the temp dir).
    """
    from pipeline.convert.cache import require_tensorflow
    from pipeline.convert.worker import run_quiet

    if src.kind != "tflite":
        require_tensorflow(f"the float reference of {src.path.name}", file=str(src.path))
    log = log or Path(tempfile.gettempdir()) / f"edgepipe-{os.getuid()}" / f"reference-{src.name}.log"
    return run_quiet(compute_float_outputs, src, inputs, batch_size, log=log, what="the float reference",
                     file=str(src.path))


def compute_float_outputs(src: ModelSource, inputs: dict[str, np.ndarray], batch_size: int = 64
                          ) -> dict[str, np.ndarray]:
    """`float_outputs` in this process (a plain function of its arguments: what the quiet worker runs)."""
    if src.kind == "tflite":
        return _tflite_outputs(src, inputs)
    try:
        if ends_in_postprocess(src):
            return _postprocess_outputs(src, inputs)
        return _tf_outputs(src, inputs, batch_size)
    except EdgepipeError:
        raise
    except Exception as exc:
        text = str(exc).strip()
        raise ConversionError("the float model failed on the evaluation data: "
                              + (text.splitlines()[0][:300] if text else type(exc).__name__), file=str(src.path)) from None


def reference_outputs(src: ModelSource, inputs: dict[str, np.ndarray], reference: ModelSource | None = None,
                      ) -> dict[str, np.ndarray] | None:
    """Float outputs to compare the released model with, keyed by its output names; None when not measurable.

    Without `reference` the released model is its own float reference when the host can run it. With it, the
    reference model's inputs and outputs are matched to the released model's by name, then shape, then position.
    """
    if reference is None:
        return float_outputs(src, inputs) if src.runs_on_host else None
    if not reference.runs_on_host:
        raise ConfigError(f"--reference must be a float model, not a {reference.variant} .tflite",
                          file=str(reference.path), field="--reference",
                          hint="pass the SavedModel, .keras or float .tflite the released model came from")
    in_map = match_specs(reference.inputs, src.inputs, what="reference model inputs", file=str(reference.path))
    outs = float_outputs(reference, {r: inputs[s] for r, s in in_map.items()})
    out_map = match_specs(src.outputs, reference.outputs, what="model outputs in the reference",
                          file=str(reference.path))
    result = {}
    for mine, theirs in out_map.items():
        want = _per_sample(src.output(mine))
        got = tuple(outs[theirs].shape[1:])
        if want is not None and (len(want) != len(got) or any(w not in (None, g) for w, g in zip(want, got))):
            raise ConfigError(f"reference output '{theirs}' has per-sample shape {got} but model output '{mine}' "
                              f"has {want}", file=str(reference.path), field="--reference",
                              hint="pass the float model this model was quantized from")
        result[mine] = outs[theirs]
    return result


def _per_sample(spec: TensorSpec | None) -> tuple | None:
    return tuple(spec.shape[1:]) if spec is not None and spec.shape else None


def reference_key(src: ModelSource, reference: ModelSource | None, data_sha256: str) -> str:
    ident = lambda s: None if s is None else [s.sha256, s.signature, s.overrides]  # noqa: E731
    blob = json.dumps({"v": REFERENCE_VERSION, "model": ident(src), "reference": ident(reference),
                       "data": data_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_reference(src: ModelSource, inputs: dict[str, np.ndarray], data_sha256: str, where: Path,
                     reference: ModelSource | None = None) -> dict[str, np.ndarray] | None:
    """`reference_outputs`, saved in the eval cache (`where`) by model, reference and data content."""
    if reference is None and not src.runs_on_host:
        return None
    path = Path(where) / f"ref-{reference_key(src, reference, data_sha256)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:
            pass   # a torn cache file is recomputed
    outs = reference_outputs(src, inputs, reference)
    if outs is None:
        return None
    write_atomic_with(path, lambda f: np.savez(f, **outs))
    return outs


def float_reference(model: str | Path | ModelSource, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """The single output of a single-input float model for every sample of `x` (a convenience over float_outputs)."""
    from pipeline.convert.data import check_input_array

    src = describe(identify(model))
    if len(src.inputs) != 1 or len(src.outputs) != 1:
        raise ConfigError(f"float_reference takes a single-input, single-output model; this one has inputs "
                          f"{[s.name for s in src.inputs]} and outputs {[s.name for s in src.outputs]}",
                          file=str(src.path), hint="use float_outputs(source, {input name: array})")
    spec = src.inputs[0]
    xs = check_input_array(np.asarray(x), "x", spec, "<array>", "evaluation")
    return float_outputs(src, {spec.name: xs}, batch_size=batch_size)[src.outputs[0].name]
