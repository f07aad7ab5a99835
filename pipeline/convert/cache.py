"""Conversion cache keyed by (model hash, recipe, calibration hash, TF version); a hit never imports TensorFlow.

A hit is used only once its bytes hashed to the sha256 its manifest recorded, checked while it is published into the
run's output folder (one read: the copy and the hash) and remembered with the file's fingerprint, so an untouched
entry is not read again; an entry that fails the check is removed, so it is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.files import ChecksumMismatch, copy_atomic, fingerprint, temp_beside, write_atomic

CACHE_VERSION = 1


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


def cache_key(model_sha256: str, recipe_key: dict[str, Any], calibration_sha256: str | None,
              tf: str | None) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "model": model_sha256, "recipe": recipe_key,
                       "calibration": calibration_sha256, "tf": tf}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class CacheEntry:
    tflite: Path
    manifest: dict[str, Any]


class CorruptEntry(Exception):
    """A cache entry whose bytes do not hash to its manifest's sha256 (removed; the caller rebuilds it)."""


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

    def publish(self, key: str, dest: Path) -> CacheEntry | None:
        """The entry published at `dest` (atomically) once verified: its bytes hashed to the manifest's sha256. A
        verification is remembered with the file's fingerprint (size, mtime, ctime, inode), so an entry untouched
        since is copied without hashing it again; after any change it is hashed in full (while copied). None when
        there is no entry; CorruptEntry (the entry removed) when the bytes differ."""
        hit = self.get(key)
        if hit is None:
            return None
        want = hit.manifest.get("sha256")
        stamp = hit.tflite.with_name("verified.json")
        try:
            trusted = json.loads(stamp.read_text()) == {"sha256": want, "fingerprint": fingerprint(hit.tflite)}
        except (OSError, ValueError):
            trusted = False
        if trusted:
            copy_atomic(hit.tflite, dest, known_sha256=want)
            return hit
        fp = fingerprint(hit.tflite)
        try:
            copy_atomic(hit.tflite, dest, expect_sha256=want)
        except ChecksumMismatch as bad:
            self.evict(key)
            raise CorruptEntry(f"its .tflite hashes to {bad.got[:12]}…, its manifest says {bad.expected[:12]}…") \
                from None
        if fingerprint(hit.tflite) == fp:   # unchanged while it was read
            write_atomic(stamp, json.dumps({"sha256": want, "fingerprint": fp}))
        return hit

    def evict(self, key: str) -> None:
        shutil.rmtree(self.root / key[:2] / key, ignore_errors=True)

    def put(self, key: str, tflite: Path, manifest: dict[str, Any]) -> None:
        d = self.root / key[:2] / key
        d.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(d / "model.tflite")
        try:
            shutil.copyfile(tflite, tmp)
            tmp.replace(d / "model.tflite")
        finally:
            tmp.unlink(missing_ok=True)
        write_atomic(d / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
