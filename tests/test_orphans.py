"""An agent never outlives the one who started it, and never measures beside another (issue 19), on real sshd
devices with the real agent:

- `kill -9` of `edgepipe run` while its agent measures: the agent stops (its stdin closed), the next run on the
  same device measures alone (the agents' own timestamps, `ps` on the device), the killed run is `abandoned`;
- an SSH drop before the agent's pid reached the host: the retry waits for that agent on the board's lock and
  fetches its result, never starting a second one; if it outlasts the timeout it is ended by the lock file's pid.

Slow agents are slow by construction (their timed phase waits for a file the test writes, pipeline.testing.agents);
the sshd session process of a dropped connection is frozen (SIGSTOP) to stand for a link whose far end has not
noticed the drop. Timeouts below only catch a hang.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import _load_commands, app
from pipeline.devices.fleet import DeviceJob, FleetRunner
from pipeline.devices.transport.ssh import SSHTransport
from pipeline.inventory import load_inventory
from pipeline.testing.agents import gate_log, gated_python
from pipeline.testing.faults import Faults
from pipeline.testing.sshd import pid_alive, write_targets_yaml
from tests.fixtures.fleet import FLEET_PYTHONS, ROOT, wait_until

SAFETY = 300.0


@pytest.fixture(scope="module")
def fleet(sshd_fleet):
    return sshd_fleet(2, pythons=[FLEET_PYTHONS[0]], prefix="orphan")


@pytest.fixture(scope="module")
def eval_file(digits, tmp_path_factory):
    p = tmp_path_factory.mktemp("orphan-eval") / "eval.npz"
    np.savez(p, x=digits.x_eval[:20], y=digits.y_eval[:20])
    return p


def agents_on(device, target) -> list[int]:
    """`ps` on the device: the agent processes measuring from this work directory."""
    with SSHTransport(target) as ssh:
        out = ssh.run(["ps", "-eo", "pid=,stat=,args="], timeout=30).stdout.decode()
    found = []
    for line in out.splitlines():
        pid, state, args = line.strip().split(None, 2)
        if "--model" in args.split() and f"{target.workdir}/agent/" in args and not state.startswith("Z"):
            found.append(int(pid))
    return found


def waiting(gate: Path, known: set[int]) -> list[int]:
    return [int(p.name.split("-")[1]) for p in gate.glob("measuring-*") if int(p.name.split("-")[1]) not in known]


def start_run(tmp_path: Path, name: str, targets: Path, db: Path, digits, eval_file, cache) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--targets", str(targets), "--model", str(digits.model_path),
           "--data", str(eval_file), "--out", str(tmp_path / "out"), "--cache-dir", str(cache), "--db", str(db),
           "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), EDGEPIPE_LEASE_TTL="2")   # a dead holder lapses in 2 s
    with open(tmp_path / f"{name}.out", "wb") as out, open(tmp_path / f"{name}.err", "wb") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=tmp_path)


def wait_or_fail(cond, proc: subprocess.Popen, what: str) -> None:
    end = time.monotonic() + SAFETY
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"edgepipe run exited before {what} ({proc.returncode})")
        if time.monotonic() > end:
            pytest.fail(f"{what} never happened")
        time.sleep(0.05)


def test_kill_9_of_edgepipe_ends_its_agent_and_the_next_run_measures_alone(fleet, digits, eval_file, tmp_path,
                                                                           conversion_cache):
    dev = fleet[0]
    gate = tmp_path / "gate"
    py = gated_python(tmp_path / "gated-python", dev.python, gate)
    targets = write_targets_yaml([dev], tmp_path / "targets.yaml",
                                 per_device={dev.name: {"python": py, "workdir": str(tmp_path / "wd")}},
                                 defaults={"runs": 3, "warmup": 1, "timeout": SAFETY, "retries": 0})
    target = load_inventory(targets).targets[0]
    db = tmp_path / "results.db"
    first = start_run(tmp_path, "first", targets, db, digits, eval_file, conversion_cache)
    try:
        wait_or_fail(lambda: waiting(gate, set()), first, "the first agent measuring")
        (pid_a,) = waiting(gate, set())
        lock = tmp_path / "wd" / "agent.lock"
        pid_file = json.loads(lock.read_text()) if lock.exists() else {}
        os.kill(first.pid, signal.SIGKILL)           # the orchestrator dies without a word
        first.wait(timeout=SAFETY)
        wait_until(lambda: not pid_alive(pid_a), "the first agent stopping once its host was gone", limit=60)
        assert pid_file.get("pid") == pid_a and pid_file["owner"].endswith(f"/{dev.name}")   # written before measuring
        second = start_run(tmp_path, "second", targets, db, digits, eval_file, conversion_cache)
        wait_or_fail(lambda: waiting(gate, {pid_a}), second, "the second agent measuring")
        (pid_b,) = waiting(gate, {pid_a})
        assert agents_on(dev, target) == [pid_b]     # alone on the board while it measures
        (gate / "go").touch()
        assert second.wait(timeout=SAFETY) == 0, (tmp_path / "second.err").read_text()[-2000:]
    finally:
        for p in (first, *([second] if "second" in locals() else [])):
            if p.poll() is None:
                p.kill()
                p.wait()
        (gate / "go").touch()
    log = gate_log(gate)
    (a_end,) = [t for what, pid, t in log if what == "exit" and pid == pid_a]
    doc = json.loads((tmp_path / "second.out").read_text())
    stamps = doc["devices"][0]["result"]["timestamps"]
    assert a_end <= stamps["timed_from"] <= stamps["timed_to"]   # no overlap, on the agents' own clocks
    assert agents_on(dev, target) == []                          # nothing left running on the device
    _load_commands()
    history = CliRunner().invoke(app, ["history", "--db", str(db), "--json"])
    runs = {r["run_id"]: r for r in json.loads(history.stdout)["runs"]}
    (killed,) = [r for r in runs.values() if r["run_id"] != doc["run_id"]]
    assert killed["incomplete_reason"] == "abandoned" and not killed["complete"]
    assert runs[doc["run_id"]]["complete"]
    assert "abandoned" in CliRunner().invoke(app, ["history", "--db", str(db)]).stdout
    assert "ABANDONED" in CliRunner().invoke(app, ["show", killed["run_id"], "--db", str(db)]).stdout


def _gone_within(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while pid_alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def _drop_before_pid(frozen: list[int]) -> Faults:
    """Cut the link as the agent starts, before its pid reaches the host, with the device's end of it frozen (so
    the agent's stdin stays open: the device has not noticed the drop)."""
    def freeze(pid: int) -> None:
        session = int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])   # its sshd
        os.kill(session, signal.SIGSTOP)
        frozen.append(session)

    return Faults(drop="before_pid", on_pid=freeze)


