"""The JSON shapes docs/json.md documents, read from its tables, and a check of a document against them."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "json.md"
Shape = dict[str, tuple[set[str], set[str]]]   # path ('' the top) -> (required keys, optional keys)


@lru_cache(maxsize=1)
def shapes() -> dict[str, Shape]:
    """'error', 'fleet validate', 'run', ... -> its documented paths and keys."""
    out: dict[str, Shape] = {}
    command = path = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            m = re.match(r"## `edgepipe ([a-z ]+?)(?: [A-Z]+)? --json`", line)
            command = m.group(1) if m else ("error" if "error object" in line else None)
            if command:
                out[command] = {}
        elif line.startswith("### ") and command:
            path = re.match(r"### `([^`]*)`", line).group(1)
            out[command][path] = (set(), set())
        elif line.startswith("| `") and command and path is not None:
            cell = line.split("|")[1]
            key = re.match(r"\s*`([^`]+)`", cell).group(1)
            out[command][path][1 if "*(optional)*" in cell else 0].add(key)
    return out


def _at(doc: Any, path: str) -> list[dict]:
    objects = [doc]
    for part in [p for p in path.split(".") if p]:
        name, many = part.removesuffix("[]"), part.endswith("[]")
        found = []
        for o in objects:
            value = o.get(name) if isinstance(o, dict) else None
            found += [v for v in (value if many else [value]) if isinstance(v, dict)] if value is not None else []
        objects = found
    return objects


def check(command: str, doc: dict, *, only: tuple[str, ...] | None = None, absent: tuple[str, ...] = ()) -> None:
    """Every object at every documented path (or `only` these) has every required key and no key the page does
    not document. A path may have no object in this document only when listed in `absent`."""
    shape = shapes()[command]
    for path, (required, optional) in shape.items():
        if only is not None and path not in only:
            continue
        objects = _at(doc, path)
        assert objects or path in absent, f"{command}: nothing at {path!r} to check"
        for o in objects:
            missing, extra = required - set(o), set(o) - required - optional
            assert not missing and not extra, f"{command} {path or 'top'}: undocumented {sorted(extra)}, " \
                                              f"documented but missing {sorted(missing)}"
