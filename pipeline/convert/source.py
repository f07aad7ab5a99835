"""The model being released, identified once: its file, content hash, kind and its inputs and outputs by name.

`identify` never imports TensorFlow (a .tflite is read with the flatbuffer reader). `describe` reads the signature of
a SavedModel or Keras model with TensorFlow once per model content and caches it, so a warm run stays TF-free.
The resulting `ModelSource` flows down the stages: api -> run -> convert / reference / store.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from device_agents.agent import EDGETPU_CUSTOM_OP as EDGETPU_OP
from pipeline.convert.loaded import DEFAULT_SIGNATURE, LoadedSignature, first_line, loaded_signature
from pipeline.errors import ConfigError, ConversionError, EdgepipeError
from pipeline.files import sha256_path, write_atomic
from pipeline.inventory import MODES

KINDS = ("saved_model", "keras", "h5", "tflite")
VARIANTS = ("float", "quantized", "edgetpu_compiled")   # what a .tflite source already is
POSTPROCESS_OP = b"TFLite_Detection_PostProcess"   # a composite the converter turns into this custom op
DESCRIBE_VERSION = 3
_QAT_MARKERS = (b"QuantizeWrapper", b"QuantizeLayer", b"FakeQuantWithMinMaxVars")
Progress = Callable[[str, str], None]


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: its name, shape with the batch first (None = dynamic) and dtype.

    `name` is the model's own name (signature argument / output key, else the TFLite tensor name); `aliases` are
    the other names users may use for it (Keras input name, TFLite tensor name).
    """

    name: str
    shape: tuple[int | None, ...] | None
    dtype: str
    aliases: tuple[str, ...] = ()
    tflite_name: str | None = None
    scale: float = 0.0
    zero_point: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,) + tuple(a for a in self.aliases if a != self.name)

    def shape_text(self) -> str:
        return "(" + ", ".join("None" if d is None else str(d) for d in (self.shape or ())) + ")"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype,
                "aliases": list(self.aliases), "tflite_name": self.tflite_name, "scale": self.scale,
                "zero_point": self.zero_point}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], None if d.get("shape") is None else tuple(d["shape"]), d["dtype"],
                   tuple(d.get("aliases") or ()), d.get("tflite_name"), float(d.get("scale") or 0.0),
                   int(d.get("zero_point") or 0))


@dataclass
class ModelSource:
    """A model on disk identified by content; `described` once its inputs/outputs are known."""

    path: Path
    kind: str                      # saved_model | keras | h5 | tflite
    name: str
    sha256: str
    qat: bool = False
    variant: str | None = None     # tflite only: float | quantized | edgetpu_compiled
    signature: str | None = None   # SavedModel signature key (None = serving_default)
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    overrides: dict[str, list[int]] = field(default_factory=dict)   # --input-shape, by input name
    notes: list[str] = field(default_factory=list)   # what the shape resolution decided (e.g. a batch kept)

    @property
    def described(self) -> bool:
        return self.inputs is not None and self.outputs is not None

    @property
    def runs_on_host(self) -> bool:
        """Whether the host can compute float outputs of this model itself."""
        return self.kind != "tflite" or self.variant == "float"

    def record(self) -> dict[str, Any]:
        """The manifest's source record."""
        rec: dict[str, Any] = {"name": self.name, "format": self.kind, "sha256": self.sha256, "qat": self.qat}
        if self.variant:
            rec["variant"] = self.variant
        if self.signature:
            rec["signature"] = self.signature
        return rec

    def input(self, name: str) -> TensorSpec | None:
        return _find(self.inputs or [], name)

    def output(self, name: str) -> TensorSpec | None:
        return _find(self.outputs or [], name)


def _find(specs: Iterable[TensorSpec], name: str) -> TensorSpec | None:
    for s in specs:
        if name in s.names:
            return s
    return None


