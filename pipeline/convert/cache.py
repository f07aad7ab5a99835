"""Conversion cache keyed by (model hash, recipe, calibration hash, TF version); a hit never imports TensorFlow.

A host without TensorFlow (`pip install edgepipe` without the `tensorflow` extra) cannot convert, but it reuses what
the cache holds for the same model, recipe and calibration, whichever TensorFlow made it (its manifest says which):
each entry is also reachable under the key made with `ANY_TF` instead of a version.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.errors import ConversionError
from pipeline.files import write_atomic

CACHE_VERSION = 1
ANY_TF = "any"   # the TF "version" of the keys a host without TensorFlow looks up
TENSORFLOW_HINT = ("pip install 'edgepipe[tensorflow]' (only converting needs it; measuring, gating and reports "
                   "do not, and a conversion already in the cache is reused without it)")


# Shared by `edgepipe convert`, `edgepipe run` and the Python API, so a convert then a run converts once.
DEFAULT_CACHE_DIR = Path(os.environ.get("EDGEPIPE_CACHE_DIR", "~/.cache/edgepipe/convert")).expanduser()

def tf_version() -> str | None:
    """The installed TensorFlow version, read from package metadata (no import)."""
    for dist in ("tensorflow", "tensorflow-cpu", "tf-nightly"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def has_tensorflow() -> bool:
    """TensorFlow is importable here (found without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def require_tensorflow(what: str, file: str | None = None) -> None:
    """One line naming the extra to install, instead of a crash in the quiet worker, when TensorFlow is missing."""
    if not has_tensorflow():
        raise ConversionError(f"{what} needs TensorFlow, which is not installed here", file=file,
                              code="tensorflow_missing", hint=TENSORFLOW_HINT)


def cache_key(model_sha256: str, recipe_key: dict[str, Any], calibration_sha256: str | None,
              tf: str | None) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "model": model_sha256, "recipe": recipe_key,
                       "calibration": calibration_sha256, "tf": tf}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class CacheEntry:
    tflite: Path
    manifest: dict[str, Any]


class ConversionCache:
    """A directory of `<key>/model.tflite` + `<key>/manifest.json`, written atomically."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()

    def get(self, key: str) -> CacheEntry | None:
        d = self.root / key[:2] / key
        tfl, man = d / "model.tflite", d / "manifest.json"
        if not (tfl.exists() and man.exists()):
            return None
        try:
            manifest = json.loads(man.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("bytes") != tfl.stat().st_size:
            return None   # a torn or tampered entry is a miss, never a wrong artifact
        return CacheEntry(tfl, manifest)

    def get_any(self, any_key: str) -> CacheEntry | None:
        """The entry last stored under `any_key` (a key made with ANY_TF): for a host without TensorFlow."""
        try:
            key = json.loads((self.root / ANY_TF / f"{any_key}.json").read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return self.get(str(key))

    def put(self, key: str, tflite: Path, manifest: dict[str, Any], *, any_key: str | None = None) -> None:
        d = self.root / key[:2] / key
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".model.{os.getpid()}.tmp"
        shutil.copyfile(tflite, tmp)
        tmp.replace(d / "model.tflite")
        write_atomic(d / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
        if any_key is not None:
            write_atomic(self.root / ANY_TF / f"{any_key}.json", json.dumps({"key": key}))