def _job(inv, tiny_artifact, eval_file) -> list[DeviceJob]:
    return [DeviceJob(t, Path(tiny_artifact.path), Path(eval_file),
                      artifact_info={"sha256": tiny_artifact.sha256, "bytes": tiny_artifact.bytes}) for t in inv.targets]


@pytest.mark.parametrize("outlasts", [False, True], ids=["waited-for", "outlasts-timeout"])
def test_an_ssh_drop_before_the_pid_arrives_never_starts_a_second_agent(outlasts, fleet, tiny_artifact, eval_file,
                                                                         tmp_path):
    dev = fleet[1]
    gate = tmp_path / "gate"
    py = gated_python(tmp_path / "gated-python", dev.python, gate)
    timeout = 5 if outlasts else SAFETY
    inv = load_inventory(write_targets_yaml([dev], tmp_path / "targets.yaml", per_device={dev.name: {
        "python": py, "workdir": str(tmp_path / "wd"), "timeout": timeout, "retries": 1}}))
    frozen: list[int] = []
    faults = _drop_before_pid(frozen)
    events: list[tuple[str, str, str]] = []
    out: dict = {}
    runner = FleetRunner(run_id="drop", backoff=0.05, transport_factory=faults.factory(),
                         on_event=lambda *e: events.append(e))
    worker = threading.Thread(target=lambda: out.update(res=runner.run(_job(inv, tiny_artifact, eval_file))[0]))
    worker.start()
    try:
        wait_until(lambda: waiting(gate, set()), "the first agent measuring", limit=SAFETY)
        (pid_1,) = waiting(gate, set())
        if outlasts:
            os.kill(pid_1, signal.SIGSTOP)   # hung: it cannot stop itself, by its deadline or otherwise
        wait_until(lambda: any("earlier attempt's agent" in d for _, _, d in events) or waiting(gate, {pid_1}),
                   "the retry waiting for the first agent", limit=SAFETY)
        assert not waiting(gate, {pid_1}), "a second agent started while the first was still measuring"
        if not outlasts:
            (gate / "go").touch()
        worker.join(timeout=SAFETY)
    finally:
        (gate / "go").touch()
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        worker.join(timeout=SAFETY)
        first_gone = "pid_1" in locals() and _gone_within(pid_1, 30)
        if "pid_1" in locals() and not first_gone:   # never leave a stopped agent behind, even when this fails
            os.kill(pid_1, signal.SIGKILL)
    res = out["res"]
    assert faults.drops == 1 and res.attempts == 2
    assert [pid for what, pid, _ in gate_log(gate) if what == "enter"] == [pid_1]   # one agent ever measured
    assert first_gone   # ended by the host (outlasts) or finished (waited for)
    if outlasts:
        assert not res.ok and res.error.code == "timeout" and f"pid {pid_1}, from the board's lock file" in \
            res.error.message
    else:
        assert res.ok, res.error
        assert any("earlier attempt left" in d for _, s, d in events if s == "collect")
        assert res.result["lock"]["path"].endswith("agent.lock")
