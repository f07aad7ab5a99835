"""Lossless re-serialization of a .tflite that stores identical small vectors once.

TF's writer gives every per-channel quantized tensor its own scale and int64 zero-point vectors (weights and
biases alike, mostly all zeros): about 10% of an int8 MobileNetV2. FlatBuffers lets tables share a vector, so
we re-pack the model with one copy of each distinct vector. Weights are untouched and stay 16-byte aligned.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

log = logging.getLogger(__name__)
_BIG_BYTES = 16   # uint8 vectors at least this long are buffer data: aligned to 16 and never shared


def _builder_class() -> Any:
    import flatbuffers

    class SharingBuilder(flatbuffers.Builder):
        """A Builder whose CreateNumpyVector returns the earlier offset for a vector it has already written."""

        def __init__(self, size: int) -> None:
            super().__init__(size)
            self._seen: dict[tuple, int] = {}
            self._align16 = False

        def StartVector(self, elemSize, numElems, alignment):  # noqa: N802 - flatbuffers API
            if self._align16:
                alignment, self._align16 = 16, False
            return super().StartVector(elemSize, numElems, alignment)

        def CreateNumpyVector(self, x):  # noqa: N802 - flatbuffers API
            if x.dtype.itemsize == 1 and x.size >= _BIG_BYTES:
                self._align16 = True
                return super().CreateNumpyVector(x)
            key = (x.dtype.str, x.size, hashlib.blake2b(x.tobytes(), digest_size=16).digest())
            off = self._seen.get(key)
            if off is None:
                off = self._seen[key] = super().CreateNumpyVector(x)
            return off

    return SharingBuilder


def _has_external_buffers(model: Any) -> bool:
    return any((b.offset or 0) > 1 for b in model.buffers or [])


def inline_buffers(data: bytes) -> bytes:
    """The same model with every buffer inside the flatbuffer. Some writers (ai-edge-quantizer) store tensor data
    after the flatbuffer and point at it by offset; older runtimes and re-packing would lose it."""
    from pipeline.convert.manifest import _schema

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    if not _has_external_buffers(model):
        return data
    import numpy as np

    for b in model.buffers:
        if (b.offset or 0) > 1:
            b.data = np.frombuffer(data[b.offset:b.offset + b.size], dtype=np.uint8)
            b.offset = b.size = 0
    builder = _builder_class()(len(data))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def compact_tflite(data: bytes) -> bytes:
    """The same model with shared vectors; returns `data` unchanged if re-packing fails or does not help."""
    from pipeline.convert.manifest import _schema

    schema = _schema()
    try:
        model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
        if _has_external_buffers(model):   # data after the flatbuffer: re-packing would drop it
            return data
        builder = _builder_class()(len(data))
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        out = bytes(builder.Output())
    except Exception as exc:  # never fail a conversion over an optional size optimisation
        log.warning("could not compact the .tflite (%s); keeping TF's serialization", exc)
        return data
    return out if len(out) < len(data) else data
