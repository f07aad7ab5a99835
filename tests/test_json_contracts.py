"""Contracts for scripts: every command's --json document has the shape docs/json.md writes down; with --json every
exit prints one JSON object (errors too, for every command, future ones included); a closed stdout never changes
the exit code; help is plain text in a pipe and `run -h` fits a screen; the model is an argument or --model.

The fleet is one `transport: local` device (the LiteRT device venv) measuring the float digits .tflite: no
TensorFlow runs, a run takes seconds. The interrupted run's JSON (130/143) is checked in tests/test_interrupt.py,
with a real signal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import _load_commands, app
from pipeline.cli.app import EdgepipeGroup, emit_json, handle_errors
from pipeline.errors import EdgepipeError
from tests.json_shapes import check

ROOT = Path(__file__).resolve().parents[1]
LITERT = ROOT / ".venv-devices" / "litert" / "bin" / "python"
EDGEPIPE = [sys.executable, "-m", "pipeline.cli"]
BOX = set("╭╮╰╯│─┌┐└┘")


@pytest.fixture(scope="module")
def cli():
    _load_commands()
    return CliRunner()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A targets.yaml with one local device and its history, and one whose only device does not exist."""
    d = tmp_path_factory.mktemp("json-local")
    (d / "targets.yaml").write_text(
        f"db: {d / 'results.db'}\ntargets:\n"
        f"  - {{name: here, transport: local, kind: cpu, python: {LITERT}, workdir: {d / 'device'}, runs: 10,"
        " warmup: 1}\n")
    (d / "ghost.yaml").write_text(f"db: {d / 'ghost.db'}\ndefaults: {{connect_timeout: 2, retries: 0}}\n"
                                  "targets:\n  - {name: ghost, host: 127.0.0.1, port: 1, kind: cpu}\n")
    (d / "strict.yaml").write_text((d / "targets.yaml").read_text() + "gates: {max_p50_ms: 0.000001}\n")
    return d