# ---------------------------------------------------------------- identify (no TensorFlow)

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
    for suffix in ("_savedmodel", ".savedmodel", "_saved_model", "-savedmodel", "_edgetpu"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    parts = name.split(".")
    while len(parts) > 1 and (parts[-1] in MODES or parts[-1].startswith("compat-") or parts[-1] == "uint8io"):
        parts.pop()
    return ".".join(parts)


def tflite_specs(info: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a parsed .tflite (manifest.ModelInfo), named after its SignatureDef when it has one."""

    def spec(t: Any) -> TensorSpec:
        name = t.signature_name or t.name
        sig = t.shape_signature or t.shape
        shape = tuple(None if d < 0 else int(d) for d in sig)
        return TensorSpec(name, shape, t.dtype, tuple(n for n in (t.name,) if n != name), t.name,
                          t.scale[0] if len(t.scale) == 1 else 0.0, t.zero_point[0] if len(t.zero_point) == 1 else 0)

    return [spec(t) for t in info.input_tensors], [spec(t) for t in info.output_tensors]


def specs_from_manifest(manifest: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An artifact's inputs and outputs from its manifest (TFLite tensor names, with their signature names)."""

    def spec(t: dict[str, Any]) -> TensorSpec:
        scale, zp = t.get("scale"), t.get("zero_point")
        return TensorSpec(t["name"], tuple(t["shape"]), t["dtype"],
                          tuple(n for n in (t.get("signature_name"),) if n and n != t["name"]), t["name"],
                          float(scale) if isinstance(scale, (int, float)) else 0.0,
                          int(zp) if isinstance(zp, int) else 0)

    return [spec(t) for t in manifest.get("inputs", [])], [spec(t) for t in manifest.get("outputs", [])]


def tflite_variant(info: Any) -> str:
    """float | quantized | edgetpu_compiled, from the operators and tensor types of a parsed .tflite."""
    from pipeline.convert.manifest import detect_mode

    if EDGETPU_OP in info.custom_ops:
        return "edgetpu_compiled"
    return "float" if detect_mode(info) == "float32" else "quantized"


def identify(model: str | Path | ModelSource, *, signature: str | None = None) -> ModelSource:
    """Identify a model path once (kind, content hash; a .tflite's variant and tensors); one clear error if unusable."""
    if isinstance(model, ModelSource):
        return model
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
    if signature and kind != "saved_model":
        raise ConfigError(f"--signature {signature} applies to a SavedModel directory, not a {kind} file",
                          file=str(path), field="--signature", hint="drop --signature")
    src = ModelSource(path, kind, _strip_suffixes(path.name if kind == "saved_model" else path.stem),
                      sha256_path(path), _detect_qat(path, kind), signature=signature)
    if kind == "tflite":
        from pipeline.convert.manifest import read_model

        info = read_model(path)
        src.variant = tflite_variant(info)
        src.inputs, src.outputs = tflite_specs(info)
    return src


# ---------------------------------------------------------------- describe (TensorFlow, cached)

def _shape(ts: Any) -> tuple[int | None, ...] | None:
    return None if ts.shape.rank is None else tuple(None if d is None else int(d) for d in ts.shape.as_list())


def signature_specs(sig: LoadedSignature) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (signature arguments, Keras shapes where declared) and outputs (signature keys) of a signature."""
    args = sig.fn.structured_input_signature[1]
    # the converter traces a concrete function, so the artifact will name input `x` `serving_default_x:0`
    inputs = [TensorSpec(n, sig.declared.get(n) or _shape(s), s.dtype.name, (f"{DEFAULT_SIGNATURE}_{n}:0",))
              for n, s in sorted(args.items())]
    outs = sig.fn.structured_outputs
    outputs = [TensorSpec(n, _shape(s), s.dtype.name) for n, s in sorted(outs.items())]
    return inputs, outputs


def ends_in_postprocess(src: ModelSource) -> bool:
    """A SavedModel whose graph holds the TFLite_Detection_PostProcess composite: TensorFlow runs only its
    placeholders, so its real outputs exist only in the converted .tflite."""
    return src.kind == "saved_model" and POSTPROCESS_OP in (src.path / "saved_model.pb").read_bytes()


def static_converter(sig: LoadedSignature, inputs: list[TensorSpec]) -> Any:
    """A TFLiteConverter for the signature with every input shape fixed (static shapes: what edge runtimes and the
    Edge TPU want; a fixed batch also drops the SHAPE/STRIDED_SLICE/PACK ops a dynamic batch adds)."""
    import tensorflow as tf

    args = sig.fn.structured_input_signature[1]
    names = [s.name for s in inputs]
    fixed = [tf.TensorSpec(list(s.shape), args[s.name].dtype, name=s.name) for s in inputs]
    fn = tf.function(lambda *a: sig.fn(**dict(zip(names, a))), input_signature=fixed)
    return tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], sig.loaded)


def float_tflite(sig: LoadedSignature, inputs: Sequence[TensorSpec], path: Path) -> Path:
    """The signature converted to a float32 .tflite at `path` (batch 1 where the batch is dynamic)."""
    fixed = [replace(s, shape=tuple(1 if d is None and i == 0 else d for i, d in enumerate(s.shape or ())))
             for s in inputs]
    path.write_bytes(static_converter(sig, fixed).convert())
    return path


def _postprocess_outputs(sig: LoadedSignature, inputs: list[TensorSpec], outputs: list[TensorSpec],
                         workdir: Path) -> list[TensorSpec]:
    """The outputs with their TFLite tensor names (`NAME:k`: output k of the op, which tells boxes, classes,
    scores and count apart) and shapes, read from a float32 conversion."""
    from pipeline.convert.manifest import read_model

    info = read_model(float_tflite(sig, inputs, workdir / "float32.tflite"))
    by_key = {t.signature_name: t for t in info.output_tensors}
    return [replace(o, tflite_name=by_key[o.name].name, shape=tuple(by_key[o.name].shape)) if o.name in by_key else o
            for o in outputs]


def _describe_key(src: ModelSource, tf: str | None) -> str:
    blob = json.dumps({"v": DESCRIBE_VERSION, "sha256": src.sha256, "kind": src.kind, "qat": src.qat,
                       "signature": src.signature or DEFAULT_SIGNATURE, "tf": tf}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _describe_tf(src: ModelSource) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The TensorFlow part of `describe`; runs in the quiet worker process (see pipeline.convert.worker)."""
    with tempfile.TemporaryDirectory(prefix="edgepipe-describe-") as tmp:
        try:
            sig = loaded_signature(src)   # kept loaded for the conversions that follow
            inputs, outputs = signature_specs(sig)
            if ends_in_postprocess(src):
                outputs = _postprocess_outputs(sig, inputs, outputs, Path(tmp))
            return inputs, outputs
        except EdgepipeError:
            raise
        except Exception as exc:
            raise ConversionError(f"cannot read the model's signature: {first_line(exc)}", file=str(src.path)) from None


def describe(src: ModelSource, *, cache_dir: str | Path | None = None, progress: Progress | None = None) -> ModelSource:
    """`src` with its inputs and outputs (TensorFlow reads a SavedModel/Keras signature once; cached by content,
    and reused without TensorFlow on a host that has none: see pipeline.convert.cache)."""
    from pipeline.convert.cache import ANY_TF, require_tensorflow, tf_version

    if src.described:
        return src
    tf = tf_version()
    models = Path(cache_dir).expanduser() / "models" if cache_dir else None
    cached = models / f"{_describe_key(src, tf if tf is not None else ANY_TF)}.json" if models else None
    if cached is not None and cached.exists():
        try:
            doc = json.loads(cached.read_text())
            return replace(src, inputs=[TensorSpec.from_dict(d) for d in doc["inputs"]],
                           outputs=[TensorSpec.from_dict(d) for d in doc["outputs"]])
        except (OSError, ValueError, KeyError, TypeError):
            pass   # a torn cache entry is a miss
    from pipeline.convert.worker import run_quiet

    require_tensorflow(f"reading the {src.kind} model's signature", file=str(src.path))
    (progress or (lambda s, d: None))("load", f"reading the {src.kind} model's signature (TensorFlow)")
    log = Path(tempfile.gettempdir()) / f"edgepipe-{os.getuid()}" / f"describe-{src.name}.log"
    inputs, outputs = run_quiet(_describe_tf, src, log=log, what="reading the model's signature", file=str(src.path))
    if models is not None:
        doc = json.dumps({"inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs]},
                         indent=1)
        write_atomic(models / f"{_describe_key(src, tf)}.json", doc)
        write_atomic(models / f"{_describe_key(src, ANY_TF)}.json", doc)
    return replace(src, inputs=inputs, outputs=outputs)


# ---------------------------------------------------------------- shapes: batch and dynamic dimensions

def parse_input_shapes(items: Sequence[str] | dict[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """`NAME=1x224x224x3` items (the --input-shape flag) -> {name: [1, 224, 224, 3]}."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): [int(d) for d in v] for k, v in items.items()}
    out: dict[str, list[int]] = {}
    for item in items:
        name, sep, dims = str(item).partition("=")
        if not sep:   # a single-input model may omit the name
            name, dims = "", name
        try:
            shape = [int(d) for d in re.split(r"[x,]", dims.strip().lower()) if d]
        except ValueError:
            shape = []
        if not shape or any(d < 1 for d in shape):
            raise ConfigError(f"cannot read input shape {item!r}", field="--input-shape",
                              hint="write NAME=1x224x224x3 (batch first, every dimension a positive integer)")
        out[name.strip()] = shape
    return out


def with_shapes(src: ModelSource, overrides: dict[str, Sequence[int]] | None = None) -> ModelSource:
    """`src` with every input shape static: a dynamic batch becomes 1, a fixed batch is kept (with a note), and
    other dynamic dimensions come from `overrides` (--input-shape) or are one ConfigError naming the input."""
    if not src.described:
        raise ValueError("describe() the model first")
    overrides = dict(overrides or {})
    if "" in overrides:
        if len(src.inputs) != 1:
            raise ConfigError("--input-shape without a name needs a single-input model", field="--input-shape",
                              hint="name the input: " + ", ".join(f"{s.name}=..." for s in src.inputs))
        overrides[src.inputs[0].name] = overrides.pop("")
    for name in overrides:
        if src.input(name) is None:
            raise ConfigError(f"--input-shape names an unknown input {name!r}", file=str(src.path),
                              field="--input-shape", hint="the model's inputs are: " + ", ".join(
                                  f"{s.name} {s.shape_text()}" for s in src.inputs))
    if overrides and src.kind == "tflite":
        raise ConfigError("--input-shape applies to a SavedModel or Keras model; a .tflite's shapes are fixed",
                          file=str(src.path), field="--input-shape", hint="drop --input-shape or pass the source model")
    inputs, notes, fixed = [], [], {}
    for spec in src.inputs:
        want = next((list(v) for k, v in overrides.items() if k in spec.names), None)
        if want is not None:
            fixed[spec.name] = want
        declared = list(spec.shape) if spec.shape is not None else None
        if want is not None:
            if declared is not None and (len(want) != len(declared) or any(
                    d is not None and d != w for d, w in zip(declared, want))):
                raise ConfigError(f"--input-shape {spec.name}={'x'.join(map(str, want))} does not fit the input's "
                                  f"shape {spec.shape_text()}", file=str(src.path), field="--input-shape",
                                  hint="only dynamic (None) dimensions can be set")
            shape = want
        elif declared is None:
            raise ConfigError(f"input '{spec.name}' has an unknown rank", file=str(src.path), field="--input-shape",
                              hint=f"pass --input-shape {spec.name}=1x...")
        else:
            shape = [1 if (i == 0 and d is None) else d for i, d in enumerate(declared)]
            if None in shape:
                letters = iter("HWDEFG")
                example = "x".join(next(letters, "K") if d is None else str(d) for d in shape)
                raise ConfigError(f"input '{spec.name}' has dynamic dimensions {spec.shape_text()}; the edge "
                                  "runtimes need static shapes", file=str(src.path), field="--input-shape",
                                  hint=f"pass --input-shape {spec.name}={example} with the size to deploy")
        if shape and shape[0] > 1 and want is None:
            notes.append(f"input '{spec.name}' has a fixed batch of {shape[0]}: kept (each invoke runs {shape[0]} "
                         "samples, latency is per batch)")
        inputs.append(replace(spec, shape=tuple(shape)))
    return replace(src, inputs=inputs, notes=notes, overrides=fixed)


def input_shapes(src: ModelSource) -> dict[str, list[int]]:
    """{input name: static shape} of a source resolved by `with_shapes`."""
    return {s.name: list(s.shape or ()) for s in src.inputs or []}


# ---------------------------------------------------------------- matching names across models

def match_specs(want: Sequence[TensorSpec], have: Sequence[TensorSpec], *, what: str, file: str | None = None
                ) -> dict[str, str]:
    """{want name: have name}: by a shared name or alias, then by a unique per-sample shape, then by position.

    Used to line up a reference model's tensors, or an artifact's, with the released model's.
    """
    out: dict[str, str] = {}
    free = list(have)
    for w in want:
        hit = next((h for h in free if set(w.names) & set(h.names)), None)
        if hit is not None:
            out[w.name] = hit.name
            free.remove(hit)
    rest = [w for w in want if w.name not in out]

    def per_sample(s: TensorSpec) -> tuple:
        return tuple(s.shape[1:]) if s.shape else ()

    for w in list(rest):
        same = [h for h in free if per_sample(h) == per_sample(w)]
        if len(same) == 1 and sum(per_sample(o) == per_sample(w) for o in rest) == 1:
            out[w.name] = same[0].name
            free.remove(same[0])
            rest.remove(w)
    if rest and len(rest) == len(free):
        for w, h in zip(rest, free):
            out[w.name] = h.name
        rest = []
    if rest:
        raise ConfigError(f"cannot match {what} " + ", ".join(repr(w.name) for w in rest) + " (candidates: "
                          + (", ".join(repr(h.name) for h in free) or "none") + ")", file=file,
                          hint="give the tensors the same names in both models")
    return out
