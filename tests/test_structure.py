"""The structure issue 18 set, kept by scans of the source (no devices, no TensorFlow; ~2 s):
SQL text only in pipeline/release/ (the modules that own the tables), no import cycle between modules, and no
function over 80 lines in pipeline/ or device_agents/ (the agent's argument parser excepted: one flag a line)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 80
LONG_ALLOWED = {("device_agents/agent.py", "parse_args")}
# Statements of our own history tables. pipeline/testing/postgres.py administers a throwaway server for tests
# (CREATE DATABASE / ROLE), it never touches the history, so it is not scanned.
SQL = re.compile(r"\b(SELECT\s+.+\s+FROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX)|"
                 r"ALTER\s+TABLE|DROP\s+TABLE|ON\s+CONFLICT|PRAGMA\s+\w+|BEGIN\s+IMMEDIATE|pg_advisory)", re.S)
NOT_SCANNED = {"pipeline/testing/postgres.py"}


def _sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal, f-strings joined (their constant parts)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            out.append((node.lineno, "".join(v.value for v in node.values if isinstance(v, ast.Constant))))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
    return out


def test_no_sql_text_outside_release():
    found = []
    for path in _sources("pipeline", "device_agents"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("pipeline/release/") or rel in NOT_SCANNED:
            continue
        for line, text in _strings(ast.parse(path.read_text())):
            if SQL.search(text):
                found.append(f"{rel}:{line}: {' '.join(text.split())[:80]}")
    assert not found, "SQL outside pipeline/release/ (put it behind the store, the exchange or the leases):\n" + \
        "\n".join(found)


def test_the_sql_scan_sees_the_release_statements():
    """The scan is not blind: the modules that own the tables are full of what it looks for."""
    hits = [t for p in _sources("pipeline/release") for _, t in _strings(ast.parse(p.read_text())) if SQL.search(t)]
    assert len(hits) > 30


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph("pipeline", "device_agents", cache_dir=None)
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m)} for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongly_connected(v: str) -> None:   # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strongly_connected(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for module in sorted(edges):
        if module not in index:
            strongly_connected(module)
    assert not cycles, "modules importing each other (in a circle): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_function_over_80_lines():
    long = []
    for path in _sources("pipeline", "device_agents"):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = node.end_lineno - first + 1
                if lines > MAX_LINES and (rel, node.name) not in LONG_ALLOWED:
                    long.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_LINES} lines (split them into named steps): " + "; ".join(long)
