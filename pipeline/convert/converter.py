"""The conversion entry point: one model + one mode -> a .tflite artifact with its manifest (cached).

TensorFlow is imported only when a conversion really runs; a cache hit or a .tflite pass-through never imports it.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.convert.cache import ANY_TF, ConversionCache, cache_key, require_tensorflow, tf_version
from pipeline.convert.calibration import Calibration, load_calibration
from pipeline.convert.compat import check_compat, parse_compat
from pipeline.convert.manifest import build_manifest, detect_mode, manifest_hash, read_model, write_manifest
from pipeline.convert.recipes import (FormatRequest, Recipe, apply_recipe, make_recipe, plan_formats,
                                      quantize_selective)
from pipeline.convert.source import (ModelSource, first_line, describe, identify, parse_input_shapes, signature_specs,
                                     static_converter, with_shapes)
from pipeline.convert.worker import run_quiet
from pipeline.errors import ConversionError, EdgepipeError
from pipeline.files import write_atomic

__all__ = ["Artifact", "FormatRequest", "ModelSource", "convert", "identify", "load_source", "plan_formats"]

log = logging.getLogger(__name__)
Progress = Callable[[str, str], None]
_FD_LOCK = threading.Lock()


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


def load_source(model: str | Path | ModelSource, *, signature: str | None = None) -> ModelSource:
    """Identify a model once (see `pipeline.convert.source.identify`); kept as the converter's entry name."""
    return identify(model, signature=signature)


def artifact_name(name: str, mode: str, io_type: str, compat: dict[str, Any] | None,
                  keep_float: list[str] | tuple[str, ...] = (), int16_layers: list[str] | tuple[str, ...] = ()) -> str:
    """Deterministic file name, e.g. digits_cnn.int8.tflite or digits_cnn.dynamic.compat-tflite-runtime-2.14.tflite;
    an int8 model with layers kept in float is digits_cnn.int8.keepfloat2-<hash>.tflite, with layers at 16-bit
    activations digits_cnn.int8.int16x2-<hash>.tflite."""
    import hashlib

    parts = [name, mode]
    if mode == "int8" and io_type != "int8":
        parts.append(f"{io_type}io")
    for label, layers in (("keepfloat", keep_float), ("int16x", int16_layers)):
        if layers:
            digest = hashlib.sha256("\n".join(sorted(layers)).encode()).hexdigest()[:8]
            parts.append(f"{label}{len(layers)}-{digest}")
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


def with_source_options(r: Recipe, src: ModelSource) -> Recipe:
    """The source's fixed input shapes and chosen signature as recipe options, so the cache key sees them."""
    if src.overrides:
        r.options["input_shapes"] = {k: list(v) for k, v in sorted(src.overrides.items())}
    if src.signature:
        r.options["signature"] = src.signature
    return r


def prepared_converter(src: ModelSource, r: Recipe, calib: Calibration | None, progress: Progress) -> Any:
    """A TFLiteConverter for `src` with its input shapes fixed and recipe `r` applied (TF imported here); the
    model stays loaded in this process for the next conversion of it (convert/loaded.py)."""
    from pipeline.convert.loaded import loaded_signature

    progress("load", f"loading {src.kind} model (TensorFlow)")
    sig = loaded_signature(src, progress)
    if not src.described:
        ins, outs = signature_specs(sig)
        src = with_shapes(replace(src, inputs=ins, outputs=outs), r.options.get("input_shapes"))
    try:
        converter = static_converter(sig, src.inputs)
    except EdgepipeError:
        raise
    except Exception as exc:
        raise ConversionError(f"cannot trace the model at input shapes "
                              f"{', '.join(f'{s.name} {s.shape_text()}' for s in src.inputs)}: "
                              f"{first_line(exc)}", file=str(src.path)) from None
    representative = None
    if calib is not None and r.options.get("representative_dataset"):
        calib = calib.bind(src.inputs)
        batch = {s.name: int(s.shape[0]) for s in src.inputs}
        representative = lambda: calib.samples(batch)   # noqa: E731 - TF wants a zero-argument callable
    apply_recipe(r, converter, representative)
    converter._edgepipe_keepalive = sig   # the loaded model must live as long as the converter
    return converter


def _run_conversion(src: ModelSource, r: Recipe, calib: Calibration | None, progress: Progress) -> bytes:
    """Load the model's signature, fix its input shapes, apply the recipe, convert; returns the .tflite bytes.

    The TensorFlow part of a conversion; runs in the quiet worker process (see pipeline.convert.worker)."""
    converter = prepared_converter(src, r, calib, progress)
    kept, int16 = r.options.get("keep_float"), r.options.get("int16_layers")
    progress("convert", f"converting to {r.mode}" + (f" ({len(kept)} layer(s) kept in float)" if kept else "")
             + (f" ({len(int16)} layer(s) at 16-bit activations, ai-edge-quantizer)" if int16 else ""))
    try:
        data = bytes(converter.convert())
        if int16:
            from pipeline.convert.mixed import quantize_mixed

            batch = {s.name: int(s.shape[0]) for s in src.inputs}
            return quantize_mixed(data, calib.bind(src.inputs).samples(batch), int16)
        return quantize_selective(r, converter, data) if kept else data
    except EdgepipeError as exc:
        exc.file = exc.file or str(src.path)
        raise
    except Exception as exc:
        raise ConversionError(f"TFLite conversion to {r.mode} failed: {first_line(exc)}", file=str(src.path)) from None


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
    """A .tflite source ships as it is (TFLiteConverter cannot re-quantize a .tflite); its manifest says what it is."""
    info = read_model(src.path)
    detected = detect_mode(info)
    if mode not in (None, "auto", detected):
        raise ConversionError(f"model is already a {detected} .tflite; it cannot be re-converted to {mode} "
                              "(TFLiteConverter converts TensorFlow models, never a .tflite)", file=str(src.path),
                              hint=f"pass the original SavedModel/.keras model, or use mode {detected}")
    compiled = src.variant == "edgetpu_compiled"
    if not compiled:   # an Edge TPU model never runs on the host: its custom op exists only in libedgetpu
        run_quiet(_validate_tflite, src.path, log=log_path(out_dir / src.path.name), what="loading the .tflite",
                  file=str(src.path))
    out_path = out_dir / (src.path.name if compiled else f"{src.name}.{detected}.tflite")
    if out_path.resolve() != src.path.resolve():
        shutil.copyfile(src.path, out_path)
    edgetpu = None if compiled else _edgetpu(out_path, info, detected, progress)
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


