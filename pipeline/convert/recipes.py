"""Conversion recipes: one small function per mode, returning the converter settings as plain data.

A recipe is pure data (no TensorFlow), so the cache key and the manifest can be computed before TF is imported;
`apply_recipe` turns it into TFLiteConverter attributes where the conversion really runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.errors import ConversionError
from pipeline.inventory import KIND_DEFAULT_MODE as DEFAULT_MODE_BY_KIND
from pipeline.inventory import MODES

IO_TYPES = ("int8", "uint8")


@dataclass
class Recipe:
    """The converter settings for one mode. `options` is recorded verbatim in the manifest."""

    mode: str
    options: dict[str, Any]
    needs_calibration: bool = False
    compat: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def key(self) -> dict[str, Any]:
        return {"mode": self.mode, "options": self.options, "compat": self.compat}


RecipeFn = Callable[..., Recipe]
RECIPES: dict[str, RecipeFn] = {}


def recipe(mode: str) -> Callable[[RecipeFn], RecipeFn]:
    def register(fn: RecipeFn) -> RecipeFn:
        RECIPES[mode] = fn
        return fn
    return register


@recipe("float32")
def float32(**_: Any) -> Recipe:
    return Recipe("float32", {})


@recipe("dynamic")
def dynamic(**_: Any) -> Recipe:
    return Recipe("dynamic", {"optimizations": ["DEFAULT"]})


@recipe("float16")
def float16(**_: Any) -> Recipe:
    return Recipe("float16", {"optimizations": ["DEFAULT"], "supported_types": ["float16"]})


@recipe("int8")
def int8(*, io_type: str = "int8", qat: bool = False, keep_float: tuple[str, ...] = (),
         int16_layers: tuple[str, ...] = (), **_: Any) -> Recipe:
    # A QAT model carries its own quantization ranges, so it needs no representative dataset.
    # (TFLITE_BUILTINS_INT8 would make TF demand a representative dataset even then.)
    opts: dict[str, Any] = {"optimizations": ["DEFAULT"], "inference_input_type": io_type,
                            "inference_output_type": io_type}
    if int16_layers:   # 16x8 mixed precision: ai-edge-quantizer quantizes the float conversion (convert/mixed.py)
        if qat or keep_float or io_type != "int8":
            raise ConversionError("int16_layers needs a post-training int8 conversion with int8 input/output and no "
                                  "keep_float", field="int16_layers", hint="drop int16_layers, keep_float or io_type")
        return Recipe("int8", {"int16_layers": sorted(set(int16_layers)), "quantizer": "ai-edge-quantizer",
                               "representative_dataset": True}, needs_calibration=True)
    if qat:
        opts["qat"] = True
    else:
        opts["supported_ops"] = ["TFLITE_BUILTINS_INT8"]
        opts["representative_dataset"] = True
    if keep_float:   # selective quantization: these op output tensors stay float (see quantize_selective)
        if qat:
            raise ConversionError("keep_float needs a post-training int8 conversion; a QAT model carries its own "
                                  "quantization", field="keep_float")
        opts["keep_float"] = sorted(set(keep_float))
    return Recipe("int8", opts, needs_calibration=not qat)


@recipe("int16x8")
def int16x8(**_: Any) -> Recipe:
    return Recipe("int16x8", {"optimizations": ["DEFAULT"], "representative_dataset": True,
                              "supported_ops": ["EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8"]},
                  needs_calibration=True)


def make_recipe(mode: str, *, io_type: str = "int8", qat: bool = False, compat: str | None = None,
                keep_float: tuple[str, ...] | list[str] = (), int16_layers: tuple[str, ...] | list[str] = ()
                ) -> Recipe:
    """Pick the recipe for `mode`, then apply the options a declared runtime (`compat`) needs to load it.
    `keep_float` (int8 only) names op output tensors kept in float: selective quantization; `int16_layers` (int8
    only) names ops given 16-bit activations (16x8 mixed precision, through ai-edge-quantizer)."""
    from pipeline.convert.compat import compat_options, parse_compat

    if mode not in RECIPES:
        raise ConversionError(f"unknown mode '{mode}'", field="mode", hint=f"use one of: {', '.join(MODES)}")
    if io_type not in IO_TYPES:
        raise ConversionError(f"unknown io_type '{io_type}'", field="io_type", hint="use int8 or uint8")
    for key, value in (("keep_float", keep_float), ("int16_layers", int16_layers)):
        if value and mode != "int8":
            raise ConversionError(f"{key} applies to mode int8, not {mode}", field=key,
                                  hint=f"set mode: int8, or remove {key}")
    r = RECIPES[mode](io_type=io_type, qat=qat, keep_float=tuple(keep_float), int16_layers=tuple(int16_layers))
    r.options["input_batch"] = 1   # static shapes: what edge runtimes and the Edge TPU want
    r.options["share_vectors"] = True   # lossless: identical quantization vectors stored once (flatbuffer.py)
    if compat:
        runtime, version = parse_compat(compat)
        extra = compat_options(mode, runtime, version)
        r.compat = {"runtime": runtime, "version": version, "options": extra}
        r.options.update(extra)
    return r


def apply_recipe(r: Recipe, converter: Any, representative: Callable[[], Any] | None) -> None:
    """Set TFLiteConverter attributes from a recipe (TF imported lazily by the caller)."""
    import tensorflow as tf

    o = r.options
    if o.get("int16_layers"):   # a float conversion here; convert/mixed.py quantizes it with the calibration data
        if representative is None:
            raise ConversionError(f"{r.mode} needs calibration data", field="calibration",
                                  hint="pass --calibration DATA.npz (array 'x') or an image folder")
        return
    if o.get("optimizations"):
        converter.optimizations = [getattr(tf.lite.Optimize, name) for name in o["optimizations"]]
    if o.get("supported_types"):
        converter.target_spec.supported_types = [getattr(tf, name) for name in o["supported_types"]]
    if o.get("supported_ops"):
        converter.target_spec.supported_ops = [getattr(tf.lite.OpsSet, name) for name in o["supported_ops"]]
    if o.get("inference_input_type"):
        converter.inference_input_type = getattr(tf, o["inference_input_type"])
    if o.get("inference_output_type"):
        converter.inference_output_type = getattr(tf, o["inference_output_type"])
    if o.get("representative_dataset"):
        if representative is None:
            raise ConversionError(f"{r.mode} needs calibration data", field="calibration",
                                  hint="pass --calibration DATA.npz (array 'x') or an image folder")
        converter.representative_dataset = representative
    for name, value in o.items():
        if name.startswith("_experimental") or name.startswith("experimental_"):
            setattr(converter, name, value)
    if o.get("keep_float"):   # calibrate only; quantize_selective quantizes everything but the kept tensors
        converter.experimental_mlir_quantizer = True
        converter._experimental_calibrate_only = True


def quantize_selective(r: Recipe, converter: Any, calibrated: bytes) -> bytes:
    """Quantize a calibrated model to int8 except the ops whose output tensors `keep_float` names (what
    tf.lite.experimental.QuantizationDebugger's `denylisted_nodes` does), with the recipe's int8 input/output."""
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize

    o = r.options
    return bytes(mlir_quantize(calibrated, disable_per_channel=converter._experimental_disable_per_channel,
                               fully_quantize=True, input_data_type=getattr(tf, o["inference_input_type"]),
                               output_data_type=getattr(tf, o["inference_output_type"]),
                               denylisted_nodes=list(o["keep_float"])))


@dataclass
class FormatRequest:
    """One artifact the fleet needs: the targets listed share (mode, compat, io_type)."""

    mode: str
    compat: str | None
    io_type: str
    targets: list[str] = field(default_factory=list)
    keep_float: tuple[str, ...] = ()
    int16_layers: tuple[str, ...] = ()


def plan_formats(targets: Any, probes: dict[str, dict[str, Any]] | None = None) -> list[FormatRequest]:
    """Group targets by the artifact they need; a probed runtime (name -> {runtime, version}) beats the declared one."""
    from pipeline.convert.compat import compat_for

    plan: dict[tuple[str, str | None, str], FormatRequest] = {}
    for t in targets:
        probe = (probes or {}).get(t.name) or {}
        runtime = probe.get("runtime") or getattr(t, "runtime", None)
        version = probe.get("version") if probe.get("runtime") else getattr(t, "runtime_version", None)
        io_type = (getattr(t, "io_type", None) or "int8") if t.mode == "int8" else "int8"
        compat = compat_for(t.mode, runtime, version)
        keep = tuple(sorted(getattr(t, "keep_float", None) or ())) if t.mode == "int8" else ()
        int16 = tuple(sorted(getattr(t, "int16_layers", None) or ())) if t.mode == "int8" else ()
        key = (t.mode, compat, io_type, keep, int16)
        plan.setdefault(key, FormatRequest(t.mode, compat, io_type, keep_float=keep, int16_layers=int16)
                        ).targets.append(t.name)
    return list(plan.values())


def requested_formats(modes: Any = (), kinds: Any = (), fleets: Any = (), *, compat: str | None = None,
                      io_type: str = "int8") -> list[FormatRequest]:
    """The distinct formats asked for, in order: explicit modes, then kinds' defaults, then each fleet's needs
    (`fleets` holds loaded inventories). Requests for the same (mode, compat, io_type) merge their targets."""
    from pipeline.errors import ConfigError

    reqs = [FormatRequest(m, compat, io_type) for m in modes]
    for k in kinds:
        if k not in DEFAULT_MODE_BY_KIND:
            raise ConfigError(f"unknown kind {k!r}", field="--kind", hint=f"use one of: {', '.join(DEFAULT_MODE_BY_KIND)}")
        reqs.append(FormatRequest(DEFAULT_MODE_BY_KIND[k], compat, io_type, [f"kind:{k}"]))
    for inv in fleets:
        reqs.extend(plan_formats(inv.targets))
    if not reqs:
        raise ConfigError("nothing to convert", field="--mode", hint="pass --mode M, --kind K or --targets T.yaml")
    merged: dict[tuple, FormatRequest] = {}
    for r in reqs:
        key = (r.mode, r.compat, r.io_type if r.mode == "int8" else "int8", r.keep_float, r.int16_layers)
        if key in merged:
            merged[key].targets.extend(t for t in r.targets if t not in merged[key].targets)
        else:
            merged[key] = r
    return list(merged.values())
