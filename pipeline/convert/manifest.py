"""Inspect a .tflite flatbuffer without TensorFlow: tensors, operators with versions, and the artifact manifest.

Operator versions live only in the flatbuffer's operator_codes table (interpreters do not expose them), and
they decide which runtime can load a model, so we read the flatbuffer with the generated schema.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConversionError
from pipeline.files import write_atomic

MANIFEST_VERSION = 1

# TensorType enum of the TFLite schema (stable across versions).
_DTYPES = {
    0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool", 7: "int16",
    8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64", 13: "resource", 14: "variant",
    15: "uint32", 16: "uint16", 17: "int4", 18: "bfloat16",
}
# Manifest keys that are not part of the manifest hash (they depend on where the file was written).
UNHASHED_KEYS = ("manifest_sha256", "path", "cached")


def _schema():
    """The generated TFLite schema module: from ai-edge-litert (no TF), else from TensorFlow."""
    try:
        from ai_edge_litert import schema_py_generated as schema  # type: ignore
    except ImportError:  # pragma: no cover - host without ai-edge-litert
        from tensorflow.lite.python import schema_py_generated as schema  # type: ignore
    return schema


def _builtin_names() -> dict[int, str]:
    ops = _schema().BuiltinOperator
    return {v: k for k, v in vars(ops).items() if not k.startswith("_") and isinstance(v, int)}


@dataclass
class TensorInfo:
    index: int
    name: str
    shape: list[int]
    shape_signature: list[int]
    dtype: str
    scale: list[float]
    zero_point: list[int]
    is_constant: bool
    signature_name: str | None = None   # the model's own name for an input/output (its SignatureDef), if any

    def public(self) -> dict[str, Any]:
        """The manifest form: per-tensor scale/zero_point as scalars when there is one of each."""
        scale: Any = self.scale[0] if len(self.scale) == 1 else (self.scale or None)
        zp: Any = self.zero_point[0] if len(self.zero_point) == 1 else (self.zero_point or None)
        if scale is None:
            scale, zp = 0.0, 0
        return {"name": self.name, "shape": self.shape, "shape_signature": self.shape_signature,
                "dtype": self.dtype, "scale": scale, "zero_point": zp, "signature_name": self.signature_name}


@dataclass
class OpInfo:
    index: int
    name: str
    version: int
    inputs: list[int]
    outputs: list[int]
    fused_activation: str | None = None


@dataclass
class ModelInfo:
    """What a .tflite holds: its tensors and operators in execution order (first subgraph)."""

    sha256: str
    bytes: int
    tensors: list[TensorInfo]
    ops: list[OpInfo]
    inputs: list[int]
    outputs: list[int]
    operator_codes: list[tuple[str, int]] = field(default_factory=list)
    subgraphs: int = 1
    signature_key: str | None = None

    @property
    def custom_ops(self) -> list[str]:
        """Names of the custom operators the model uses (e.g. `edgetpu-custom-op`)."""
        return sorted({n.split(":", 1)[1] for n, _ in self.operator_codes if n.startswith("CUSTOM:")})

    @property
    def input_tensors(self) -> list[TensorInfo]:
        return [self.tensors[i] for i in self.inputs]

    @property
    def output_tensors(self) -> list[TensorInfo]:
        return [self.tensors[i] for i in self.outputs]

    def operators(self) -> list[dict[str, Any]]:
        """Distinct (name, version) pairs with how often each appears, sorted for stable manifests."""
        counts: dict[tuple[str, int], int] = {}
        for op in self.ops:
            counts[(op.name, op.version)] = counts.get((op.name, op.version), 0) + 1
        return [{"name": n, "version": v, "count": c} for (n, v), c in sorted(counts.items())]


def _fused_activation(schema, op, name: str) -> str | None:
    """Fused activation of the ops the Edge TPU rules care about (pools and concatenation)."""
    opts_cls = {"AVERAGE_POOL_2D": "Pool2DOptions", "MAX_POOL_2D": "Pool2DOptions",
                "CONCATENATION": "ConcatenationOptions"}.get(name)
    table = op.BuiltinOptions() if opts_cls else None
    if table is None:
        return None
    opts = getattr(schema, opts_cls)()
    opts.Init(table.Bytes, table.Pos)
    act = opts.FusedActivationFunction()
    names = {v: k for k, v in vars(schema.ActivationFunctionType).items() if isinstance(v, int)}
    return None if act == 0 else names.get(act, str(act))


def read_model(data: bytes | bytearray | Path | str) -> ModelInfo:
    """Parse a .tflite (path or bytes); raise ConversionError when it is not a TFLite flatbuffer."""
    label = None
    if isinstance(data, (str, Path)):
        label = str(data)
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise ConversionError(f"cannot read model: {exc.strerror}", file=label) from None
    buf = bytes(data)
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ConversionError("not a TFLite flatbuffer (missing 'TFL3' identifier)", file=label,
                              hint="pass a SavedModel directory, a .keras/.h5 file or a valid .tflite")
    schema = _schema()
    names = _builtin_names()
    try:
        model = schema.Model.GetRootAs(buf, 0)
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            name = names.get(code, f"BUILTIN_{code}")
            if name == "CUSTOM":
                custom = oc.CustomCode()
                name = f"CUSTOM:{custom.decode() if custom else '?'}"
            codes.append((name, oc.Version() or 1))
        sg = model.Subgraphs(0)
        tensors = []
        for i in range(sg.TensorsLength()):
            t = sg.Tensors(i)
            q = t.Quantization()
            scale = [float(q.Scale(j)) for j in range(q.ScaleLength())] if q else []
            zp = [int(q.ZeroPoint(j)) for j in range(q.ZeroPointLength())] if q else []
            buf_idx = t.Buffer()
            const = False
            if buf_idx > 0 and buf_idx < model.BuffersLength():
                b = model.Buffers(buf_idx)
                const = b.DataLength() > 0 or (b.Size() or 0) > 0
            shape = [int(t.Shape(j)) for j in range(t.ShapeLength())]
            sig = [int(t.ShapeSignature(j)) for j in range(t.ShapeSignatureLength())] or list(shape)
            tensors.append(TensorInfo(i, (t.Name() or b"").decode(), shape, sig, _DTYPES.get(t.Type(), str(t.Type())),
                                      scale, zp, const))
        ops = []
        for i in range(sg.OperatorsLength()):
            op = sg.Operators(i)
            name, version = codes[op.OpcodeIndex()]
            ops.append(OpInfo(i, name, version, [int(op.Inputs(j)) for j in range(op.InputsLength())],
                              [int(op.Outputs(j)) for j in range(op.OutputsLength())],
                              _fused_activation(schema, op, name)))
        inputs = [int(sg.Inputs(j)) for j in range(sg.InputsLength())]
        outputs = [int(sg.Outputs(j)) for j in range(sg.OutputsLength())]
        subgraphs = model.SubgraphsLength()
        signature_key = _signature_names(model, tensors)
    except Exception as exc:  # a truncated/garbled flatbuffer raises anything from struct/IndexError
        raise ConversionError(f"corrupt TFLite flatbuffer ({type(exc).__name__})", file=label,
                              hint="re-export the model") from None
    return ModelInfo(hashlib.sha256(buf).hexdigest(), len(buf), tensors, ops, inputs, outputs, codes, subgraphs,
                     signature_key)


def _signature_names(model: Any, tensors: list[TensorInfo]) -> str | None:
    """Name the first subgraph's inputs/outputs after its SignatureDef (the source model's own names); its key."""
    for i in range(model.SignatureDefsLength()):
        sd = model.SignatureDefs(i)
        if sd.SubgraphIndex() != 0:
            continue
        for n in range(sd.InputsLength()):
            tm = sd.Inputs(n)
            tensors[tm.TensorIndex()].signature_name = (tm.Name() or b"").decode() or None
        for n in range(sd.OutputsLength()):
            tm = sd.Outputs(n)
            tensors[tm.TensorIndex()].signature_name = (tm.Name() or b"").decode() or None
        return (sd.SignatureKey() or b"").decode() or None
    return None


CONVERSION_OPS = ("QUANTIZE", "DEQUANTIZE")   # change a tensor's type; they compute nothing of the model


def activation_dtypes(info: ModelInfo) -> list[str]:
    """Per compute op (QUANTIZE/DEQUANTIZE aside), the type it computes in: that of its first non-constant input
    (an op's state, such as an int8 LSTM's int16 cell, is not what it computes in); its output's when it has none."""
    out = []
    for op in info.ops:
        if op.name in CONVERSION_OPS:
            continue
        first = next((info.tensors[i] for i in op.inputs if i >= 0 and not info.tensors[i].is_constant), None)
        if first is None and op.outputs:
            first = info.tensors[op.outputs[0]]
        if first is not None:
            out.append(first.dtype)
    return out


