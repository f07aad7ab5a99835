"""Edit targets.yaml in place, keeping its comments and layout (ruamel.yaml round-trip): `optimize --write-modes`.

The file's own indentation is detected and kept, and a new key goes right after the entry's `kind:` (or `mode:`),
so the diff is only the keys written. The patched file is validated with `load_inventory` before it replaces the
original, so a bad patch never lands.
"""
from __future__ import annotations

import io
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.files import write_atomic
from pipeline.inventory import load_inventory

LAYER_LISTS = {"keep_float": "in float", "int16_layers": "at 16-bit activations"}   # int8 recipe options
DEFAULT_INDENT = (2, 4, 2)   # mapping, sequence, dash offset: the example targets.yaml's style
_LINE = re.compile(r"^( *)(- +)?([^#\s][^#]*?)?\s*(#.*)?$")


def detect_indent(text: str) -> tuple[int, int, int]:
    """(mapping indent, sequence indent, dash offset) as ruamel's `YAML.indent` takes them, read from the file: the
    most common step from a `key:` line to the block under it. Defaults where the file has no such block."""
    maps: Counter[int] = Counter()
    seqs: Counter[tuple[int, int]] = Counter()
    parent: int | None = None
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if not m or not m.group(3):   # blank or comment-only
            continue
        col, dash, body = len(m.group(1)), m.group(2), m.group(3)
        if parent is not None and dash and col >= parent:
            seqs[(col - parent + len(dash), col - parent)] += 1
        elif parent is not None and not dash and col > parent:
            maps[col - parent] += 1
        # a block opens after `key:` (alone, or `- key:` whose value nests under the item's content column)
        parent = (col + len(dash or "")) if body.endswith(":") and not body.startswith(("{", "[")) else None
    mapping = maps.most_common(1)[0][0] if maps else DEFAULT_INDENT[0]
    sequence, offset = seqs.most_common(1)[0][0] if seqs else DEFAULT_INDENT[1:]
    return mapping, max(sequence, offset + 2), offset


def _yaml(text: str) -> Any:
    from ruamel.yaml import YAML

    y = YAML()   # round-trip: comments, key order and flow/block style are kept
    y.preserve_quotes = True
    y.width = 4096
    mapping, sequence, offset = detect_indent(text)
    y.indent(mapping=mapping, sequence=sequence, offset=offset)
    return y


def _inherits(doc: Any, entry: Any, key: str) -> bool:
    """Whether a group or the defaults would hand this target a `key` list it must override."""
    groups = doc.get("groups") or {}
    inherited = [(groups.get(g) or {}).get(key) for g in (entry.get("groups") or [])]
    return any(inherited) or bool((doc.get("defaults") or {}).get(key))


def _put(entry: Any, key: str, value: Any, after: tuple[str, ...]) -> None:
    """Set `key`, in place when it is there, else right after the first of `after` the entry has (else last)."""
    if key in entry:
        entry[key] = value
        return
    keys = list(entry.keys())
    anchor = next((k for k in after if k in keys), None)
    entry.insert(keys.index(anchor) + 1 if anchor else len(keys), key, value)


def _flow(layers: list[str]) -> Any:
    from ruamel.yaml.comments import CommentedSeq

    seq = CommentedSeq(list(layers))
    seq.fa.set_flow_style()
    return seq


def _set_layers(doc: Any, entry: Any, key: str, layers: list[str], changes: list[str]) -> None:
    name, old = entry.get("name"), list(entry.get(key) or [])
    if layers:
        if old != list(layers):
            _put(entry, key, _flow(layers), ("mode", "kind"))
            changes.append(f"{name}: {key} {len(layers)} layer(s) {LAYER_LISTS[key]}")
    elif key in entry or _inherits(doc, entry, key):
        if old or key not in entry:
            changes.append(f"{name}: {key} cleared")
        _put(entry, key, _flow([]), ("mode", "kind"))


def write_modes(path: str | Path, choices: dict[str, tuple[Any, ...]]) -> list[str]:
    """Set `mode:` (and `keep_float:` / `int16_layers:` for a recovered int8) on each named target; returns what
    changed.

    `choices` maps target name -> (mode, keep_float[, int16_layers]). Comments, indentation and the rest of the
    file stay as they were.
    """
    file = Path(path)
    text = file.read_text()
    y = _yaml(text)
    doc = y.load(text)
    changes: list[str] = []
    for entry in doc.get("targets") or []:
        name = entry.get("name")
        if name not in choices:
            continue
        mode, *lists = choices[name]
        if entry.get("mode") != mode:
            changes.append(f"{name}: mode {entry.get('mode') or '(kind default)'} -> {mode}")
            _put(entry, "mode", mode, ("kind",))
        for key, layers in zip(LAYER_LISTS, lists):
            _set_layers(doc, entry, key, list(layers or []), changes)
    if not changes:
        return changes
    buf = io.StringIO()
    y.dump(doc, buf)
    tmp = file.with_name(f".{file.name}.optimize-{os.getpid()}")
    try:
        write_atomic(tmp, buf.getvalue())
        try:
            load_inventory(tmp)   # beside the original, so relative paths resolve the same
        except ConfigError as exc:
            exc.file = str(file)
            exc.message = f"the patched {file.name} would not validate ({exc.message}); left unchanged"
            raise
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    return changes
