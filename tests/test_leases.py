"""Device leases across real processes, on a SQLite file and on a real PostgreSQL server: never two holders at
once, a crashed holder's lease lapses, a busy device fails fast with lease_timeout or is waited for with progress."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from pipeline.release.leases import LeaseTimeout, Leases, held_now
from pipeline.release.store import Store
from tests.gate_support import ROOT

HOLDER = textwrap.dedent("""
    import json, os, signal, sys, time
    sys.path.insert(0, {root!r})
    from pipeline.release.store import Store
    from pipeline.release.leases import Leases
    db, name, rounds, hold, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    out = sys.argv[7]
    store = Store(db)
    leases = Leases(store.db, owner=name, run_id=name, ttl=float(sys.argv[6]))
    windows = []
    for i in range(rounds):
        lease = leases.acquire("10.0.0.9:22", "pi", run_id=f"{{name}}-{{i}}")
        print("HELD", flush=True)
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)   # crashes while holding the device
        time.sleep(hold)
        leases.release(lease)
        windows.append([lease.acquired, lease.released, lease.lost])
    leases.close()
    with open(out + ".tmp", "w") as f:
        json.dump(windows, f)
    os.replace(out + ".tmp", out)
""")


def _holder(tmp_path, db, name, rounds=1, hold=0.05, mode="live", ttl=30.0):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script), str(db), name, str(rounds), str(hold), mode, str(ttl),
                             str(tmp_path / f"{name}.json")], stdout=subprocess.PIPE, text=True)
    proc.windows = tmp_path / f"{name}.json"  # what it held, written when it is done
    return proc


def _wait_held(proc) -> None:
    assert proc.stdout.readline().strip() == "HELD"


def test_processes_sharing_the_database_never_hold_one_device_at_once(tmp_path, results_db):
    Store(results_db).close()  # schema first, so the holders race on leases only
    procs = [_holder(tmp_path, results_db, f"run{k}", rounds=8, hold=0.02) for k in range(3)]
    for p in procs:
        p.communicate(timeout=120)
    assert [p.returncode for p in procs] == [0, 0, 0]
    windows = sorted(w for p in procs for w in json.loads(p.windows.read_text()))
    assert len(windows) == 24 and not any(lost for _, _, lost in windows)
    for (a0, a1, _), (b0, b1, _) in zip(windows, windows[1:]):
        assert a0 < a1 <= b0 < b1, (a0, a1, b0, b1)   # the next holder starts only after the previous let go


def test_a_crashed_holders_lease_lapses_after_its_ttl_and_the_waiter_says_who_held_it(tmp_path, results_db):
    Store(results_db).close()
    proc = _holder(tmp_path, results_db, "crashed", mode="die", ttl=1.5)
    _wait_held(proc)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    events: list[str] = []
    with Store(results_db) as store:
        assert [lease["run_id"] for lease in held_now(store.db)] == ["crashed-0"]
        leases = Leases(store.db, owner="next", run_id="next", timeout=30)
        t0 = time.monotonic()
        lease = leases.acquire("10.0.0.9:22", "pi", on_wait=events.append)
        waited = time.monotonic() - t0
        leases.release(lease)
        leases.close()
        assert held_now(store.db) == []
    assert 0 < lease.waited_s <= waited and lease.released >= lease.acquired
    assert events and "crashed-0" in events[0] and "10.0.0.9:22" in events[0]


def test_a_busy_device_fails_fast_with_lease_timeout(tmp_path, results_db):
    Store(results_db).close()
    proc = _holder(tmp_path, results_db, "long", hold=20)
    try:
        _wait_held(proc)
        with Store(results_db) as store:
            leases = Leases(store.db, owner="impatient", run_id="impatient", timeout=0.3)
            t0 = time.monotonic()
            with pytest.raises(LeaseTimeout) as exc:
                with leases(SimpleNamespace(name="pi", physical_host=("10.0.0.9", 22), transport="ssh")):
                    pass
            assert time.monotonic() - t0 < 15   # failed fast, not after the holder's 20 s
            leases.close()
    finally:
        proc.kill()
        proc.wait()
    assert exc.value.code == "lease_timeout" and "long-0" in exc.value.one_line()


def test_the_heartbeat_keeps_a_long_measurement_leased(tmp_path, results_db):
    """A holder that lives keeps its device well past the ttl; a waiter gets it only after the release."""
    Store(results_db).close()
    proc = _holder(tmp_path, results_db, "slow", hold=3.0, ttl=1.0)
    _wait_held(proc)
    with Store(results_db) as store:
        leases = Leases(store.db, owner="waiter", run_id="waiter", timeout=60)
        lease = leases.acquire("10.0.0.9:22", "pi")
        leases.release(lease)
        leases.close()
    proc.communicate(timeout=60)
    (held,) = json.loads(proc.windows.read_text())
    assert held[1] - held[0] >= 3.0 and not held[2]          # held 3 s with a 1 s ttl, never lost
    assert lease.acquired >= held[1]                           # the waiter came after the release
