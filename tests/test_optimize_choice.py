"""`edgepipe optimize`'s decisions without devices (~1 s): --write-modes's diff is only the keys it sets, in the
file's own indentation."""
from __future__ import annotations

import difflib
import re
import shutil
from pathlib import Path

import pytest

from pipeline.inventory import load_inventory
from pipeline.targets_file import detect_indent, write_modes

ROOT = Path(__file__).resolve().parent.parent
FLAT = ("# the lab\ndefaults:\n  transport: local\ntargets:\n- name: a\n  kind: cpu   # a comment\n  # about b\n"
        "- name: b\n  kind: cpu\n  groups: [g]\ngroups:\n  g:\n    mode: float16\n")
WIDE = "targets:\n    -   name: a\n        kind: cpu\n        transport: local\n    -   {name: b, kind: cpu, transport: local}\n"


def _diff(before: str, after: str) -> list[str]:
    return [ln for ln in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]


KEY = re.compile(r"^\s*(mode|keep_float|int16_layers): .*$")


def _without_set_keys(text: str) -> list[str]:
    """The file with the keys --write-modes sets taken out (a block key's line, a flow entry's `key: value`)."""
    lines = [ln for ln in text.splitlines() if not KEY.match(ln.split("#")[0].rstrip() or "#")]
    return [re.sub(r", (mode|keep_float|int16_layers): (\[[^]]*\]|[\w.]+)", "", ln).split("#")[0].rstrip()
            for ln in lines]


@pytest.mark.parametrize("text, indent", [(FLAT, (2, 2, 0)), (WIDE, (2, 8, 4)), (None, (2, 4, 2))])
def test_write_modes_changes_only_the_keys_it_sets_in_the_files_own_indentation(tmp_path, text, indent):
    path = tmp_path / "targets_wm.yaml"
    if text is None:   # the example inventory: comments everywhere, flow lists, a target that already has a mode
        shutil.copy(ROOT / "targets.yaml", path)
        text = path.read_text()
        names = {"pi4-kitchen": "int8", "pi4-garage": "float16", "pi5-lab": "int8"}
    else:
        path.write_text(text)
        names = {"a": "int8", "b": "dynamic"}
    assert detect_indent(text) == indent
    choices = {n: (m, ["conv/x"] if n == "pi5-lab" else [], []) for n, m in names.items()}
    changes = write_modes(path, choices)
    diff = _diff(text, path.read_text())
    # nothing but the keys set changed: without them (and comments' spacing) the file reads as before, line for line
    assert _without_set_keys(path.read_text()) == _without_set_keys(text), diff
    assert len([ln for ln in diff if ln.startswith("+")]) <= len(changes), (diff, changes)
    inv = load_inventory(path)
    assert {n: inv.target(n).mode for n in names} == names
    if "pi5-lab" in names:
        assert inv.target("pi5-lab").keep_float == ("conv/x",)
        assert "override the kind's default" in path.read_text()   # the replaced line's comment stays
    assert write_modes(path, choices) == [] and _diff(text, path.read_text()) == diff   # idempotent
