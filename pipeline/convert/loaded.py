"""Loading a SavedModel or Keras model's signature with TensorFlow, and keeping it loaded in the quiet worker.

Loading a Keras model (load it, export a SavedModel, load that) costs about as much as converting it, and one
`edgepipe optimize` converts a model up to ten times, ranks its layers and computes its float reference: each of
those reuses the loaded signature (`loaded_signature`, keyed by the model's content hash, kind, QAT flag and
signature, so an edited model is loaded afresh; the SavedModel a Keras model was exported to lives as long as its
entry). TensorFlow is imported only when a model is really loaded.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import ConfigError, ConversionError

DEFAULT_SIGNATURE = "serving_default"
KEEP = 2   # models kept loaded (MobileNetV2-sized models take tens of MB each)
Progress = Callable[[str, str], None]
_LOADED: "OrderedDict[tuple, tuple[LoadedSignature, tempfile.TemporaryDirectory]]" = OrderedDict()


def _qat_to_saved_model(src: Any, workdir: Path) -> Path:
    """Keras 3 cannot load a tfmot QAT .h5/.keras; re-save it as a SavedModel in a legacy-Keras subprocess."""
    out = workdir / "qat_savedmodel"
    script = (
        "import os, sys\n"
        "os.environ['TF_USE_LEGACY_KERAS'] = '1'\n"
        "import tensorflow as tf\n"
        "import tensorflow_model_optimization as tfmot\n"
        "with tfmot.quantization.keras.quantize_scope():\n"
        "    m = tf.keras.models.load_model(sys.argv[1], compile=False)\n"
        "tf.saved_model.save(m, sys.argv[2])\n"
    )
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", script, str(src.path), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        if "tensorflow_model_optimization" in proc.stderr or "tf_keras" in proc.stderr:
            raise ConversionError("this is a quantization-aware-trained (QAT) Keras 2 model; loading it needs "
                                  "tensorflow-model-optimization and tf-keras", file=str(src.path),
                                  hint="pip install tensorflow-model-optimization tf-keras, or export it as "
                                       "a SavedModel directory")
        raise ConversionError(f"cannot load QAT model: {tail}", file=str(src.path))
    return out


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


@dataclass
class LoadedSignature:
    """A SavedModel signature ready to call; `loaded` keeps its variables alive. `declared` holds Keras shapes."""

    loaded: Any
    fn: Any
    key: str
    declared: dict[str, tuple[int | None, ...]]


def open_signature(src: Any, workdir: Path, progress: Progress | None = None) -> LoadedSignature:
    """Load the model's signature with TensorFlow (a Keras file is exported to a SavedModel in `workdir` first)."""
    import tensorflow as tf

    report = progress or (lambda stage, detail: None)
    path, declared = src.path, {}
    if src.kind in ("keras", "h5") and src.qat:
        report("load", "QAT model: re-saving with legacy Keras + tfmot")
        path = _qat_to_saved_model(src, workdir)
    elif src.kind in ("keras", "h5"):
        import keras

        try:
            model = keras.models.load_model(src.path, compile=False)
        except Exception as exc:
            raise ConversionError(f"cannot load Keras model: {first_line(exc)}", file=str(src.path),
                                  hint="check the file is a complete Keras model saved with model.save()") from None
        for t in model.inputs:
            name = getattr(t, "name", None)
            if name:
                declared[name] = tuple(None if d is None else int(d) for d in t.shape)
        path = workdir / "savedmodel"
        try:
            model.export(str(path), verbose=False)
        except Exception as exc:
            raise ConversionError(f"cannot export the Keras model: {first_line(exc)}", file=str(src.path)) from None
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ConversionError(f"cannot load SavedModel: {first_line(exc)}", file=str(src.path)) from None
    sigs = dict(loaded.signatures)
    key = src.signature or DEFAULT_SIGNATURE
    if key not in sigs:
        have = ", ".join(sorted(sigs)) or "none"
        if not sigs:
            raise ConversionError("SavedModel has no signature to convert", file=str(src.path),
                                  hint="export it with model.export(DIR) or tf.saved_model.save(m, DIR, signatures=...)")
        raise ConfigError(f"SavedModel has no signature '{key}' (signatures: {have})", file=str(src.path),
                          field="--signature", hint=f"pass --signature {sorted(sigs)[0]}")
    return LoadedSignature(loaded, sigs[key], key, declared)


def loaded_signature(src: Any, progress: Progress | None = None) -> LoadedSignature:
    """`open_signature(src)`, loaded once per model content in this process (the worker)."""
    key = (src.sha256, src.kind, src.qat, src.signature or DEFAULT_SIGNATURE)
    hit = _LOADED.get(key)
    if hit is not None:
        _LOADED.move_to_end(key)
        return hit[0]
    workdir = tempfile.TemporaryDirectory(prefix="edgepipe-loaded-")
    try:
        sig = open_signature(src, Path(workdir.name), progress)
    except BaseException:
        workdir.cleanup()
        raise
    _LOADED[key] = (sig, workdir)
    while len(_LOADED) > KEEP:
        _, (_, old) = _LOADED.popitem(last=False)
        old.cleanup()
    return sig


def forget() -> None:
    """Drop every loaded model (and its exported SavedModel)."""
    while _LOADED:
        _, (_, old) = _LOADED.popitem()
        old.cleanup()
