"""Local file primitives every layer shares: content hashes and atomic writes."""
from __future__ import annotations

import hashlib
import os
import uuid
from importlib import resources
from pathlib import Path

CHUNK = 1 << 20


class ChecksumMismatch(Exception):
    """A file's bytes do not hash to what was expected (`got` is what they hash to)."""

    def __init__(self, path: str | Path, expected: str, got: str) -> None:
        super().__init__(f"{path}: sha256 {got[:12]}…, expected {expected[:12]}…")
        self.path, self.expected, self.got = str(path), expected, got


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory's relative paths and file contents (a SavedModel)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                h.update(chunk)
    return h.hexdigest()


_SHA_CACHE: dict[tuple[str, int, int, int], str] = {}


def _stat_key(path: str | Path) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino


def sha256_cached(path: str | Path) -> str:
    """sha256 of a local file, hashed once per process per (path, size, mtime, inode): a file replaced by a rename
    or rewritten in place is hashed again."""
    key = _stat_key(path)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_path(path)
    return _SHA_CACHE[key]


def remember_sha256(path: str | Path, sha256: str) -> None:
    """Record the hash of a file this process just wrote from bytes it hashed (so it is not read twice)."""
    _SHA_CACHE[_stat_key(path)] = sha256


def temp_beside(path: str | Path) -> Path:
    """A temporary name next to `path`, unique per process and call (two threads or processes never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write via a temporary file and rename, so a reader (CI, a browser, a cache lookup) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def copy_atomic(src: str | Path, dest: str | Path, *, expect_sha256: str | None = None) -> str:
    """Publish a copy of `src` at `dest` through a temporary file and a rename (a reader sees the old file or the
    whole new one, never a part), hashing the bytes on the way; returns their sha256. With `expect_sha256`, bytes
    that hash otherwise never reach `dest`: ChecksumMismatch."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(dest)
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            for chunk in iter(lambda: fin.read(CHUNK), b""):
                h.update(chunk)
                fout.write(chunk)
        got = h.hexdigest()
        if expect_sha256 is not None and got != expect_sha256:
            raise ChecksumMismatch(src, expect_sha256, got)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    remember_sha256(dest, got)
    return got


def agent_file(name: str) -> Path:
    """A file of the device agent (`agent.py`, `result.schema.json`), shipped as package data of `device_agents`."""
    ref = resources.files("device_agents").joinpath(name)
    path = Path(os.fspath(ref))  # wheels install as directories, so the resource is a real file
    if not path.is_file():
        raise FileNotFoundError(f"device agent file {name} is missing from the installed package ({path})")
    return path
