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


LAYER_LISTS = {"keep_float": "in float", "int16_layers": "at 16-bit activations"}   # int8 recipe options


def _inherits(doc: Any, entry: Any, key: str) -> bool:
    """Whether a group or the defaults would hand this target a `key` list it must override."""
    groups = doc.get("groups") or {}
    inherited = [(groups.get(g) or {}).get(key) for g in (entry.get("groups") or [])]
    return any(inherited) or bool((doc.get("defaults") or {}).get(key))


def _set_layers(doc: Any, entry: Any, key: str, layers: list[str], changes: list[str]) -> None:
    from ruamel.yaml.comments import CommentedSeq

    name, old = entry.get("name"), list(entry.get(key) or [])
    if layers:
        if old != list(layers):
            seq = CommentedSeq(list(layers))
            seq.fa.set_flow_style()
            entry[key] = seq
            changes.append(f"{name}: {key} {len(layers)} layer(s) {LAYER_LISTS[key]}")
    elif key in entry or _inherits(doc, entry, key):
        if old or key not in entry:
            changes.append(f"{name}: {key} cleared")
        entry[key] = CommentedSeq()
        entry[key].fa.set_flow_style()


def write_modes(path: str | Path, choices: dict[str, tuple[Any, ...]]) -> list[str]:
    """Set `mode:` (and `keep_float:` / `int16_layers:` for a recovered int8) on each named target; returns what
    changed.

    `choices` maps target name -> (mode, keep_float[, int16_layers]). Comments and the rest of the file stay as
    they were.
    """
    file = Path(path)
    y = _yaml()
    doc = y.load(file.read_text())
    changes: list[str] = []
    for entry in doc.get("targets") or []:
        name = entry.get("name")
        if name not in choices:
            continue
        mode, *lists = choices[name]
        if entry.get("mode") != mode:
            changes.append(f"{name}: mode {entry.get('mode') or '(kind default)'} -> {mode}")
            entry["mode"] = mode
        for key, layers in zip(LAYER_LISTS, lists):
            _set_layers(doc, entry, key, list(layers or []), changes)
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
