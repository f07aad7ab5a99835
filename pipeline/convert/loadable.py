"""Host checks on the model file itself, before any device is touched or any run recorded: is the file what its
name says (a text file named model.keras is named for what it is, not "File not found"), and does the host load
it with the runtime family of the float reference (LiteRT for a .tflite, in the quiet worker, never in the
edgepipe process). A custom operator the host cannot resolve is one line naming it and `--allow-custom-op NAME`,
for the user who knows the boards have it. A model that loaded once is remembered by content and LiteRT version.
"""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import ConfigError, ConversionError
from pipeline.files import write_atomic

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
TFLITE_ID = b"TFL3"
_UNRESOLVED = re.compile(r"unresolved custom op:? '?([\w\-./]+?)'?(?:\.|\s|$)", re.IGNORECASE)
_BUILTIN = re.compile(r"builtin opcode '([A-Z0-9_]+)' version '(\d+)'")
_EXPECTED = {"keras": "a Keras .keras archive (a ZIP file)", "h5": "an HDF5 file", "tflite": "a TFLite flatbuffer"}


def what_is(path: Path) -> str:
    """What a file is, from its first bytes, in the words of a message: 'a text file (it starts with ...)'."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if head.startswith(HDF5_MAGIC):
        return "an HDF5 file (a Keras .h5 model?)"
    if head[4:8] == TFLITE_ID:
        return "a TFLite flatbuffer (a .tflite model?)"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text[:200]):
        first = (text.strip().splitlines() or [""])[0][:40]
        return f"a text file (it starts with {first!r})"
    return f"binary data ({Path(path).stat().st_size} bytes, starting {head[:8].hex()})"


def _is_hdf5(path: Path) -> bool:
    """HDF5's signature sits at byte 0 or, after a user block, at 512, 1024, 2048..."""
    with open(path, "rb") as f:
        for at in (0, 512, 1024, 2048, 4096):
            f.seek(at)
            if f.read(8) == HDF5_MAGIC:
                return True
    return False


def check_format(path: Path, kind: str) -> None:
    """A model file must be what its extension says; else one error naming what it really is."""
    if kind == "keras":
        ok = zipfile.is_zipfile(path)
    elif kind == "h5":
        ok = _is_hdf5(path)
    elif kind == "tflite":
        with open(path, "rb") as f:
            ok = f.read(8)[4:8] == TFLITE_ID
    else:
        return
    if not ok:
        raise ConversionError(f"{path.name} is not {_EXPECTED[kind]}: it is {what_is(path)}", file=str(path),
                              hint="pass the model file itself (a SavedModel directory, .keras, .h5 or .tflite)")


# ---------------------------------------------------------------- the host load (LiteRT, in the quiet worker)

def load_in_litert(path: str) -> dict[str, Any]:
    """Allocate the model in LiteRT (runs in the quiet worker): {"ok"} or {"ok": False, "op", "message"}."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        Interpreter(model_path=path).allocate_tensors()
        return {"ok": True}
    except Exception as exc:  # noqa: BLE001 - whatever the runtime raises is the answer
        text = " ".join(str(exc).split()) or type(exc).__name__
        m = _UNRESOLVED.search(text)
        return {"ok": False, "op": m.group(1) if m else None, "message": text[:300]}


def _litert_version() -> str:
    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        return "none"


def _verdict(src: Any, cache_dir: Path | None, log: Path) -> dict[str, Any]:
    """The load's outcome, remembered per model content and LiteRT version (a warm run starts no worker)."""
    from pipeline.convert.worker import run_quiet

    memo = Path(cache_dir) / "models" / f"hostload-{src.sha256[:24]}-{_litert_version()}.json" if cache_dir else None
    if memo is not None and memo.exists():
        try:
            return json.loads(memo.read_text())
        except (OSError, ValueError):
            pass
    got = run_quiet(load_in_litert, str(src.path), log=log, what="loading the .tflite on the host", file=str(src.path))
    if memo is not None and (got["ok"] or got.get("op")):   # both are facts of the file and the runtime
        write_atomic(memo, json.dumps(got))
    return got


def check_host_load(src: Any, *, allow_custom_ops: Iterable[str] = (), cache_dir: str | Path | None = None,
                    log: str | Path | None = None) -> Any:
    """Load a .tflite on the host with LiteRT; returns the ModelSource, with `host_unresolved` naming the allowed
    custom ops the host cannot run (so no float reference is computed from it). An Edge-TPU-compiled model never
    runs on the host and is not loaded. A refusal is one ConfigError line (exit 2)."""
    if src.kind != "tflite" or src.variant == "edgetpu_compiled":
        return src
    import tempfile

    log = Path(log) if log else Path(tempfile.gettempdir()) / "edgepipe-hostload" / f"{src.name}.log"
    got = _verdict(src, Path(cache_dir) if cache_dir else None, log)
    if got["ok"]:
        return src
    op, allowed = got.get("op"), set(allow_custom_ops)
    if op and op in allowed:
        return replace(src, host_unresolved=(op,))
    if op:
        raise ConfigError(f"custom op {op} is not resolved by the host's LiteRT, so the host cannot load this model",
                          file=str(src.path), field="--model",
                          hint=f"if your boards have {op}, pass --allow-custom-op {op}")
    builtin = _BUILTIN.search(got.get("message") or "")
    what = (f"operator {builtin.group(1)} version {builtin.group(2)} is newer than the host's LiteRT "
            f"{_litert_version()}" if builtin else got.get("message"))
    raise ConversionError(f"the .tflite does not load on the host: {what}", file=str(src.path),
                          hint="check the file (re-export or re-convert it)")
