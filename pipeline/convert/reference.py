"""Float reference outputs of the source model on the host, to compare device results against."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, ConversionError


def check_input_shape(expected: Any, x: np.ndarray, model: Any) -> None:
    """x must be N samples of the model's per-sample input shape; say both shapes, not a framework traceback."""
    exp = tuple(None if d is None or int(d) < 0 else int(d) for d in list(expected)[1:])
    got = tuple(x.shape[1:])
    if len(exp) != len(got) or any(e is not None and e != g for e, g in zip(exp, got)):
        want = "(N, " + ", ".join("?" if e is None else str(e) for e in exp) + ")"
        raise ConfigError(f"array x has shape {tuple(x.shape)} but the model {Path(str(model)).name} takes {want}",
                          field="x", hint="reshape x to the model's input shape (one sample per row)")


def _first_output(y: Any) -> np.ndarray:
    if isinstance(y, dict):
        y = y[sorted(y)[0]]
    elif isinstance(y, (list, tuple)):
        y = y[0]
    return np.asarray(y)


def _saved_model_outputs(path: Path, x: np.ndarray, batch_size: int) -> np.ndarray:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    sig = loaded.signatures.get("serving_default") if "serving_default" in loaded.signatures else None
    if sig is None:
        raise ConversionError("SavedModel has no serving_default signature", file=str(path))
    (name, spec), = sig.structured_input_signature[1].items()
    check_input_shape(spec.shape, x, path)
    outs = []
    for i in range(0, len(x), batch_size):
        outs.append(_first_output({k: v.numpy() for k, v in sig(**{name: tf.constant(x[i:i + batch_size],
                                                                                    spec.dtype)}).items()}))
    return np.concatenate(outs)


def _tflite_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    check_input_shape(inp["shape"], x, path)
    if inp["dtype"] != np.float32:
        raise ConversionError("float reference needs a float model, not a quantized .tflite", file=str(path),
                              hint="pass the SavedModel/.keras model or the float32 artifact")
    ys = []
    for i in range(len(x)):
        it.set_tensor(inp["index"], x[i:i + 1].astype(np.float32))
        it.invoke()
        ys.append(it.get_tensor(out["index"])[0].copy())
    return np.stack(ys)


def float_reference(model: str | Path, x: np.ndarray, *, batch_size: int = 64,
                    log: str | Path | None = None) -> np.ndarray:
    """Outputs of the float model for every sample of `x` (same as batch-1 runs; batched on the host for speed).

    TensorFlow runs in the quiet worker process; its output goes to `log` (default: a file in the temp dir).
    """
    from pipeline.convert.converter import load_source
    from pipeline.convert.worker import run_quiet

    src = load_source(model)
    log = log or Path(tempfile.gettempdir()) / f"edgepipe-{os.getuid()}" / f"reference-{src.name}.log"
    return run_quiet(_reference_outputs, src, np.asarray(x, dtype=np.float32), batch_size, log=log,
                     what="the float reference", file=str(src.path))


def _reference_outputs(src: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    from pipeline.convert.converter import _qat_to_saved_model

    if src.kind == "tflite":
        return _tflite_outputs(src.path, x)
    with tempfile.TemporaryDirectory(prefix="edgepipe-ref-") as tmp:
        if src.kind == "saved_model":
            return _saved_model_outputs(src.path, x, batch_size)
        if src.qat:
            return _saved_model_outputs(_qat_to_saved_model(src, Path(tmp)), x, batch_size)
        import keras

        try:
            m = keras.models.load_model(src.path, compile=False)
        except Exception as exc:
            raise ConversionError(f"cannot load Keras model: {str(exc).splitlines()[0][:300]}",
                                  file=str(src.path)) from None
        check_input_shape(m.inputs[0].shape, x, src.path)
        return _first_output(m.predict(x, batch_size=batch_size, verbose=0))
