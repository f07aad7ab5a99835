"""Advice that works: every hint edgepipe prints names an option that exists and a targets.yaml field that exists.

The advice is collected from the source, not from a list: every `hint=` of an error (pipeline/errors.py's root and
every module that raises), the module constants that hold hint or epilog text, the text of functions that build
advice, and every error message of the library and the device agent (which reach the user as fallback notes, JUnit,
the summary and the report). In advice, each `--flag` must be a real option of edgepipe's CLI (of the command named
with it, when `edgepipe COMMAND` is named), each `edgepipe COMMAND` a real command, and each targets.yaml field
written as `field:` (or `set field: ...`, `add field: ...`) a field of the targets.yaml schema.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

from pipeline.cli import _load_commands, app
from pipeline.inventory import InventorySpec

ROOT = Path(__file__).resolve().parents[1]
NOT_LIBRARY = (ROOT / "pipeline" / "testing", ROOT / "pipeline" / "examples")   # test fleets, the demo model
SOURCES = sorted(p for p in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "device_agents").glob("*.py")]
                 if not any(p.is_relative_to(d) for d in NOT_LIBRARY))
ERROR_CALLS = re.compile(r"(Error|Failure|ErrorInfo|Interrupted|failed_for|failure)$")
ADVICE_NAMES = re.compile(r"(HINT|ADVICE|EPILOG|NOTES)$|^(advise|advice|hint)", re.I)
VERB = r"\b(?:pass|use|add|drop|give|raise|try|set|rerun|run|with|or|needs?)\b"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMAND = re.compile(r"`edgepipe ((?:[a-z]+ ?)+)([^`]*)`")
FIELD = re.compile(r"(?:`([a-z_][a-z0-9_.]*):(?: [^`]*)?`"                                  # `field:`, `field: value`
                   r"|(?:\bset|\badd|\bdeclare it under top-level)\s+([a-z_][a-z0-9_.]*):)")   # set field: value
# flags that are not edgepipe's, named on purpose in advice (another tool's command line)
FOREIGN = {"--no-deps"}


@dataclass(frozen=True)
class Advice:
    where: str          # file:line
    text: str           # the text, with "\0" where a formatted value goes
    is_hint: bool       # a hint (all of it is advice) or a message (advice follows a verb)


def _text(node: ast.AST, consts: dict[str, str]) -> str | None:
    """A string expression's text, formatted values as \\0; None when it is not text."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        left, right = _text(node.left, consts), _text(node.right, consts)
        return None if left is None else left + (right if right is not None else "\0")
    if isinstance(node, ast.Name):
        return consts.get(node.id)
    if isinstance(node, ast.IfExp):
        return " | ".join(t for t in (_text(node.body, consts), _text(node.orelse, consts)) if t)
    return None


def _strings(node: ast.AST, consts: dict[str, str]) -> list[str]:
    return [t for n in ast.walk(node) for t in [_text(n, consts)] if t]


def collect() -> list[Advice]:
    found: list[Advice] = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        consts = {t.id: v for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                  if isinstance(t, ast.Name) for v in [_text(n.value, {})] if v}
        rel = path.relative_to(ROOT)
        for name, value in consts.items():
            if ADVICE_NAMES.search(name):
                found.append(Advice(f"{rel}: {name}", value, True))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and ADVICE_NAMES.search(node.name):
                found += [Advice(f"{rel}:{node.lineno}", t, False) for t in _strings(node, consts)]
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "hint":
                    found += [Advice(f"{rel}:{node.lineno}", t, True) for t in _strings(kw.value, consts)]
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            own_usage = node.args and _text(node.args[0], {}) == "bad_args"   # the agent's own argv, not advice
            if ERROR_CALLS.search(func) and not own_usage:
                found += [Advice(f"{rel}:{node.lineno}", t, False) for arg in node.args for t in _strings(arg, consts)]
    return found


