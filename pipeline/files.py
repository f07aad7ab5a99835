"""Local file primitives every layer shares: content hashes and atomic writes."""
from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory's relative paths and file contents (a SavedModel)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write via a temporary file and rename, so a reader (CI, a browser, a cache lookup) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)
    return path


def agent_file(name: str) -> Path:
    """A file of the device agent (`agent.py`, `result.schema.json`), shipped as package data of `device_agents`."""
    ref = resources.files("device_agents").joinpath(name)
    path = Path(os.fspath(ref))  # wheels install as directories, so the resource is a real file
    if not path.is_file():
        raise FileNotFoundError(f"device agent file {name} is missing from the installed package ({path})")
    return path
