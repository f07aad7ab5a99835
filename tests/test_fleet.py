"""Fan-out over real sshd devices with the real agent, and the fault tests of issue 4.

Faults a real part cannot show (a dropped connection, a flipped byte) come from transport wrappers
(`pipeline.testing.faults`); a hung, slow, noisy or garbage-printing agent comes from a device "python" that is
a small script around the real one. Nothing here waits on a timer or bounds a wall-clock time: the order of
events is forced (a device script waits for a file the test creates), so it holds on any machine under any load.
"""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from pipeline.devices import push
from pipeline.devices.fleet import DeviceJob, FleetRunner
from pipeline.inventory import load_inventory
from pipeline.testing.faults import Faults
from pipeline.testing.sshd import pid_alive, stop, write_targets_yaml
from pipeline.devices.transport.ssh import SSHTransport
from tests.fixtures.fleet import wait_until

FAST = {"runs": 3, "warmup": 1, "timeout": 60, "retries": 0, "connect_timeout": 5}


@pytest.fixture(scope="module")
def fleet(sshd_fleet):
    return sshd_fleet(4)


def inventory(devices, tmp_path, name="targets.yaml", defaults=None, **kw):
    return load_inventory(write_targets_yaml(devices, tmp_path / name, defaults=dict(FAST, **(defaults or {})), **kw))


def jobs_for(inv, artifact, eval_file):
    return [DeviceJob(t, Path(artifact.path), Path(eval_file)) for t in inv.targets]


def runner(run_id, **kw):
    return FleetRunner(run_id=run_id, backoff=0.05, **kw)


def script_python(tmp_path: Path, name: str, real: str, body: str) -> str:
    """A device 'python' that behaves like `real` for `-c` helpers but runs `body` (sh) for the agent."""
    p = tmp_path / name
    p.write_text(f'#!/bin/sh\ncase "$1" in -c) exec {real} "$@";; esac\n{body}\n')
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return str(p)


def blob_path(dev, local: Path) -> Path:
    return dev.workdir / "blobs" / push.sha256_file(local)


def test_mixed_fleet_measures_everywhere_and_resends_nothing(fleet, tiny_artifact, tiny_eval, tmp_path):
    inv = inventory(fleet, tmp_path)
    events = []
    results = runner("mixed-1", on_event=lambda *e: events.append(e)).run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert [r.ok for r in results] == [True] * 4, [r.error for r in results]
    assert {r.result["runtime"]["name"] for r in results} == {"ai-edge-litert", "tflite-runtime"}
    assert all(r.result["latency_ms"]["n"] == r.result["runs_done"] == len(r.result["samples_ms"]) for r in results)
    assert {s for _, s, _ in events} >= {"connect", "push", "run", "collect", "done"}
    # the agent's own copy of the result sits in the run folder on each device
    for d in fleet:
        on_device = json.loads((d.workdir / "runs" / "mixed-1" / f"{d.name}.json").read_text())
        assert on_device["model"]["sha256"] == tiny_artifact.sha256
    again = runner("mixed-2").run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert all(r.ok for r in again) and sum(r.bytes_sent for r in again) == 0


def test_dropped_mid_push_leaves_no_partial_file_and_rerun_completes(fleet, tiny_artifact, tiny_eval, tmp_path,
                                                                     monkeypatch):
    dev = fleet[0]
    inv = inventory([dev], tmp_path)
    monkeypatch.setattr("pipeline.devices.transport.base.CHUNK", 16 << 10)  # so "half-way" happens mid-file
    final = blob_path(dev, Path(tiny_artifact.path))
    if final.exists():
        final.unlink()
    faults = Faults(drop="put", put_fraction=0.5)
    (res,) = runner("drop-1", transport_factory=faults.factory()).run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert faults.drops == 1 and not res.ok and res.error.code == "unreachable"
    assert 0 < res.bytes_sent < tiny_artifact.bytes
    assert not final.exists()  # no partial file under the final name
    (res,) = runner("drop-2").run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert res.ok
    assert push.sha256_file(final) == tiny_artifact.sha256


