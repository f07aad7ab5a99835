"""Safe interruption (issue 10 item 4): Ctrl-C or SIGTERM during `edgepipe run` over real sshd devices.

The slow devices are slow by construction (ten million timed invokes); the signal goes out once their agents
exist on the devices and the fast device's result is stored, so nothing here depends on the machine's speed.
Timeouts below only catch a hang.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import _load_commands, app
from pipeline.devices.cancel import CancelToken
from pipeline.devices.fleet import DeviceJob, FleetRunner
from pipeline.inventory import load_inventory
from pipeline.release.store import Store
from pipeline.results import DeviceResult, RunResult
from pipeline.testing.sshd import write_targets_yaml
from tests.fixtures.fleet import FLEET_PYTHONS, ROOT

SLOW_RUNS = 10_000_000  # minutes of work for any CPU: the agent is surely still measuring when the signal comes
SAFETY = 300.0          # seconds; only ever reached when something hangs


@pytest.fixture(scope="module")
def fleet(sshd_fleet):
    return sshd_fleet(3, pythons=[FLEET_PYTHONS[0]], prefix="intr")  # one runtime: one conversion


@pytest.fixture(scope="module")
def eval_file(digits, tmp_path_factory):
    p = tmp_path_factory.mktemp("intr-eval") / "eval.npz"
    np.savez(p, x=digits.x_eval[:20], y=digits.y_eval[:20])
    return p


def agent_pids(workdir: Path) -> list[int]:
    """Live agent processes (measuring, not probing) started from this work directory."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(") ", 1)[1][:1]
        except OSError:
            continue
        words = [a.decode("utf-8", "replace") for a in argv]
        if state != "Z" and "--model" in words and any(w.startswith(f"{workdir}/agent/") for w in words):
            found.append(int(proc.name))
    return found


def stored_targets(db: Path) -> list[str]:
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        try:
            return [r[0] for r in con.execute("SELECT target FROM device_results")]
        except sqlite3.OperationalError:  # the schema is being created
            return []