def convert(model: str | Path | ModelSource, mode: str | None, *, calibration: Any = None, out_dir: str | Path,
            cache_dir: str | Path | None = None, compat: str | None = None, io_type: str = "int8",
            progress: Progress | None = None, signature: str | None = None, input_shapes: Any = None,
            preprocess: Any = None, keep_float: tuple[str, ...] | list[str] = (),
            int16_layers: tuple[str, ...] | list[str] = ()) -> Artifact:
    """Convert `model` to `mode` in `out_dir`, reusing the cache when (model, recipe, calibration, TF) match.

    `model` may be a path or the ModelSource identified once by the caller; a .tflite passes through as it is
    (`mode` None accepts whatever it is). `input_shapes` ({name: shape} or NAME=1x..x.. items) fixes dynamic
    dimensions; `preprocess` applies to an image-folder calibration; `keep_float` (int8) names op output tensors
    kept in float (selective quantization, recorded in the recipe, so cached and reproducible); `int16_layers` (int8)
    names ops computed with int16 activations (16x8 mixed precision through ai-edge-quantizer, recorded alike).
    """
    report: Progress = progress or (lambda stage, detail: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = identify(model, signature=signature)
    if src.kind == "tflite":
        return _passthrough(src, mode, out, compat, report)
    if mode is None:
        raise ConversionError("no mode given for converting a TensorFlow model", field="mode")
    overrides = {**src.overrides, **parse_input_shapes(input_shapes)}
    src = with_shapes(describe(src, cache_dir=cache_dir, progress=report), overrides)
    for note in src.notes:
        report("notice", note)
    r = with_source_options(make_recipe(mode, io_type=io_type, qat=src.qat, compat=compat, keep_float=keep_float,
                                        int16_layers=int16_layers), src)
    if r.options.get("int16_layers"):
        from pipeline.convert.mixed import quantizer_version

        r.options["quantizer_version"] = quantizer_version()   # in the cache key: another quantizer, another file
    calib = None
    if r.needs_calibration:
        if calibration is None:
            raise ConversionError(f"{mode} needs calibration data", file=str(src.path), field="calibration",
                                  hint="pass --calibration DATA.npz (one array per model input, x for one) "
                                       "or a folder of images with preprocessing")
        calib = load_calibration(calibration, preprocess=preprocess, inputs=src.inputs)
        for warning in calib.warnings:
            report("warning", warning)
    tf_ver = tf_version()
    name = artifact_name(src.name, mode, io_type, r.compat, r.options.get("keep_float") or (),
                         r.options.get("int16_layers") or ())
    out_path = out / name
    key = cache_key(src.sha256, r.key(), calib.sha256 if calib else None, tf_ver)
    any_key = cache_key(src.sha256, r.key(), calib.sha256 if calib else None, ANY_TF)
    cache = ConversionCache(cache_dir) if cache_dir else None
    hit = (cache.get(key) if tf_ver is not None else cache.get_any(any_key)) if cache else None
    if hit is not None:
        report("cached", name)
        shutil.copyfile(hit.tflite, out_path)
        manifest = dict(hit.manifest, file=name)
        if mode == "int8":  # the compiler may have appeared or gone since: report what holds now
            manifest["edgetpu"] = _edgetpu(out_path, None, mode, report, cache_dir)
        manifest["manifest_sha256"] = manifest_hash(manifest)
        return _finish(out_path, manifest, cached=True)

    require_tensorflow(f"converting {src.path.name} to {mode}", file=str(src.path))
    data = run_quiet(_run_conversion, src, r, calib, progress=report, log=log_path(out_path),
                     what=f"conversion to {mode}", file=str(src.path))
    if r.options.get("share_vectors"):
        from pipeline.convert.flatbuffer import compact_tflite

        data = compact_tflite(data)
    write_atomic(out_path, data)
    info = read_model(data)
    edgetpu = _edgetpu(out_path, info, mode, report, cache_dir)
    batch = info.input_tensors[0].shape[0] if info.inputs and info.input_tensors[0].shape else None
    manifest = build_manifest(info, mode=mode, file_name=name, recipe=dict(r.options, input_batch=batch),
                              tf_version=tf_ver, source=src.record(), calibration=calib.summary() if calib else None,
                              compat=r.compat, edgetpu=edgetpu)
    if r.compat:
        check_compat(manifest, r.compat["runtime"], r.compat["version"])
    if cache:
        cache.put(key, out_path, manifest, any_key=any_key)
    report("done", name)
    return _finish(out_path, manifest, cached=False)