class FlippingTransport(SSHTransport):
    """Flips one byte of every uploaded file after it landed (the device's disk or the wire went bad)."""

    def put(self, local, remote, progress=None, **kw):
        n = super().put(local, remote, progress, **kw)
        p = Path(remote)  # loopback: the device's filesystem is ours
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        return n


def test_flipped_byte_is_caught_and_never_installed(fleet, tiny_artifact, tiny_eval, tmp_path):
    dev = fleet[1]
    inv = inventory([dev], tmp_path)
    final = blob_path(dev, Path(tiny_artifact.path))
    if final.exists():
        final.unlink()
    (res,) = runner("flip-1", transport_factory=FlippingTransport).run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert not res.ok and res.error.code == "push_failed" and "corrupt" in res.error.message
    assert not final.exists()
    assert list((dev.workdir / "tmp").iterdir()) == []  # the bad upload was removed too


def test_hung_agent_is_killed_at_its_deadline_and_others_finish(fleet, tiny_artifact, tiny_eval, tmp_path):
    pidfile = tmp_path / "hung.pid"
    # never returns by itself: only the deadline can end this run (a broken one fails after 600 s, not hangs)
    hung = script_python(tmp_path, "hung-python", fleet[0].python, f"echo $$ > {pidfile}; exec sleep 600")
    inv = inventory(fleet[:3], tmp_path, per_device={fleet[0].name: {"python": hung, "timeout": 5}})
    results = runner("hung").run(jobs_for(inv, tiny_artifact, tiny_eval))
    stuck = results[0]
    assert stuck.error.code == "timeout" and "5s" in stuck.error.message
    assert stuck.timings["run"] >= 5  # not before its deadline
    pid = int(pidfile.read_text())
    wait_until(lambda: not pid_alive(pid), f"killing the hung agent (pid {pid}) on the device")
    assert all(r.ok for r in results[1:])


NOISY = r'''
import json, subprocess, sys
p = subprocess.run([sys.executable] + sys.argv[1:], stdout=subprocess.PIPE)
doc = json.loads(p.stdout)
doc["padding"] = "x" * (5 << 20)
sys.stderr.write("e" * (5 << 20))
sys.stdout.write(json.dumps(doc))
'''


def test_five_mib_on_agent_stdout_and_stderr_no_deadlock(fleet, tiny_artifact, tiny_eval, tmp_path):
    (tmp_path / "noisy.py").write_text(NOISY)
    noisy = script_python(tmp_path, "noisy-python", fleet[2].python,
                          f'exec {fleet[2].python} {tmp_path / "noisy.py"} "$@"')
    inv = inventory([fleet[2]], tmp_path, per_device={fleet[2].name: {"python": noisy}})
    (res,) = runner("noisy").run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert res.ok, res.error
    assert len(res.result["padding"]) == 5 << 20


def test_unknown_then_changed_host_key_refused_with_zero_bytes(fleet, tiny_artifact, tiny_eval, tmp_path):
    dev, other = fleet[3], fleet[0]
    kh = tmp_path / "kh-empty"
    inv = inventory([dev, other], tmp_path, known_hosts=kh)
    kh.write_text(other.known_hosts_line + "\n")  # only the other device is trusted
    before = dev.log_file.read_text().count("Accepted publickey")
    results = runner("hk-1").run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert results[0].error.code == "host_key_unknown" and dev.host_key_fingerprint in results[0].error.message
    assert results[0].bytes_sent == 0 and results[1].ok
    kh.write_text(f"[127.0.0.1]:{dev.port} " + other.known_hosts_line.split(None, 1)[1] + "\n" +
                  other.known_hosts_line + "\n")
    results = runner("hk-2").run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert results[0].error.code == "host_key_changed" and dev.host_key_fingerprint in results[0].error.message
    assert results[0].bytes_sent == 0 and results[1].ok
    assert dev.log_file.read_text().count("Accepted publickey") == before  # never logged in
    assert not (dev.workdir / "runs" / "hk-1").exists() and not (dev.workdir / "runs" / "hk-2").exists()


