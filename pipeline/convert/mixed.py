"""16x8 mixed precision: an int8 model whose named ops compute with int16 activations (int8 weights), through
ai-edge-quantizer recipes. It is the CPU's second way to save a layer int8 hurts, beside keeping it in float: an
activation outlier that widens an 8-bit range by 1000x still leaves 16-bit steps fine enough.

ai-edge-quantizer quantizes a float .tflite (not a TensorFlow model), so the conversion converts to float first and
quantizes that here, in the quiet worker. It is imported only when such an artifact is really converted.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from pipeline.errors import ConversionError

QUANTIZER = "ai-edge-quantizer"


def scope_regex(name: str) -> str:
    """The ai-edge-quantizer scope of the op whose (one) output tensor is `name`: the name and a trailing ';'."""
    return "^" + re.escape(name) + ";$"


def quantizer_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(QUANTIZER)
    except PackageNotFoundError:
        return None


def quantize_mixed(float_model: bytes, samples: Iterable[Any], int16_layers: list[str] | tuple[str, ...]) -> bytes:
    """`float_model` quantized to int8 (weights and activations, int8 input and output) except the ops whose output
    tensors `int16_layers` names, which compute with int16 activations. `samples` yields one calibration step per
    item: a list with the single input's batch, or {input name: batch} (what `Calibration.samples` yields)."""
    try:
        from ai_edge_quantizer import qtyping, quantizer
    except ImportError:
        raise ConversionError("16x8 mixed precision needs ai-edge-quantizer on the host",
                              hint="pip install 'edgepipe[tensorflow]' (the conversion extra installs it)") from None
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.convert.manifest import read_model

    missing = missing_layers(read_model(float_model), int16_layers)
    if missing:
        raise ConversionError(f"int16_layers names no op of this model: {missing[0]!r}", field="int16_layers",
                              hint="take the names from `edgepipe optimize` of this very model")
    signatures = Interpreter(model_content=float_model).get_signature_list()
    if len(signatures) != 1:
        raise ConversionError(f"16x8 mixed precision needs a model with one signature, not {len(signatures)}")
    key, names = next(iter(signatures.items()))
    data = []
    for step in samples:
        feed = step if isinstance(step, dict) else dict(zip(names["inputs"], step))
        data.append({k: feed[k] for k in names["inputs"]})
    qt = quantizer.Quantizer(bytearray(float_model))
    every = qtyping.TFLOperationName.ALL_SUPPORTED
    qt.add_static_config(regex=".*", operation_name=every, activation_num_bits=8, weight_num_bits=8)
    for name in int16_layers:   # the latest matching rule wins: these ops get int16 activations
        qt.add_static_config(regex=scope_regex(name), operation_name=every, activation_num_bits=16,
                             weight_num_bits=8)
    try:
        result = qt.quantize(qt.calibrate({key: data}), enable_progress_report=False)
    except (ValueError, RuntimeError) as exc:
        raise ConversionError(f"ai-edge-quantizer could not quantize the model: {str(exc).splitlines()[0][:240]}",
                              field="int16_layers") from None
    from pipeline.convert.flatbuffer import inline_buffers

    return inline_buffers(bytes(result.quantized_model))   # its tensor data after the flatbuffer, moved inside


def missing_layers(model: Any, int16_layers: Iterable[str]) -> list[str]:
    """The names in `int16_layers` that are no op's output in `model` (a manifest.ModelInfo): a stale recipe."""
    outputs = {model.tensors[o].name for op in model.ops for o in op.outputs}
    return [n for n in int16_layers if n not in outputs]
