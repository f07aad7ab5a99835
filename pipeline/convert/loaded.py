"""Models kept loaded in the quiet worker between calls. Loading a Keras model (load it, export a SavedModel, load
that) costs about as much as converting it, and one `edgepipe optimize` converts a model up to ten times, ranks its
layers and computes its float reference: each of those reuses the loaded signature instead of loading again.

Keyed by the model's content hash (and kind, QAT flag and signature), so an edited model is loaded afresh; the
SavedModel a Keras model was exported to lives as long as its entry.
"""
from __future__ import annotations

import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

KEEP = 2   # models kept loaded (MobileNetV2-sized models take tens of MB each)
_LOADED: "OrderedDict[tuple, tuple[Any, tempfile.TemporaryDirectory]]" = OrderedDict()


def loaded_signature(src: Any, progress: Callable[[str, str], None] | None = None) -> Any:
    """`source.open_signature(src)`, loaded once per model content in this process (the worker)."""
    from pipeline.convert.source import DEFAULT_SIGNATURE, open_signature

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
