"""The history survives outages (issue 19): a real PostgreSQL stopped and started again while a slow device
measures, through the real CLI; and an outage that outlasts `db_retry_s`: exit 4 with its own line, the run left
incomplete with the reason, the device's result kept on disk and stored by `edgepipe store --replay`.

The device is slow by construction: its agent (the real one) holds the board and waits for a file the test writes
before timing; the database goes down while it waits. Timeouts below only catch a hang.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.release.leases import held_now
from pipeline.release.store import Store
from pipeline.testing.agents import gated_python
from pipeline.testing.postgres import pg_bin, start_postgres
from pipeline.testing.sshd import write_targets_yaml
from tests.fixtures.fleet import FLEET_PYTHONS, ROOT

SAFETY = 300.0   # seconds; only reached when something hangs


@pytest.fixture(scope="module")
def pg():
    """A server of its own: these tests stop and start it."""
    if pg_bin() is None:
        pytest.skip("PostgreSQL server binaries are missing (apt-get install postgresql)")
    server = start_postgres()
    yield server
    if server.down:
        server.resume()
    server.stop()


@pytest.fixture(scope="module")
def device(sshd_fleet):
    return sshd_fleet(1, pythons=[FLEET_PYTHONS[0]], prefix="outage")[0]


@pytest.fixture(scope="module")
def eval_file(digits, tmp_path_factory):
    p = tmp_path_factory.mktemp("outage-eval") / "eval.npz"
    np.savez(p, x=digits.x_eval[:20], y=digits.y_eval[:20])
    return p


class Run:
    """`edgepipe run` as a user starts it, with a gated device."""

    def __init__(self, tmp_path: Path, device, db: str, digits, eval_file: Path, cache: Path, **top) -> None:
        self.gate = tmp_path / "gate"
        py = gated_python(tmp_path / "gated-python", device.python, self.gate)
        self.targets = write_targets_yaml([device], tmp_path / "targets.yaml",
                                          per_device={device.name: {"python": py, "workdir": str(tmp_path / "wd")}},
                                          defaults={"runs": 3, "warmup": 1, "timeout": SAFETY, "retries": 0})
        with open(self.targets, "a") as f:   # top-level fields of targets.yaml (e.g. db_retry_s)
            f.writelines(f"{k}: {v}\n" for k, v in top.items())
        self.out, self.err, self.db = tmp_path / "out", tmp_path / "stderr.txt", db
        cmd = [sys.executable, "-m", "pipeline.cli", "run", "--targets", str(self.targets), "--model",
               str(digits.model_path), "--data", str(eval_file), "--out", str(self.out), "--cache-dir", str(cache),
               "--db", db, "--json"]
        with open(tmp_path / "stdout.txt", "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                         cwd=tmp_path)
        self.stdout = tmp_path / "stdout.txt"

    def wait_for(self, cond, what: str) -> None:
        end = time.monotonic() + SAFETY
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(f"edgepipe run exited before {what} ({self.proc.returncode}): "
                            f"{self.err.read_text()[-2000:]}")
            if time.monotonic() > end:
                self.proc.kill()
                pytest.fail(f"{what} never happened")
            time.sleep(0.05)

    def spooled(self) -> list[Path]:
        return sorted((self.out / "spool").glob("*/device-*.json"))

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=SAFETY)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def test_postgres_restarting_mid_run_loses_nothing(pg, device, digits, eval_file, conversion_cache, tmp_path):
    db = pg.new_database()
    run = Run(tmp_path, device, db, digits, eval_file, conversion_cache)
    run.wait_for(lambda: any(run.gate.glob("measuring-*")), "the agent measuring")
    pg.halt()                                  # the server goes away while the device measures
    try:
        (run.gate / "go").touch()
        run.wait_for(run.spooled, "the collected result kept on disk")   # measured, collected, the database away
        time.sleep(0.5)                        # an outage of some length: the run keeps retrying meanwhile
    finally:
        pg.resume()
    rc = run.finish()
    stderr = run.err.read_text()
    assert rc == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    doc = json.loads(run.stdout.read_text())
    with Store(db) as store:
        info = store.run_info(doc["run_id"])
        stored = store.load_run(doc["run_id"])
        assert held_now(store.db) == []          # the lease was given back, not left to lapse
    assert info.complete and info.incomplete_reason is None and info.passed
    (dev,) = stored.devices
    assert dev.ok and dev.result["timestamps"] == doc["devices"][0]["result"]["timestamps"]
    assert run.spooled() == [] and not list((run.out / "spool").glob("*/*"))   # stored, so nothing waits on disk


def test_an_outage_longer_than_db_retry_s_exits_4_and_is_replayed_later(pg, device, digits, eval_file,
                                                                       conversion_cache, tmp_path):
    db = pg.new_database()
    run = Run(tmp_path, device, db, digits, eval_file, conversion_cache, db_retry_s=2)
    run.wait_for(lambda: any(run.gate.glob("measuring-*")), "the agent measuring")
    pg.halt()
    (run.gate / "go").touch()
    try:
        rc = run.finish()
    finally:
        pg.resume()
    stderr = run.err.read_text()
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 4, stderr[-2000:]
    assert "Traceback" not in stderr and len(lines) == 1
    assert "unreachable for 2s" in lines[0] and "store --replay" in lines[0] and "nothing measured is lost" in lines[0]
    (kept,) = run.spooled()
    measured = json.loads(kept.read_text())
    assert measured["ok"] and measured["result"]["samples_ms"]

    replay = subprocess.run([sys.executable, "-m", "pipeline.cli", "store", "--replay", "--out", str(run.out)],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            cwd=tmp_path, timeout=SAFETY)
    assert replay.returncode == 0, replay.stderr
    assert "stored 1 device result(s) and its end" in replay.stdout
    with Store(db) as store:
        (info,) = store.history().runs
        stored = store.load_run(info.run_id)
        assert store.resolve_baseline("last") is None          # an incomplete run is never a baseline
    assert not info.complete and info.incomplete_reason.startswith("db_unavailable")
    assert [d.to_dict() for d in stored.devices] == [measured]     # exactly what was measured
    assert not (run.out / "spool").exists() or not list((run.out / "spool").iterdir())


def test_a_deployment_is_recorded_across_a_postgresql_restart(pg):
    """A rollout's records go through the same retrying as a run's results: a deployment's state and steps written
    while the server restarts wait for it (here for about 2 s) instead of failing with `cannot record ...`."""
    with Store(pg.new_database("deploy")) as store:
        deps = store.deployments
        deps.begin("dep-outage", kind="deploy", run_id=None, model_name="m", spec={}, plan={})
        pg.halt()                                  # the next statement is a write, on a connection the server cut
        back = threading.Timer(2.0, pg.resume)
        back.start()
        try:
            deps.finish("dep-outage", "done", 0)
            deps.step("dep-outage", "pi", 1, "healthy")
        finally:
            back.join()
        record = deps.load("dep-outage")
        assert (record.state, record.exit_code, [s.state for s in record.steps]) == ("done", 0, ["healthy"])
        assert store.db.retries > 0 and store.db.reconnects >= 2   # it waited, and connected again
