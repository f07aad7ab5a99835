"""The command line's own surface: -h everywhere, --version, readable metavars, tables that fit 80 columns, and
one plain line per stage when stderr is not a terminal."""
from __future__ import annotations

import io
import re
from importlib import metadata

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from pipeline.cli import _load_commands, app
from pipeline.results import DeviceResult, RunResult

_load_commands()
WIDE = {"COLUMNS": "200"}
TYPE_LABEL = re.compile(r"<[a-z][a-z0-9_\[\]|, ]*>")       # typer's `<bool>`, `<list[str]>`, `<path>` ...


def _command_paths() -> list[list[str]]:
    paths, todo = [], [([], typer.main.get_command(app))]
    while todo:
        path, cmd = todo.pop()
        paths.append(path)
        todo += [(path + [name], sub) for name, sub in sorted(getattr(cmd, "commands", {}).items())]
    return sorted(paths)


COMMANDS = _command_paths()


def test_every_command_is_reachable():
    assert {"convert", "run", "history", "show", "gate", "report"} <= {p[0] for p in COMMANDS if p}
    assert ["fleet", "check"] in COMMANDS and ["fleet", "validate"] in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "edgepipe")
def test_h_is_help_with_click_metavars(path):
    short = CliRunner().invoke(app, [*path, "-h"], env=WIDE)
    long = CliRunner().invoke(app, [*path, "--help"], env=WIDE)
    assert short.exit_code == 0 and long.exit_code == 0, short.output
    assert short.output == long.output and "Usage:" in short.output
    assert TYPE_LABEL.findall(short.output) == [], short.output
    assert "BOOLEAN" not in short.output       # a flag takes no value, so it shows none
    for line in short.output.splitlines():     # every option that takes a value names it like click does
        m = re.search(r"(--[a-z][a-z-]*)\s+(?:-\w\s+)?([A-Z][A-Z ]*[A-Z]|\[[^\]]+\])?\s", line)
        if m and m.group(1) in ("--targets", "--db", "--out", "--model", "--data", "--limit", "--select",
                                "--mode", "--calibration-count"):
            assert m.group(2) in ("PATH", "TEXT", "INTEGER", "INTEGER RANGE"), line


def test_help_shows_the_metavar_of_each_type():
    out = CliRunner().invoke(app, ["convert", "-h"], env=WIDE).output
    assert re.search(r"--calibration-count\s+INTEGER", out) and re.search(r"-o, --out\s+PATH", out)
    assert re.search(r"--mode\s+TEXT", out) and re.search(r"--json\s+print only", out)
    assert re.search(r"MODEL\s+PATH", out)
    assert re.search(r"--limit\s+INTEGER RANGE", CliRunner().invoke(app, ["history", "-h"], env=WIDE).output)


def test_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"edgepipe {metadata.version('edgepipe')}"


# ---- tables at 80 columns ----
LONG = "pi4-kitchen-counter-west-01"


def _device(name: str, ok: bool = True) -> DeviceResult:
    if not ok:
        return DeviceResult.failure(name, "edgetpu", "int8", "edgetpu_unavailable", "no Edge TPU found")
    result = {"latency_ms": {"p50": 12.3456, "p90": 15.25}, "accuracy": {"top1": 0.9815}, "agreement": {"top1": 1.0},
              "runtime": {"name": "tflite-runtime", "version": "2.14.0"},
              "delegate": {"requested": "edgetpu", "used": "cpu", "fallback": True}}
    return DeviceResult(name, "cpu", "dynamic", True, result=result, bytes_sent=123_456_789)


def _render(renderable, width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), color_system=None, highlight=False)
    console.print(renderable)
    return console.file.getvalue().splitlines()


def test_run_table_fits_80_columns_without_cutting_a_value():
    from pipeline.cli.run_cmd import device_table

    run = RunResult(run_id="20261201-223417-616c3a", devices=[_device(LONG), _device("coral", ok=False)])
    lines = _render(device_table(run, 80), 80)
    text = "\n".join(lines)
    assert max(map(len, lines)) <= 80 and "…" not in text
    row = next(ln for ln in lines if ln.startswith(LONG)).split()
    assert row[0] == LONG and "ok" in row and "12.346" in row and "0.982" in row    # whole name, whole figures
    assert "edgetpu_unavailable" in text
    note = next(i for i, ln in enumerate(lines) if ln.startswith("not shown at 80 columns:"))
    hidden = " ".join(lines[note:])                                                  # the note may wrap
    assert "sent" in hidden and "accelerator" in hidden                              # what is missing is named
    wide = "\n".join(_render(device_table(run, 200), 200))
    assert "not shown" not in wide and "117.7 MiB" in wide and "cpu (FALLBACK from edgetpu)" in wide


def test_fitted_table_hides_least_important_columns_first_and_wraps_only_at_spaces():
    from pipeline.cli.tables import Col, fitted_table

    cols = [Col("name"), Col("a", 1), Col("b", 2), Col("notes", 3, wrap=True)]
    rows = [["x" * 30, "A" * 20, "B" * 20, "several short words that may wrap"]]
    assert max(map(len, _render(fitted_table("t", cols, rows, 80), 80))) <= 80
    seen = "\n".join(_render(fitted_table("t", cols, rows, 60), 60))
    assert "A" * 20 in seen and "B" * 20 not in seen and "notes" not in seen.split("\n")[1]
    assert "not shown at 60 columns: b, notes" in seen
    narrow = "\n".join(_render(fitted_table("t", cols, rows, 84), 84))   # 30 + 20 + 20 + "several" + gaps
    assert "several" in narrow and "wrap" in narrow and "B" * 20 in narrow   # notes wrapped, nothing hidden


def test_board_prints_one_plain_line_per_stage_without_a_terminal(capsys):
    from pipeline.cli.fleet_cmd import DeviceBoard

    with DeviceBoard(["pi"], "edgepipe run") as board:
        board("pi", "push", "2048 bytes needed")
        board("pi", "push", "sent 2048 bytes")
        board("pi", "run", "agent.py")
        board("pi", "done", "ok")
    assert capsys.readouterr().err.splitlines() == [
        "edgepipe run: pi: push: 2048 bytes needed", "edgepipe run: pi: run: agent.py", "edgepipe run: pi: done: ok"]
