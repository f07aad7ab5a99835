"""The conversion entry point: one model + one mode -> a .tflite artifact with its manifest (cached).

TensorFlow is imported only when a conversion really runs; a cache hit or a .tflite pass-through never imports it.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.convert.cache import ConversionCache, cache_key, tf_version
from pipeline.files import sha256_path, write_atomic
from pipeline.convert.calibration import Calibration, load_calibration
from pipeline.convert.compat import check_compat, parse_compat
from pipeline.errors import ConversionError, EdgepipeError
from pipeline.convert.manifest import build_manifest, detect_mode, manifest_hash, read_model, write_manifest
from pipeline.convert.recipes import MODES, FormatRequest, Recipe, apply_recipe, make_recipe, plan_formats
from pipeline.convert.worker import run_quiet

__all__ = ["Artifact", "FormatRequest", "ModelSource", "convert", "load_source", "plan_formats"]

log = logging.getLogger(__name__)
Progress = Callable[[str, str], None]
_FD_LOCK = threading.Lock()
_QAT_MARKERS = (b"QuantizeWrapper", b"QuantizeLayer", b"FakeQuantWithMinMaxVars")


@dataclass
class Artifact:
    mode: str
    path: Path
    sha256: str
    bytes: int
    manifest: dict[str, Any]
    manifest_path: Path
    cached: bool
    edgetpu: dict[str, Any] | None = None


@dataclass
class ModelSource:
    """A model on disk, identified by content hash; `kind` is saved_model, keras, h5 or tflite."""

    path: Path
    kind: str
    name: str
    sha256: str
    qat: bool

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "format": self.kind, "sha256": self.sha256, "qat": self.qat}


def _detect_qat(path: Path, kind: str) -> bool:
    """A QAT model carries fake-quant layers/ops; look for their names without loading the model."""
    try:
        if kind == "saved_model":
            blob = (path / "saved_model.pb").read_bytes()
        elif kind == "keras":
            with zipfile.ZipFile(path) as z:
                blob = z.read("config.json")
        elif kind == "h5":
            blob = path.read_bytes()
        else:
            return False
    except (OSError, KeyError, zipfile.BadZipFile):
        return False
    return any(m in blob for m in _QAT_MARKERS)


def _strip_suffixes(name: str) -> str:
    for suffix in ("_savedmodel", ".savedmodel", "_saved_model", "-savedmodel"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    parts = name.split(".")
    while len(parts) > 1 and (parts[-1] in MODES or parts[-1].startswith("compat-") or parts[-1] == "uint8io"):
        parts.pop()
    return ".".join(parts)


def load_source(model: str | Path) -> ModelSource:
    """Identify a model path; raise one clear ConversionError when it is missing or unsupported."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ConversionError("model not found", file=str(path),
                              hint="pass a SavedModel directory, a .keras/.h5 file or a .tflite")
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ConversionError("directory is not a SavedModel (no saved_model.pb)", file=str(path),
                                  hint="export it with model.export(DIR) or tf.saved_model.save")
        kind = "saved_model"
    else:
        kind = {".keras": "keras", ".h5": "h5", ".hdf5": "h5", ".tflite": "tflite"}.get(path.suffix.lower(), "")
        if not kind:
            raise ConversionError(f"unsupported model file type '{path.suffix or path.name}'", file=str(path),
                                  hint="use a SavedModel directory, .keras, .h5 or .tflite")
    return ModelSource(path, kind, _strip_suffixes(path.name if kind == "saved_model" else path.stem),
                       sha256_path(path), _detect_qat(path, kind))


def artifact_name(name: str, mode: str, io_type: str, compat: dict[str, Any] | None) -> str:
    """Deterministic file name, e.g. digits_cnn.int8.tflite or digits_cnn.dynamic.compat-tflite-runtime-2.14.tflite."""
    parts = [name, mode]
    if mode == "int8" and io_type != "int8":
        parts.append(f"{io_type}io")
    if compat and compat.get("options"):
        parts.append("compat-" + compat["runtime"] + (f"-{compat['version']}" if compat.get("version") else ""))
    return ".".join(parts) + ".tflite"


def log_path(artifact: Path) -> Path:
    """Where TensorFlow's output for one artifact goes: `<out>/logs/<artifact stem>.log`."""
    return artifact.parent / "logs" / (artifact.name.removesuffix(".tflite") + ".log")