def test_a_long_or_odd_name_becomes_one_short_file_name_of_its_own(tmp_path):
    """Run ids and target names become file names on the board and in the run's spool: a name over 255 bytes (a
    long id, or one full of shell metacharacters spelled out) must still give one path component, distinct per
    name."""
    from pipeline.release.spool import Spool

    safe_name = push.safe_name
    assert safe_name("pi-4_b.c") == "pi-4_b.c"
    long = "run;" + "x" * 300
    a, b, c = safe_name(long), safe_name(long + "y"), safe_name("pi;touch /tmp/p")
    assert len(a.encode()) <= 100 and len(b.encode()) <= 100 and a != b
    assert a.startswith("run_xxx") and "/" not in c and ";" not in c and " " not in c
    assert safe_name("p" * 81) != "p" * 81 and safe_name("p" * 80) == "p" * 80
    spool = Spool(tmp_path, long)
    spool.finish({"complete": True})           # a spool of that run id is one folder with a short name
    assert spool.dir.name == a and (tmp_path / a / "finish.json").is_file()


def test_shell_metacharacters_in_inventory_inject_nothing(fleet, tiny_artifact, tiny_eval, tmp_path):
    canary = tmp_path / "pwned"
    evil = f";touch {canary};$(touch {canary})`touch {canary}`"
    a, b = fleet[0], fleet[1]
    inv = inventory([a, b], tmp_path, per_device={
        a.name: {"name": "pi" + evil, "workdir": str(a.root / ("wd" + evil))},
        b.name: {"python": "python3" + evil},
    }, targets=[{"name": "bad-host", "host": "127.0.0.1" + evil, "port": a.port, "user": a.user,
                 "identity_file": str(a.identity_file), "kind": "cpu"},
                {"name": "bad-user", "host": a.host, "port": a.port, "user": "root" + evil,
                 "identity_file": str(a.identity_file), "kind": "cpu"}])
    results = runner("inject" + evil).run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert not canary.exists()
    named = {r.name: r for r in results}
    assert named["pi" + evil].ok  # odd names and paths are just names and paths
    assert (a.root / ("wd" + evil) / "blobs").is_dir()
    assert named[b.name].error.code == "agent_error"
    assert named["bad-host"].error.code == "unreachable"
    assert named["bad-user"].error.code == "auth_failed"


def test_a_device_down_does_not_stop_the_others(sshd_fleet, fleet, tiny_artifact, tiny_eval, tmp_path):
    (down,) = sshd_fleet(1, prefix="down")
    stop([down])
    inv = inventory([down] + fleet[:2], tmp_path, defaults={"retries": 2})
    results = runner("down").run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert results[0].error.code == "unreachable" and results[0].attempts == 3
    assert all(r.ok for r in results[1:])


def test_garbage_or_truncated_json_is_that_devices_bad_result(fleet, tiny_artifact, tiny_eval, tmp_path):
    garbage = script_python(tmp_path, "garbage-python", fleet[0].python, "echo 'Segmentation fault? {{{'")
    truncated = script_python(tmp_path, "trunc-python", fleet[1].python,
                              f'{fleet[1].python} "$@" | head -c 300')
    inv = inventory(fleet[:3], tmp_path, per_device={fleet[0].name: {"python": garbage},
                                                     fleet[1].name: {"python": truncated}})
    results = runner("garbage").run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert [r.error.code if r.error else None for r in results] == ["bad_result", "bad_result", None]
    assert results[2].ok


