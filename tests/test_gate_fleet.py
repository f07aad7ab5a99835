"""Gating real runs over the loopback sshd fleet: store as results arrive, gate each family, CLI exit codes,
JUnit parsed back, and a run killed halfway that keeps what its devices committed."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.release.gate import evaluate, gate_stored_run
from pipeline.inventory import load_inventory
from pipeline.run import execute
from pipeline.release.store import Store
from pipeline.testing.sshd import target_entry, write_targets_yaml
from tests.fixtures.postgres import DB_KINDS

ROOT = Path(__file__).resolve().parent.parent
LITERT = str(ROOT / ".venv-devices" / "litert" / "bin" / "python")
TFLITE_RT = str(ROOT / ".venv-devices" / "tflite-runtime" / "bin" / "python")
MODES = {"gw0": "float32", "gw1": "int8", "gw2": "float32"}


class Fleet:
    """Three real sshd devices (LiteRT, tflite-runtime, LiteRT) plus one unreachable target, and their stored runs."""

    def __init__(self, devices, tmp: Path, digits, db: str, cache: Path) -> None:
        self.devices, self.tmp, self.digits, self.cache = devices, tmp, digits, cache   # the session's conversions
        self.db = db  # a SQLite path or a PostgreSQL URL: the module runs once on each
        # A port bound but never listening refuses every connection, and nobody else can take it meanwhile.
        self._closed_port = socket.socket()
        self._closed_port.bind(("127.0.0.1", 0))
        ghost = target_entry(devices[0])
        ghost.update(name="ghost", port=self._closed_port.getsockname()[1])
        self.ghost = ghost

    def targets(self, name: str, gates: dict | None = None, per_device: dict | None = None,
                ghost: bool = True) -> Path:
        per = {d.name: {"mode": MODES[d.name]} for d in self.devices}
        for k, v in (per_device or {}).items():
            per[k].update(v)
        path = write_targets_yaml(self.devices, self.tmp / f"{name}.yaml",
                                  defaults={"runs": 60, "warmup": 3, "threads": 1},
                                  per_device=per, targets=[self.ghost] if ghost else [])
        doc = yaml.safe_load(path.read_text())
        doc["db"] = str(self.db)
        if gates:
            doc["gates"] = gates
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def run(self, run_id: str, targets: Path, started: float | None = None, label: str | None = None,
            model: Path | None = None, baseline: str | None = None):
        """What `edgepipe run` does with the store: begin, commit each device as it arrives, finish."""
        inv = load_inventory(targets)
        with Store(self.db) as store:
            base = store.load_run(baseline) if baseline else None
            store.begin_run(run_id, None, inv.sha256, label, started=started)
            result = execute(inv, model or self.digits.model_path, self.digits.eval_path,
                             calibration=self.digits.calibration_path, out_dir=self.tmp / "out",
                             cache_dir=self.cache, on_result=store.recorder(run_id), run_id=run_id,
                             baseline=base)
            for art in result.artifacts:
                store.add_artifact(run_id, art)
            store.set_float_top1(run_id, result.float_top1)
            store.finish_run(run_id)
        return result


@pytest.fixture(scope="module")
def gate_devices(sshd_fleet):
    return sshd_fleet(3, pythons=[LITERT, TFLITE_RT, LITERT], prefix="gw")


@pytest.fixture(scope="module", params=DB_KINDS)
def fleet(request, gate_devices, digits, digits_x10, tmp_path_factory, new_db, conversion_cache):
    f = Fleet(gate_devices, tmp_path_factory.mktemp("gate-fleet"), digits, new_db(request.param), conversion_cache)
    base = f.targets("base")
    f.run("base", base, started=time.time() - 60, label="v1")
    f.run("again", base)
    # A release whose model does ~10x the work (convs 4x wider, same predictions): every target, same runtime
    # and mode, one thread, really slower, on any CPU.
    f.run("slower", base, model=digits_x10, baseline="again")  # re-measures "again"'s model beside the new one
    yield f
    f._closed_port.close()


def _gate(fleet, run_id, gates, baseline=None):
    inv = load_inventory(fleet.targets(f"g-{abs(hash(repr(gates)))}", gates))
    with Store(fleet.db) as store:
        run = store.load_run(run_id)
        base = store.resolve_baseline(baseline, exclude=run_id) if baseline else None
    return evaluate(run, inv, base)


def test_every_device_result_was_committed_with_the_run(fleet):
    with Store(fleet.db) as store:
        run = store.load_run("base")
    assert run.complete and run.float_top1 is not None and run.artifacts
    by = {d.name: d for d in run.devices}
    assert set(by) == {"gw0", "gw1", "gw2", "ghost"}
    assert all(by[n].ok for n in ("gw0", "gw1", "gw2")), [d.error for d in run.devices]
    assert by["gw1"].result["runtime"]["name"] == "tflite-runtime" and by["gw1"].mode == "int8"
    assert not by["ghost"].ok and by["ghost"].error.code == "unreachable"
    assert len(by["gw0"].result["samples_ms"]) == 60


def test_per_target_gates_pass_and_fail_with_their_source(fleet):
    generous = {"max_fail_percent": 25, "max_p90_ms": 1000, "min_top1": 0.8, "max_top1_drop": 5,
                "min_agreement": 0.9, "min_snr_db": 10, "max_bytes": 5_000_000}
    ok = _gate(fleet, "base", generous)
    assert ok.passed and ok.exit_code == 0, [c.message() for c in ok.failures]
    strict = dict(generous, kinds={"cpu": {"max_bytes": 100_000}})
    bad = _gate(fleet, "base", strict)
    fails = {(c.target, c.gate): c for c in bad.failures}
    assert ("gw0", "max_bytes") in fails and ("gw1", "max_bytes") not in fails   # float32 ~150 KB, int8 ~45 KB
    assert fails[("gw0", "max_bytes")].source == "gates.kinds.cpu.max_bytes"
    assert bad.exit_code == 1


def test_fleet_gates(fleet):
    assert _gate(fleet, "base", {"max_fail_percent": 25}).exit_code == 0      # ghost is 1 of 4
    strict = _gate(fleet, "base", {"max_fail_percent": 10})
    [c] = [c for c in strict.failures if c.gate == "max_fail_percent"]
    assert c.measured == 25.0 and "ghost" in c.note and strict.exit_code == 1
    kinds = _gate(fleet, "base", {"max_fail_percent": 25, "require_all_kinds": ["cpu", "edgetpu"]})
    assert [c.threshold for c in kinds.failures if c.family == "fleet"] == [">= 1 measured edgetpu device"]
    assert kinds.exit_code == 1


def _gate_runs(fleet, run_id, gates, baseline_id):
    """Gate one stored run against another, both named by id."""
    inv = load_inventory(fleet.targets(f"g-{abs(hash(repr(gates)))}", gates))
    with Store(fleet.db) as store:
        return evaluate(store.load_run(run_id), inv, store.load_run(baseline_id))


def test_regression_against_the_baseline_run(fleet):
    strict = {"max_fail_percent": 25, "max_latency_regression": 0.10, "min_latency_regression_ms": 0}
    v = _gate(fleet, "slower", strict, baseline="again")
    reg = {c.target: c for c in v.checks if c.gate == "max_latency_regression"}
    assert set(reg) == {"gw0", "gw1", "gw2"} and v.baseline_run_id == "again"
    for c in reg.values():  # float32 on LiteRT, int8 on tflite-runtime: x3 to x8 slower, never within 10 %
        assert not c.passed and c.measured > 0.10 and "interleaved" in c.note, c.message()
    assert {c.gate for c in v.failures if c.family == "regression"} == {"max_latency_regression"}  # same answers
    assert v.exit_code == 1
    # The other way round is a speed-up, and a run against itself is no change: neither is a regression.
    assert _gate_runs(fleet, "again", strict, "slower").exit_code == 0
    assert _gate_runs(fleet, "again", strict, "again").exit_code == 0
    # Measuring the same model again is not flagged under a "more than 3x slower" limit: runs of a microsecond
    # model drift up to ~1.6x in their medians, far below it.
    coarse = _gate_runs(fleet, "again", dict(strict, max_latency_regression=2.0), "base")
    assert coarse.exit_code == 0, [c.message() for c in coarse.failures]
    with Store(fleet.db) as store:
        assert store.resolve_baseline("last", exclude="again").run_id == "base"
        assert store.resolve_baseline("v1", exclude="slower").run_id == "base"


def test_cli_gate_exit_codes_and_junit(fleet, tmp_path):
    from pipeline.cli import _load_commands, app

    _load_commands()
    runner = CliRunner()
    passing = fleet.targets("cli-pass", {"max_fail_percent": 25, "min_top1": 0.8})
    failing = fleet.targets("cli-fail", {"max_fail_percent": 25, "min_top1": 0.999})
    junit = tmp_path / "junit.xml"
    r = runner.invoke(app, ["gate", "base", "--targets", str(passing), "--baseline", "none"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["gate", "base", "--targets", str(failing), "--baseline", "none", "--junit", str(junit),
                            "--summary", str(tmp_path / "summary.md")])
    assert r.exit_code == 1 and "min_top1" in r.output
    root = ET.parse(junit).getroot()
    failed = {(c.get("classname"), c.get("name")) for c in root.iter("testcase") if c.find("failure") is not None}
    assert failed == {("edgepipe.gw0", "min_top1"), ("edgepipe.gw1", "min_top1"), ("edgepipe.gw2", "min_top1"),
                      ("edgepipe.fleet", "max_fail_percent")}
    # the unreachable device is an infrastructure <error> (its code as the type), not a gate <failure>
    (error,) = [c.find("error") for c in root.iter("testcase") if c.find("error") is not None]
    assert error.get("type") == "unreachable" and "ghost" in error.get("message")
    assert len(list(root.iter("testcase"))) == int(root.get("tests")) == 5
    assert (int(root.get("failures")), int(root.get("errors"))) == (4, 1)
    assert {s.get("name"): s.get("errors") for s in root.iter("testsuite")}["edgepipe.ghost"] == "1"
    msg = next(c.find("failure").get("message") for c in root.iter("testcase")
               if c.find("failure") is not None and c.get("name") == "min_top1")
    assert "threshold 0.999" in msg and "gates.min_top1" in msg and "measured 0.9" in msg
    summary = (tmp_path / "summary.md").read_text()
    assert "`min_top1`" in summary and "| p50 ms | p90 ms |" in summary
    with Store(fleet.db) as store:   # p50/p90 per device: the percentiles of the samples it measured
        samples = {d.name: d.result["samples_ms"] for d in store.load_run("base").devices if d.ok}
    for name, ms in samples.items():
        row = next(line for line in summary.splitlines() if line.startswith(f"| {name} |")).split("|")
        assert (row[3].strip(), row[4].strip()) == (f"{np.percentile(ms, 50):.3f}", f"{np.percentile(ms, 90):.3f}")
    assert next(line for line in summary.splitlines() if line.startswith("| ghost |")).split("|")[3].strip() == "-"
    r = runner.invoke(app, ["gate", "base", "--targets", str(passing), "--baseline", "no-such-tag"])
    assert r.exit_code == 2 and "no-such-tag" in r.output


def test_a_what_if_gate_never_changes_the_history_and_record_keeps_both_verdicts(fleet):
    """`gate` prints its verdict; only --record stores one, beside the run's own; history and show say which."""
    import json

    from pipeline.cli import _load_commands, app

    _load_commands()
    runner = CliRunner()
    passing = fleet.targets("own-pass", {"max_fail_percent": 25, "min_top1": 0.8})
    strict = fleet.targets("what-if", {"max_fail_percent": 25, "min_top1": 0.999})
    with Store(fleet.db) as store:   # the run's own verdict, as `edgepipe run` stores it
        gate_stored_run(store, "again", load_inventory(passing), baseline="none")

    def history() -> dict:
        r = runner.invoke(app, ["history", "--db", str(fleet.db), "--json"])
        return next(run for run in json.loads(r.stdout)["runs"] if run["run_id"] == "again")

    gate = ["gate", "again", "--db", str(fleet.db), "--targets", str(strict), "--baseline", "none"]
    r = runner.invoke(app, gate)
    assert r.exit_code == 1 and "FAILED" in r.output and "not recorded" in r.output, r.output
    assert (history()["passed"], history()["gate_verdicts"]) == (True, 0)        # the history did not change
    r = runner.invoke(app, gate + ["--record", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["recorded"] is True
    after = history()
    assert (after["passed"], after["exit_code"], after["verdict_origin"]) == (True, 0, "run")   # still its own
    assert (after["gate_verdicts"], after["gate_passed"], after["gate_exit_code"]) == (1, False, 1)
    table = runner.invoke(app, ["history", "--db", str(fleet.db)], env={"COLUMNS": "200"}).output
    assert "passed; gate: failed (exit 1)" in table and "gate --record" in table
    # the run's latency column says what it is: the median over its devices' p50 (3 devices + an unreachable one)
    assert "median p50 ms" in table and "the median of the devices' p50" in table
    with Store(fleet.db) as store:
        p50s = [d.result["latency_ms"]["p50"] for d in store.load_run("again").devices if d.ok]
    row = next(line for line in table.splitlines() if line.startswith("again "))
    assert row.split()[-1] == f"{float(np.median(p50s)):.3g}" and " 3/4 " in row, row
    shown = json.loads(runner.invoke(app, ["show", "again", "--db", str(fleet.db), "--json"]).stdout)
    assert shown["verdict"]["passed"] is True and shown["verdict_origin"] == "run"
    assert [(v["origin"], v["verdict"]["passed"]) for v in shown["verdicts"]] == [("run", True), ("gate", False)]
    assert shown["verdicts"][1]["targets"] == str(strict)
    text = runner.invoke(app, ["show", "again", "--db", str(fleet.db)], env={"COLUMNS": "200"}).output
    assert "verdict (the run's own, stored by `edgepipe run`): PASSED" in text
    assert f"verdict (stored by `edgepipe gate --record` at " in text and f"with {strict}): FAILED" in text


def test_no_device_measured_is_exit_3(fleet):
    only_ghost = fleet.tmp / "ghost.yaml"
    doc = yaml.safe_load(fleet.targets("g").read_text())
    doc["targets"] = [t for t in doc["targets"] if t["name"] == "ghost"]
    only_ghost.write_text(yaml.safe_dump(doc))
    fleet.run("dead", only_ghost)
    with Store(fleet.db) as store:
        _, _, verdict = gate_stored_run(store, "dead", load_inventory(only_ghost), baseline="none")
    assert verdict.exit_code == 3


KILLED_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from pipeline.inventory import load_inventory
    from pipeline.run import execute
    from pipeline.release.store import Store
    inv = load_inventory({targets!r})
    store = Store({db!r})
    store.begin_run("killed", None, inv.sha256)
    execute(inv, {model!r}, {data!r}, calibration={cal!r}, out_dir={out!r}, cache_dir={cache!r},
            on_result=store.recorder("killed"), run_id="killed")
    store.finish_run("killed")
""")


def test_a_run_killed_halfway_keeps_its_committed_devices(fleet, tmp_path):
    """gw2's Python hangs when asked to measure; once gw0 and gw1 are in the database, the run is killed."""
    release = tmp_path / "release"  # gw2 hangs until the test is over, however slow the others are
    hang = tmp_path / "hanging-python"
    hang.write_text(f'#!/bin/sh\ncase "$*" in *--model*) while [ ! -e {release} ]; do sleep 0.1; done; exit 1;; esac\n'
                    f'exec {LITERT} "$@"\n')
    hang.chmod(0o755)
    targets = fleet.targets("hang", per_device={"gw2": {"python": str(hang), "timeout": 300}}, ghost=False)
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(root=str(ROOT), targets=str(targets), db=str(fleet.db),
                                        model=str(fleet.digits.model_path), data=str(fleet.digits.eval_path),
                                        cal=str(fleet.digits.calibration_path),
                                        out=str(fleet.tmp / "out"), cache=str(fleet.cache)))
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        committed = 0
        while time.monotonic() < deadline and proc.poll() is None:
            with Store(fleet.db) as store:
                committed = store._row("SELECT COUNT(*) FROM device_results WHERE run_id='killed'")[0]
            if committed >= 2:
                break
            time.sleep(0.5)
        assert committed == 2 and proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        release.touch()
    with Store(fleet.db) as store:
        run = store.load_run("killed")
        info = store.run_info("killed")
        assert store.resolve_baseline("last").run_id != "killed"   # an incomplete run is never a baseline
    assert not run.complete and not info.complete
    assert sorted(d.name for d in run.devices) == ["gw0", "gw1"] and all(d.ok for d in run.devices)
    assert all(len(d.result["samples_ms"]) == 60 for d in run.devices)