@contextlib.contextmanager
def capture_stdout() -> Iterator[list[str]]:
    """Redirect fd 1 to a temp file while TF runs (it prints to the C-level stdout), keeping stdout clean."""
    captured: list[str] = []
    py_out = io.StringIO()
    with _FD_LOCK, tempfile.TemporaryFile(mode="w+b") as tmp:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            with contextlib.redirect_stdout(py_out):   # Python-level prints (Keras) as well as C-level ones
                yield captured
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode(errors="replace") + py_out.getvalue())
            if captured[-1].strip():
                log.debug("captured TF stdout: %s", captured[-1])


def _qat_to_saved_model(src: ModelSource, workdir: Path) -> Path:
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


def _make_converter(src: ModelSource, workdir: Path, progress: Progress, batch: int | None) -> tuple[Any, list[tuple[str, Any, str]]]:
    """A TFLiteConverter for the model plus its input specs (name, shape, dtype)."""
    import tensorflow as tf

    path = src.path
    if src.kind in ("keras", "h5") and src.qat:
        progress("load", "QAT model: re-saving with legacy Keras + tfmot")
        path = _qat_to_saved_model(src, workdir)
    elif src.kind in ("keras", "h5"):
        import keras

        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConversionError(f"cannot load Keras model: {msg[:300]}", file=str(path),
                                  hint="check the file is a complete Keras model saved with model.save()") from None
        path = workdir / "savedmodel"
        model.export(str(path), verbose=False)
    try:
        return _from_saved_model(path, batch)
    except EdgepipeError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"cannot load SavedModel: {msg[:300]}", file=str(src.path)) from None


def _from_saved_model(path: Path, batch: int | None) -> tuple[Any, list[tuple[str, Any, str]]]:
    """Converter from the serving signature; with `batch`, the dynamic batch dimension is fixed first.

    A fixed batch gives static shapes (the Edge TPU needs them) and drops the SHAPE/STRIDED_SLICE/PACK ops
    that a dynamic batch adds around Flatten.
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    sigs = loaded.signatures
    sig = sigs.get("serving_default") if "serving_default" in sigs else next(iter(sigs.values()), None)
    if sig is None:
        raise ConversionError("SavedModel has no signature to convert", file=str(path),
                              hint="export it with model.export(DIR)")
    inputs = sig.structured_input_signature[1]
    specs = [(n, (None if s.shape.rank is None else s.shape.as_list()), s.dtype.name) for n, s in sorted(inputs.items())]
    if batch and len(specs) == 1 and specs[0][1] and specs[0][1][0] is None and None not in specs[0][1][1:]:
        name, shape, _ = specs[0]
        fixed = tf.TensorSpec([batch] + shape[1:], inputs[name].dtype, name=name)
        fn = tf.function(lambda x: sig(**{name: x}), input_signature=[fixed])
        return tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], loaded), specs
    return tf.lite.TFLiteConverter.from_saved_model(str(path)), specs


def _run_conversion(src: ModelSource, r: Recipe, calib: Calibration | None, progress: Progress) -> bytes:
    """The TensorFlow part of a conversion; runs in the quiet worker process (see pipeline.convert.worker)."""
    with tempfile.TemporaryDirectory(prefix="edgepipe-convert-") as tmp:
        progress("load", f"loading {src.kind} model (TensorFlow)")
        converter, specs = _make_converter(src, Path(tmp), progress, r.options.get("input_batch"))
        if calib is not None and r.options.get("representative_dataset"):
            if len(specs) != 1:
                raise ConversionError(f"calibration supports single-input models; this model has {len(specs)} "
                                      "inputs", file=str(src.path))
            name, shape, dtype = specs[0]
            calib.check_input(shape, dtype, name)
        apply_recipe(r, converter, calib.samples if calib is not None else None)
        progress("convert", f"converting to {r.mode}")
        try:
            return bytes(converter.convert())
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConversionError(f"TFLite conversion to {r.mode} failed: {msg[:300]}", file=str(src.path)) from None


def _validate_tflite(path: Path) -> None:
    """A pass-through .tflite must load in a real interpreter, not just parse."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - host without ai-edge-litert
        return
    try:
        Interpreter(model_path=str(path)).allocate_tensors()
    except Exception as exc:
        raise ConversionError(f"the .tflite does not load: {str(exc).splitlines()[0][:300]}", file=str(path)) from None