def test_result_left_on_device_is_fetched_not_remeasured(fleet, tiny_artifact, tiny_eval, tmp_path):
    dev = fleet[2]  # a fresh workdir: files are pushed, then the agent runs (and the fault hits that run)
    inv = inventory([dev], tmp_path, defaults={"retries": 1}, per_device={dev.name: {"workdir": str(tmp_path / "wd")}})
    faults = Faults(drop="after_run")  # the agent finished; its output never reached the host
    events = []
    (res,) = runner("refetch", transport_factory=faults.factory(),
                    on_event=lambda *e: events.append(e)).run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert res.ok and res.attempts == 2
    assert faults.drops == 1 and faults.matched_runs == 1  # measured once
    assert any("earlier attempt" in d for _, s, d in events if s == "collect")


STAMP = r'''
import os, sys, time, subprocess
log = sys.argv.pop(1)
t0 = time.monotonic()  # one clock for every process on this machine
p = subprocess.run([sys.executable] + sys.argv[1:])
with open(log, "a") as f:
    f.write("%f %f\n" % (t0, time.monotonic()))
sys.exit(p.returncode)
'''


def test_targets_on_one_board_never_measure_together(fleet, tiny_artifact, tiny_eval, tmp_path):
    dev = fleet[3]
    (tmp_path / "stamp.py").write_text(STAMP)
    log = tmp_path / "intervals"
    py = script_python(tmp_path, "stamp-python", dev.python,
                       f'exec {dev.python} {tmp_path / "stamp.py"} {log} "$@"')
    extra = [{"name": f"{dev.name}-{k}", "host": dev.host, "port": dev.port, "user": dev.user,
              "identity_file": str(dev.identity_file), "python": py, "workdir": str(dev.workdir), "kind": k}
             for k in ("gpu", "edgetpu")]
    inv = inventory([dev], tmp_path, per_device={dev.name: {"python": py}}, targets=extra,
                    defaults={"allow_fallback": True})
    runner("board").run(jobs_for(inv, tiny_artifact, tiny_eval))
    spans = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(spans) == 3
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_local_transport_target_runs_the_agent_as_a_subprocess(fleet, tiny_artifact, tiny_eval, tmp_path):
    inv = inventory([], tmp_path, targets=[{"name": "here", "transport": "local", "python": fleet[1].python,
                                           "workdir": str(tmp_path / "local-wd"), "kind": "cpu"}])
    (res,) = runner("local").run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert res.ok, res.error
    assert res.result["runtime"]["name"] == "tflite-runtime"
    assert (tmp_path / "local-wd" / "runs" / "local" / "here.json").exists()


def test_an_agent_whose_connection_drops_stops_and_the_retry_measures_alone(fleet, tiny_artifact, tiny_eval,
                                                                            tmp_path):
    """The agent never outlives the one who started it: its connection gone (stdin closed), it stops (host_gone)
    instead of measuring unseen; the retry measures after it ended, never beside it (agents' own clocks)."""
    dev = fleet[3]
    log, go = tmp_path / "agents", tmp_path / "go"
    # The agent cannot start before the link is gone: it waits for `go`, which the drop creates. It runs as the
    # wrapper's child, so the wrapper logs when it ended and how.
    slow = script_python(tmp_path, "slow-python", dev.python,
                         f'case "$*" in *--model*) ;; *) exec {dev.python} "$@";; esac; '
                         f'while [ ! -e {go} ]; do sleep 0.05; done; {dev.python} "$@" 2>/dev/null; '
                         f'echo "$? $(date +%s.%N)" >> {log}')
    inv = inventory([dev], tmp_path, per_device={dev.name: {"python": slow, "workdir": str(tmp_path / "wd")}},
                    defaults={"retries": 1})
    faults = Faults(drop="run", on_drop=go.touch)  # cut once the host knows the agent's pid on the device
    (res,) = runner("slow", transport_factory=faults.factory()).run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert res.ok, res.error
    assert faults.drops == 1 and res.attempts == 2
    ended = [line.split() for line in log.read_text().splitlines()]
    assert len(ended) == 2 and ended[0][0] == "1"        # the first agent stopped: its host was gone
    assert float(ended[0][1]) <= res.result["timestamps"]["timed_from"]   # ... before the second one measured