def cli_options() -> dict[str, set[str]]:
    """Every command path ('' for the whole CLI) -> its option names (hidden ones too: they work)."""
    _load_commands()
    out: dict[str, set[str]] = {}
    todo = [("", typer.main.get_command(app))]
    while todo:
        path, cmd = todo.pop()
        out[path] = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        todo += [((path + " " + n).strip(), sub) for n, sub in getattr(cmd, "commands", {}).items()]
    out[""] = set().union(*out.values())
    return out


def schema_fields(model=InventorySpec, prefix: str = "") -> set[str]:
    """Every targets.yaml key, bare and dotted from the top (targets, defaults, groups, gates, artifact_store)."""
    names: set[str] = set()
    for name, f in model.model_fields.items():
        names |= {name, prefix + name}
        inner = [a for a in getattr(f.annotation, "__args__", ()) if isinstance(a, type)] + [f.annotation]
        for sub in inner:
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                names |= schema_fields(sub, prefix + name + ".")
    return names


def advice_flags(a: Advice) -> list[str]:
    """The flags an advice text tells the user to use: every flag of a hint; in a message, those after a verb."""
    if a.is_hint:
        return FLAG.findall(a.text)
    return [f for clause in re.split(r"[;()]", a.text) for m in re.finditer(VERB + r"[^;()]*", clause)
            for f in FLAG.findall(m.group(0))]


ADVICE = collect()
OPTIONS = cli_options()
FIELDS = schema_fields()


def test_the_advice_is_found():
    """The collection sees what it must see (so the checks below cannot pass on nothing)."""
    assert len(ADVICE) > 150 and sum(a.is_hint for a in ADVICE) > 80
    texts = " ".join(a.text for a in ADVICE)
    assert "--calibration" in texts and "`python:`" in texts and "edgepipe[tensorflow]" in texts
    assert any("delegate" in a.text and a.where.startswith("device_agents") for a in ADVICE)   # the agent's own
    assert {"--targets", "--record", "--model", "--queue-timeout"} <= OPTIONS[""]
    assert {"delegate", "python", "site", "db", "artifact_store.shared_dir", "gates.min_top1"} <= FIELDS


def test_every_flag_named_in_advice_exists():
    wrong = sorted({f"{a.where}: {flag}" for a in ADVICE for flag in advice_flags(a)
                    if flag not in OPTIONS[""] and flag not in FOREIGN})
    assert not wrong, "advice names options edgepipe does not have:\n" + "\n".join(wrong)


def test_every_edgepipe_command_named_in_advice_exists_with_its_flags():
    wrong = []
    for a in ADVICE:
        for m in COMMAND.finditer(a.text):
            words = m.group(1).split()
            path = next((" ".join(words[:n]) for n in (2, 1) if " ".join(words[:n]) in OPTIONS), None)
            if path is None:
                wrong.append(f"{a.where}: edgepipe {m.group(1)} is no command")
                continue
            wrong += [f"{a.where}: edgepipe {path} has no {f}" for f in FLAG.findall(m.group(2))
                      if f not in OPTIONS[path]]
    assert not wrong, "\n".join(wrong)


def test_every_targets_yaml_field_named_in_advice_exists():
    wrong = sorted({f"{a.where}: {name}:" for a in ADVICE for m in FIELD.finditer(a.text)
                    for name in [m.group(1) or m.group(2)] if name not in FIELDS})
    assert not wrong, "advice names targets.yaml fields that do not exist:\n" + "\n".join(wrong)


@pytest.mark.parametrize("text, flags", [
    ("no GPU delegate library found on this device; pass --delegate /path/to/delegate.so", ["--delegate"]),
    ("agent --probe did not answer within 5s", []),
    ("a compiled model needs --delegate edgetpu", ["--delegate"]),
])
def test_a_message_advises_only_after_a_verb(text, flags):
    assert advice_flags(Advice("x", text, False)) == flags
