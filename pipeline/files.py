"""Local file primitives every layer shares: content hashes and atomic writes."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Callable

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


def fingerprint(path: str | Path) -> list:
    """What changes whenever a file's (or a directory's files') content can have changed: size, mtime, ctime, inode
    and device of each file. ctime cannot be set back by any user-space call, so a file written since differs."""
    path = Path(path)
    files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for f in files:
        st = os.stat(f)
        out.append([f.relative_to(path).as_posix() if f != path else "", st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                    st.st_ino, st.st_dev])
    return out


def sha256_remembered(path: str | Path, memo_dir: str | Path | None) -> str:
    """sha256 of a file or directory, remembered in `memo_dir` by its `fingerprint`: hashed in full the first time
    and after any change, not again while it is untouched (the model a warm run identifies). No memo_dir: hashed."""
    if memo_dir is None:
        return sha256_path(path)
    where = Path(path).resolve()
    memo = Path(memo_dir) / f"{hashlib.sha1(str(where).encode()).hexdigest()}.json"
    fp = fingerprint(where)
    try:
        doc = json.loads(memo.read_text())
        if doc.get("path") == str(where) and doc.get("fingerprint") == fp:
            return doc["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    sha = sha256_path(where)
    if fingerprint(where) == fp:   # unchanged while it was read: what was hashed is what the fingerprint names
        write_atomic(memo, json.dumps({"path": str(where), "fingerprint": fp, "sha256": sha}))
    return sha


SAFE_NAME_MAX = 80   # characters of the slug kept; a file name may hold 255 bytes, and suffixes follow


def safe_name(name: str) -> str:
    """A file name (on a board, in a spool) for a target name or run id that may hold anything (`/`, `;`, spaces,
    any length): the name itself when it is a short plain name, else its slug cut to SAFE_NAME_MAX + a short hash
    of the whole name."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "target"
    if slug == name and len(slug) <= SAFE_NAME_MAX:
        return slug
    return f"{slug[:SAFE_NAME_MAX]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def temp_beside(path: str | Path) -> Path:
    """A temporary name next to `path`, unique per process and call (two threads or processes never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write via a temporary file and rename, so a reader (CI, a browser, a cache lookup) never sees half a file."""
    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    return write_atomic_with(path, lambda f: f.write(raw))


def write_atomic_with(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """`write(f)` fills a temporary file beside `path` (np.savez, say), which then replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def copy_atomic(src: str | Path, dest: str | Path, *, expect_sha256: str | None = None,
                known_sha256: str | None = None) -> str:
    """Publish a copy of `src` at `dest` through a temporary file and a rename (a reader sees the old file or the
    whole new one, never a part), hashing the bytes on the way; returns their sha256. With `expect_sha256`, bytes
    that hash otherwise never reach `dest`: ChecksumMismatch. With `known_sha256` (the caller verified `src` and it
    is untouched since), the bytes are copied without hashing them again."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(dest)
    h = hashlib.sha256() if known_sha256 is None else None
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            if h is None:
                shutil.copyfileobj(fin, fout, CHUNK)
            else:
                for chunk in iter(lambda: fin.read(CHUNK), b""):
                    h.update(chunk)
                    fout.write(chunk)
        got = known_sha256 if h is None else h.hexdigest()
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