def detect_mode(info: ModelInfo) -> str:
    """Which recipe produced a .tflite (pass-through models), from its I/O and the types its compute ops work in.

    int16x8 only when the activations are int16 throughout (no op computes in 8 bits), as the 16x8 recipe makes
    them: an int8 model with an int16 tensor inside (an LSTM's cell state, one layer kept at 16 bits) is int8. A
    uint8-quantized model is int8 too (8-bit integer; the Edge TPU runs both). With float compute, the constants
    tell float16 (half-precision weights) from dynamic range (int8 weights) from float32.
    """
    acts = activation_dtypes(info)
    ints8 = sum(d in ("int8", "uint8") for d in acts)
    ints16 = sum(d == "int16" for d in acts)
    floats = sum(d.startswith("float") for d in acts)
    io = {t.dtype for t in info.input_tensors + info.output_tensors}
    if ints16 and not ints8 and ints16 >= floats:
        return "int16x8"
    if ints8 and (ints8 + ints16 >= floats or io & {"int8", "uint8"}):
        return "int8"
    if not acts and io & {"int8", "uint8", "int16"}:
        return "int16x8" if io == {"int16"} else "int8"
    const = {t.dtype for t in info.tensors if t.is_constant}
    if "float16" in const:
        return "float16"
    if const & {"int8", "uint8"}:
        return "dynamic"
    return "float32"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without the keys that depend on where it was written."""
    core = {k: v for k, v in manifest.items() if k not in UNHASHED_KEYS}
    return hashlib.sha256(canonical_json(core).encode()).hexdigest()


def build_manifest(info: ModelInfo, *, mode: str, file_name: str, recipe: dict[str, Any], tf_version: str | None,
                   source: dict[str, Any], calibration: dict[str, Any] | None, compat: dict[str, Any] | None,
                   edgetpu: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest stored next to each artifact; deterministic for the same inputs (no timestamps)."""
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "file": file_name,
        "sha256": info.sha256,
        "bytes": info.bytes,
        "mode": mode,
        "recipe": recipe,
        "tf_version": tf_version,
        "source": source,
        "calibration": calibration,
        "compat": compat,
        "inputs": [t.public() for t in info.input_tensors],
        "outputs": [t.public() for t in info.output_tensors],
        "input_batch": info.input_tensors[0].shape[0] if info.inputs and info.input_tensors[0].shape else None,
        "operators": info.operators(),
        "edgetpu": edgetpu,
    }
    manifest["manifest_sha256"] = manifest_hash(manifest)
    return manifest


def write_manifest(manifest: dict[str, Any], path: Path) -> Path:
    return write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