def wait_for(cond, proc: subprocess.Popen, stderr: Path) -> None:
    end = time.monotonic() + SAFETY
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"edgepipe run exited early with {proc.returncode}: {stderr.read_text()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("the slow agents never started")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_the_run_kills_the_agents_and_keeps_what_finished(sig, fleet, digits, eval_file, tmp_path,
                                                                       conversion_cache):
    fast, slow = fleet[0], fleet[1:]
    local_wd = tmp_path / "local-wd"
    targets = write_targets_yaml(
        fleet, tmp_path / "targets.yaml",
        defaults={"runs": 3, "warmup": 1, "timeout": 900, "retries": 0, "connect_timeout": 5},
        per_device={d.name: {"runs": SLOW_RUNS} for d in slow},
        targets=[{"name": "here", "transport": "local", "python": FLEET_PYTHONS[0], "workdir": str(local_wd),
                  "kind": "cpu", "runs": SLOW_RUNS}])
    db = tmp_path / "results.db"
    err = tmp_path / "stderr.txt"
    slow_dirs = [d.workdir for d in slow] + [local_wd]
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--targets", str(targets), "--model", str(digits.model_path),
           "--data", str(eval_file), "--out", str(tmp_path / "out"), "--cache-dir", str(conversion_cache),
           "--db", str(db), "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(tmp_path / "stdout.txt", "wb") as out, open(err, "wb") as errf:
        proc = subprocess.Popen(cmd, stdout=out, stderr=errf, env=env, cwd=tmp_path)
    try:
        wait_for(lambda: fast.name in stored_targets(db) and all(agent_pids(w) for w in slow_dirs), proc, err)
        running = {str(w): agent_pids(w) for w in slow_dirs}
        proc.send_signal(sig)
        rc = proc.wait(timeout=SAFETY)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in slow_dirs:  # never leave a runaway agent behind, even when the test fails
            for pid in agent_pids(w):
                os.kill(pid, signal.SIGKILL)

    stderr = err.read_text()
    assert rc == 128 + sig, stderr[-2000:]
    assert "Traceback" not in stderr
    said = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(said) == 1 and said[0].startswith(f"interrupted by {sig.name}: run "), stderr[-2000:]

    # every agent that was still measuring is gone from its device (the local one too)
    assert {w: agent_pids(Path(w)) for w in running} == {w: [] for w in running}, running

    with Store(db) as store:
        (info,) = store.history().runs
        run = store.load_run(info.run_id)
        assert store.resolve_baseline("last") is None  # an interrupted run is never a baseline
    assert info.interrupted == sig.name and not info.complete
    assert [d.name for d in run.devices] == [fast.name] and run.devices[0].ok  # what finished is kept
    assert "1 of 4 device result(s) kept" in said[0]
    for d in slow:  # the killed agents never wrote a result
        assert not (d.workdir / "runs" / info.run_id / f"{d.name}.json").exists()

    _load_commands()
    cli = CliRunner()
    shown = cli.invoke(app, ["show", info.run_id, "--db", str(db), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["interrupted"] == sig.name
    shown = cli.invoke(app, ["show", info.run_id, "--db", str(db)])
    assert f"INTERRUPTED by {sig.name}" in shown.stdout
    listed = cli.invoke(app, ["history", "--db", str(db)], env={"COLUMNS": "200"})
    assert "interrupted" in listed.stdout
    row = next(line for line in listed.stdout.splitlines() if line.startswith(info.run_id))
    assert " 1/4 " in row    # one device measured of the four the run set out to measure (never "1/1")
    # --json: the one object on stdout is the interruption, with the run as stored
    (doc,) = [json.loads(line) for line in (tmp_path / "stdout.txt").read_text().splitlines()]
    assert doc["error"]["code"] == "interrupted" and doc["error"]["exit_code"] == 128 + sig
    assert doc["run"]["run_id"] == info.run_id and [d["name"] for d in doc["run"]["devices"]] == [fast.name]


def test_cancel_token_stops_the_fleet_without_a_signal(fleet, tiny_artifact, tiny_eval, tmp_path):
    """The library's side alone: a token cancelled from another thread, as an embedding program would."""
    fast, slow = fleet[0], fleet[1]
    local_wd = tmp_path / "local-wd"
    inv = load_inventory(write_targets_yaml(
        [fast, slow], tmp_path / "targets.yaml",
        defaults={"runs": 3, "warmup": 1, "timeout": 900, "retries": 0, "connect_timeout": 5},
        per_device={slow.name: {"runs": SLOW_RUNS, "workdir": str(tmp_path / "slow-wd")}},
        targets=[{"name": "here", "transport": "local", "python": FLEET_PYTHONS[0], "workdir": str(local_wd),
                  "kind": "cpu", "runs": SLOW_RUNS}]))
    slow_dirs = [tmp_path / "slow-wd", local_wd]
    cancel, reported = CancelToken(), []

    def watch() -> None:
        end = time.monotonic() + SAFETY
        while not (reported and all(agent_pids(w) for w in slow_dirs)) and time.monotonic() < end:
            time.sleep(0.05)
        cancel.cancel()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    jobs = [DeviceJob(t, Path(tiny_artifact.path), Path(tiny_eval)) for t in inv.targets]
    try:
        results = FleetRunner(run_id="cancel-lib", cancel=cancel, on_result=reported.append).run(jobs)
    finally:
        cancel.cancel()
        watcher.join()
        for w in slow_dirs:
            for pid in agent_pids(w):
                os.kill(pid, signal.SIGKILL)
    assert [r.name for r in reported] == [fast.name] and reported[0].ok
    assert [r.error.code for r in results[1:]] == ["interrupted", "interrupted"]
    assert [agent_pids(w) for w in slow_dirs] == [[], []]


def _device(name: str, p50: float) -> DeviceResult:
    return DeviceResult(name=name, kind="cpu", mode="int8", ok=True, result={"latency_ms": {"p50": p50}})


def test_baseline_last_skips_an_interrupted_run(tmp_path):
    with Store(tmp_path / "r.db") as store:
        store.record_run(RunResult("done-1", [_device("a", 1.0)], started=100, finished=110))
        store.record_run(RunResult("stopped-2", [_device("a", 9.0)], started=200, complete=False,
                                   interrupted="SIGTERM"))
        store.begin_run("now-3", None, None, started=300)
        assert store.resolve_baseline("last", exclude="now-3").run_id == "done-1"
        assert store.load_run("stopped-2").interrupted == "SIGTERM"
        assert [r.interrupted for r in store.history().runs] == [None, "SIGTERM", None]