@pytest.fixture(scope="module")
def ran(cli, local, tiny_artifact, tiny_eval):
    """One passing run (the model given as the first argument), its JSON document."""
    r = cli.invoke(app, ["run", str(tiny_artifact.path), "--targets", str(local / "targets.yaml"), "--data",
                         str(tiny_eval), "--out", str(local / "out"), "--baseline", "none", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def one_object(r) -> dict:
    """The run's stdout is exactly one JSON object."""
    (line,) = [ln for ln in r.stdout.splitlines() if ln.strip()]
    return json.loads(line)


def test_every_command_prints_the_shape_docs_json_md_writes_down(cli, local, ran, tiny_artifact, digits,
                                                                  conversion_cache):
    targets, db = str(local / "targets.yaml"), str(local / "results.db")
    check("run", ran)
    check("fleet validate", one_object(cli.invoke(app, ["fleet", "validate", "-t", targets, "--json"])))
    probed = cli.invoke(app, ["fleet", "check", "-t", targets, "--json"])
    assert probed.exit_code == 0, probed.output
    check("fleet check", one_object(probed))
    converted = cli.invoke(app, ["convert", str(digits.model_path), "--mode", "float32", "--cache-dir",
                                 str(conversion_cache), "--out", str(local / "conv"), "--json"])
    assert converted.exit_code == 0 and one_object(converted)["artifacts"][0]["cached"], converted.output
    check("convert", one_object(converted))
    gated = cli.invoke(app, ["gate", ran["run_id"], "-t", targets, "--baseline", "none", "--record", "--json"])
    assert gated.exit_code == 0, gated.output
    check("gate", one_object(gated))
    shown = one_object(cli.invoke(app, ["show", ran["run_id"], "--db", db, "--json"]))
    check("show", shown)
    check("run", shown, only=("devices[]", "verdict", "verdict.checks[]"))   # show's devices and verdict are run's
    assert [v["origin"] for v in shown["verdicts"]] == ["run", "gate"]
    check("history", one_object(cli.invoke(app, ["history", "--db", db, "--json"])))
    check("error", one_object(cli.invoke(app, ["show", "nosuch", "--db", db, "--json"])))


def test_with_json_every_exit_prints_one_object(cli, local, ran):
    targets = str(local / "targets.yaml")
    failed = cli.invoke(app, ["gate", ran["run_id"], "-t", str(local / "strict.yaml"), "--baseline", "none",
                              "--json"])
    assert failed.exit_code == 1 and one_object(failed)["passed"] is False and one_object(failed)["recorded"] is False
    nothing = cli.invoke(app, ["fleet", "check", "-t", str(local / "ghost.yaml"), "--json"])
    assert nothing.exit_code == 3 and one_object(nothing)["devices"][0]["error"]["code"] == "unreachable"
    cases = {   # exit 2: bad input found by the library, and bad usage found by the command line parser
        "config": ["fleet", "validate", "-t", str(local / "nosuch.yaml"), "--json"],
        "usage": ["run", "--targets", targets, "--nosuch", "--json"],
    }
    for code, args in cases.items():
        r = cli.invoke(app, args)
        err = one_object(r)["error"]
        assert r.exit_code == err["exit_code"] == 2 and err["code"] == code, r.output
        check("error", one_object(r))
        assert err["message"] in r.stderr if code == "config" else "No such option" in r.stderr
    missing = cli.invoke(app, ["run", "--targets", targets, "--data", "x.npz", "--json"])
    assert missing.exit_code == 2 and one_object(missing)["error"]["field"] == "MODEL"


class NoHistory(EdgepipeError):
    exit_code = 4
    code = "db_unavailable"


def test_a_new_command_gets_the_json_error_contract_without_doing_anything():
    """What issue 20's deploy (or any later command) gets from the CLI layer: exit 4 (issue 19's code), an error
    raised without @handle_errors, an interrupt, a crash: one JSON object each, and the exit code stays its own."""
    extra = typer.Typer(cls=EdgepipeGroup)

    @extra.command("deploy")
    @handle_errors
    def deploy(as_json: bool = typer.Option(False, "--json")) -> None:
        raise NoHistory("the results database stayed unreachable for 30 s", hint="start PostgreSQL")

    @extra.command("rollback")
    def rollback(as_json: bool = typer.Option(False, "--json"), how: str = "ok") -> None:
        if how == "interrupt":
            raise KeyboardInterrupt
        if how == "crash":
            raise RuntimeError("a bug")
        if how == "late":
            emit_json(json.dumps({"done": True}))
            raise NoHistory("after the document")
        raise NoHistory("no history", file="targets.yaml")

    runner = CliRunner()
    for args, code, exit_code in [(["deploy"], "db_unavailable", 4), (["rollback"], "db_unavailable", 4),
                                  (["rollback", "--how", "interrupt"], "interrupted", 130),
                                  (["rollback", "--how", "crash"], "internal", 1)]:
        r = runner.invoke(extra, args + ["--json"])
        err = one_object(r)["error"]
        assert (r.exit_code, err["code"], err["exit_code"]) == (exit_code, code, exit_code), r.output
        check("error", one_object(r))
    assert one_object(runner.invoke(extra, ["deploy", "--json"]))["error"]["hint"] == "start PostgreSQL"
    late = runner.invoke(extra, ["rollback", "--how", "late", "--json"])
    assert late.exit_code == 4 and one_object(late) == {"done": True}      # never a second object
    plain = runner.invoke(extra, ["deploy"])
    assert plain.exit_code == 4 and plain.stdout == "" and "unreachable" in plain.stderr


def _closed_stdout(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run edgepipe with its stdout's reader gone before it writes a byte (what `| head -1` does, early)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100")
    with open(cwd / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(EDGEPIPE + args, stdout=subprocess.PIPE, stderr=err, cwd=cwd, env=env)
        proc.stdout.close()
        rc = proc.wait(timeout=600)
    return rc, (cwd / "stderr.txt").read_text()


def test_a_closed_stdout_never_changes_the_exit_code(local, tiny_artifact, tiny_eval, tmp_path):
    run = ["run", str(tiny_artifact.path), "--targets", str(local / "targets.yaml"), "--data", str(tiny_eval),
           "--out", str(tmp_path / "out"), "--db", str(tmp_path / "r.db"), "--baseline", "none", "--label", "piped"]
    rc, err = _closed_stdout(run, tmp_path)
    assert rc == 0 and "Traceback" not in err, err
    from pipeline.release.store import Store

    with Store(tmp_path / "r.db") as store:    # the whole job was done: measured, stored, gated
        (info,) = store.history().runs
    assert info.complete and info.passed is True and info.label == "piped"
    rc, err = _closed_stdout(["fleet", "check", "-t", str(local / "ghost.yaml")], tmp_path)
    assert rc == 3 and "Traceback" not in err, err
    rc, err = _closed_stdout(["show", "last", "--db", str(tmp_path / "r.db"), "--json"], tmp_path)
    assert rc == 0 and "Traceback" not in err, err


def test_help_is_plain_text_in_a_pipe_and_run_h_fits_a_screen(cli):
    piped = subprocess.run(EDGEPIPE + ["run", "-h"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env=dict(os.environ, COLUMNS="80"))
    assert piped.returncode == 0 and not BOX & set(piped.stdout), piped.stdout
    lines = piped.stdout.splitlines()
    assert len(lines) <= 60 and max(map(len, lines)) <= 80, len(lines)
    for flag in ("--targets", "--data", "--model", "--mean", "--channels", "--preprocess", "--image-dtype"):
        assert flag in piped.stdout, flag   # the image flags are named once, in the epilog
    for path in (["-h"], ["fleet", "-h"], ["gate", "-h"], ["convert", "-h"]):
        assert not BOX & set(cli.invoke(app, path).output), path


def test_the_model_is_an_argument_or_model_in_every_command(cli, local, digits, conversion_cache):
    forms = [[str(digits.model_path), "--mode", "float32"], ["--model", str(digits.model_path), "-m", "float32"]]
    shas = set()
    for form in forms:   # convert: MODEL or --model; -m keeps meaning --mode there
        r = cli.invoke(app, ["convert", *form, "--cache-dir", str(conversion_cache), "--out",
                             str(local / "forms"), "--json"])
        assert r.exit_code == 0, r.output
        shas |= {a["sha256"] for a in one_object(r)["artifacts"]}
    assert len(shas) == 1
    ghost = ["--targets", str(local / "ghost.yaml"), "--data", str(digits.eval_path), "-c",
             str(digits.calibration_path), "--cache-dir", str(conversion_cache), "--json"]
    for form in (["--model", str(digits.model_path)], ["-m", str(digits.model_path)], [str(digits.model_path)]):
        r = cli.invoke(app, ["run", *form, *ghost])   # run: the old -m too; the ghost device makes it exit 3
        assert r.exit_code == 3 and one_object(r)["devices"][0]["error"]["code"] == "unreachable", r.output
    both = cli.invoke(app, ["run", str(digits.model_path), "--model", str(digits.eval_path), *ghost])
    assert both.exit_code == 2 and "two models given" in one_object(both)["error"]["message"]
    for args in (["optimize", "--model", str(digits.model_path)], ["optimize", str(digits.model_path)]):
        r = cli.invoke(app, [*args, *ghost, "--objective", "nosuch"])   # got past the model to the objective
        assert r.exit_code == 2 and one_object(r)["error"]["field"] == "--objective", r.output
    r = cli.invoke(app, ["optimize", *ghost])
    assert r.exit_code == 2 and one_object(r)["error"]["message"].startswith("MODEL: no model given")
