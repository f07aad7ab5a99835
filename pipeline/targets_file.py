"""Edit targets.yaml in place, keeping its comments and layout (ruamel.yaml round-trip): `optimize --write-modes`.

The patched file is validated with `load_inventory` before it replaces the original, so a bad patch never lands.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.files import write_atomic
from pipeline.inventory import load_inventory


def _yaml() -> Any:
    from ruamel.yaml import YAML

    y = YAML()   # round-trip: comments, key order and flow/block style are kept
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)   # the style of the example targets.yaml
    return y


def _has_keep_float(doc: Any, entry: Any) -> bool:
    """Whether a group or the defaults would hand this target a keep_float it must override."""
    groups = doc.get("groups") or {}
    inherited = [(groups.get(g) or {}).get("keep_float") for g in (entry.get("groups") or [])]
    return any(inherited) or bool((doc.get("defaults") or {}).get("keep_float"))


def write_modes(path: str | Path, choices: dict[str, tuple[str, list[str]]]) -> list[str]:
    """Set `mode:` (and `keep_float:` for a selectively quantized int8) on each named target; returns what changed.

    `choices` maps target name -> (mode, keep_float). Comments and the rest of the file stay as they were.
    """
    from ruamel.yaml.comments import CommentedSeq

    file = Path(path)
    y = _yaml()
    doc = y.load(file.read_text())
    changes: list[str] = []
    for entry in doc.get("targets") or []:
        name = entry.get("name")
        if name not in choices:
            continue
        mode, keep = choices[name]
        if entry.get("mode") != mode:
            changes.append(f"{name}: mode {entry.get('mode') or '(kind default)'} -> {mode}")
            entry["mode"] = mode
        old = list(entry.get("keep_float") or [])
        if keep:
            if old != list(keep):
                seq = CommentedSeq(list(keep))
                seq.fa.set_flow_style()
                entry["keep_float"] = seq
                changes.append(f"{name}: keep_float {len(keep)} layer(s) in float")
        elif "keep_float" in entry or _has_keep_float(doc, entry):
            if old or "keep_float" not in entry:
                changes.append(f"{name}: keep_float cleared")
            entry["keep_float"] = CommentedSeq()
            entry["keep_float"].fa.set_flow_style()
    buf = io.StringIO()
    y.dump(doc, buf)
    tmp = file.with_name(f".{file.name}.optimize-{os.getpid()}")
    try:
        write_atomic(tmp, buf.getvalue())
        try:
            load_inventory(tmp)   # beside the original, so relative paths resolve the same
        except ConfigError as exc:
            exc.file = str(file)
            exc.message = f"the patched targets.yaml would not validate ({exc.message}); left unchanged"
            raise
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    return changes