def _finish(out_path: Path, manifest: dict[str, Any], cached: bool) -> Artifact:
    manifest_path = out_path.with_name(out_path.name[: -len(".tflite")] + ".manifest.json")
    write_manifest(manifest, manifest_path)
    return Artifact(manifest["mode"], out_path, manifest["sha256"], manifest["bytes"], manifest, manifest_path,
                    cached, manifest.get("edgetpu"))


def _passthrough(src: ModelSource, mode: str | None, out_dir: Path, compat: str | None, progress: Progress) -> Artifact:
    info = read_model(src.path)
    detected = detect_mode(info)
    if mode not in (None, "auto", detected):
        raise ConversionError(f"model is already a {detected} .tflite; it cannot be re-converted to {mode}",
                              file=str(src.path), hint="pass the original SavedModel/.keras model instead")
    run_quiet(_validate_tflite, src.path, log=log_path(out_dir / src.path.name), what="loading the .tflite",
              file=str(src.path))
    out_path = out_dir / f"{src.name}.{detected}.tflite"
    if out_path.resolve() != src.path.resolve():
        shutil.copyfile(src.path, out_path)
    edgetpu = _edgetpu(out_path, info, detected, progress)
    compat_rec = None
    if compat:
        runtime, version = parse_compat(compat)
        compat_rec = {"runtime": runtime, "version": version, "options": {}}
    manifest = build_manifest(info, mode=detected, file_name=out_path.name, recipe={"passthrough": True},
                              tf_version=None, source=src.record(), calibration=None, compat=compat_rec,
                              edgetpu=edgetpu)
    if compat_rec:
        check_compat(manifest, compat_rec["runtime"], compat_rec["version"])
    return _finish(out_path, manifest, cached=False)


def _edgetpu(path: Path, info, mode: str, progress: Progress, cache_dir: str | Path | None = None) -> dict[str, Any] | None:
    if mode != "int8":
        return None
    from pipeline.convert.edgetpu import analyze

    progress("edgetpu", "checking Edge TPU mapping")
    return analyze(path, info, cache_dir=cache_dir)


def convert(model: str | Path, mode: str, *, calibration: Any = None, out_dir: str | Path,
            cache_dir: str | Path | None = None, compat: str | None = None, io_type: str = "int8",
            progress: Progress | None = None) -> Artifact:
    """Convert `model` to `mode` in `out_dir`, reusing the cache when (model, recipe, calibration, TF) match."""
    report: Progress = progress or (lambda stage, detail: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = load_source(model)
    if src.kind == "tflite":
        return _passthrough(src, mode, out, compat, report)
    r = make_recipe(mode, io_type=io_type, qat=src.qat, compat=compat)
    calib = None
    if r.needs_calibration:
        if calibration is None:
            raise ConversionError(f"{mode} needs calibration data", file=str(src.path), field="calibration",
                                  hint="pass --calibration DATA.npz (an array named x, shaped like the model input) "
                                       "or a folder of images with preprocess.json")
        calib = load_calibration(calibration)
    tf_ver = tf_version()
    name = artifact_name(src.name, mode, io_type, r.compat)
    out_path = out / name
    key = cache_key(src.sha256, r.key(), calib.sha256 if calib else None, tf_ver)
    cache = ConversionCache(cache_dir) if cache_dir else None
    hit = cache.get(key) if cache else None
    if hit is not None:
        report("cached", name)
        shutil.copyfile(hit.tflite, out_path)
        manifest = dict(hit.manifest, file=name)
        if mode == "int8":  # the compiler may have appeared or gone since: report what holds now
            manifest["edgetpu"] = _edgetpu(out_path, None, mode, report, cache_dir)
        manifest["manifest_sha256"] = manifest_hash(manifest)
        return _finish(out_path, manifest, cached=True)

    data = run_quiet(_run_conversion, src, r, calib, progress=report, log=log_path(out_path),
                     what=f"conversion to {mode}", file=str(src.path))
    if r.options.get("share_vectors"):
        from pipeline.convert.flatbuffer import compact_tflite

        data = compact_tflite(data)
    write_atomic(out_path, data)
    info = read_model(data)
    edgetpu = _edgetpu(out_path, info, mode, report, cache_dir)
    manifest = build_manifest(info, mode=mode, file_name=name, recipe=r.options, tf_version=tf_ver,
                              source=src.record(), calibration=calib.summary() if calib else None, compat=r.compat,
                              edgetpu=edgetpu)
    if r.compat:
        check_compat(manifest, r.compat["runtime"], r.compat["version"])
    if cache:
        cache.put(key, out_path, manifest)
    report("done", name)
    return _finish(out_path, manifest, cached=False)
