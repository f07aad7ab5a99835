"""Artifacts where every worker can read them: inside the database up to `inline_max_bytes`, else a shared directory.

Both are content-addressed by sha256 and checked again when a worker fetches them into its local cache, so a
worker never measures a file other than the one the coordinator converted. S3-compatible URLs are not implemented.
"""
from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, EdgepipeError
from pipeline.files import sha256_path


class ArtifactUnavailable(EdgepipeError):
    """A worker cannot read an artifact the coordinator put (shared directory not mounted, blob gone, hash wrong)."""

    exit_code = 3
    code = "artifact_unavailable"


class ArtifactStore:
    """put() on the coordinator returns a location (JSON) for the job; fetch() on a worker returns a local path."""

    def __init__(self, exchange: Any, *, inline_max_bytes: int, shared_dir: str | Path | None = None,
                 cache_dir: str | Path | None = None, file: Any = None) -> None:
        """`exchange`: the history's pipeline.release.exchange.Exchange (`Store.exchange`), where blobs live."""
        self.exchange = exchange
        self.inline_max_bytes = int(inline_max_bytes)
        self.shared_dir = Path(shared_dir) if shared_dir else None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.file = file
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def put(self, path: Path) -> dict[str, Any]:
        path = Path(path)
        sha, size = sha256_path(path), path.stat().st_size
        if size <= self.inline_max_bytes:
            if not self.exchange.has_blob(sha):
                self.exchange.put_blob(sha, path.read_bytes())
            return {"sha256": sha, "bytes": size, "where": "db", "name": path.name}
        if self.shared_dir is None:
            raise ConfigError(f"{path.name} is {size} bytes, more than artifact_store.inline_max_bytes "
                              f"({self.inline_max_bytes}), and no shared directory is set", file=self.file,
                              field="artifact_store.shared_dir",
                              hint="set artifact_store.shared_dir to a path every worker sees, or raise inline_max_bytes")
        dest = self.shared_dir / sha
        if not (dest.is_file() and dest.stat().st_size == size):
            self.shared_dir.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{sha}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            shutil.copyfile(path, tmp)
            tmp.replace(dest)
        return {"sha256": sha, "bytes": size, "where": "dir", "path": str(dest), "name": path.name}

    def fetch(self, loc: dict[str, Any]) -> Path:
        """The artifact as a local file in the worker's cache (verified by sha256; fetched once per worker, however
        many of its jobs ask at once)."""
        if self.cache_dir is None:
            raise ArtifactUnavailable("this artifact store has no local cache directory")
        sha = loc["sha256"]
        with self._guard:
            lock = self._locks.setdefault(sha, threading.Lock())
        with lock:
            local = self.cache_dir / "blobs" / sha
            if local.is_file() and local.stat().st_size == loc["bytes"]:
                return local
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{sha}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # unique: workers may share a cache
            try:
                self._copy_to(loc, tmp)
                if sha256_path(tmp) != sha:
                    raise ArtifactUnavailable(f"{loc['name']} fetched from the artifact store does not match its "
                                              f"sha256 {sha[:12]}")
                tmp.replace(local)
            finally:
                tmp.unlink(missing_ok=True)
            return local

    def _copy_to(self, loc: dict[str, Any], dest: Path) -> None:
        if loc["where"] == "db":
            data = self.exchange.blob(loc["sha256"])
            if data is None:
                raise ArtifactUnavailable(f"{loc['name']} ({loc['sha256'][:12]}) is not in the database's artifact store")
            dest.write_bytes(data)
            return
        src = Path(loc["path"])
        if not src.is_file():
            raise ArtifactUnavailable(f"{src} is not readable on this worker",
                                      hint="mount artifact_store.shared_dir at the same path on every worker")
        shutil.copyfile(src, dest)
