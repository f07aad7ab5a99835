"""Two `edgepipe run` processes sharing one real sshd device through one results database (SQLite file, then
PostgreSQL): both complete, and the recorded lease windows on the shared device never overlap. A run that may not
wait (`--lease-timeout`) fails that device alone with lease_timeout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.release.leases import Leases
from pipeline.release.store import Store
from pipeline.testing.agents import delayed_python
from pipeline.testing.sshd import target_entry, write_known_hosts, write_targets_yaml
from tests.fixtures.postgres import DB_KINDS

ROOT = Path(__file__).resolve().parent.parent
LITERT = str(ROOT / ".venv-devices" / "litert" / "bin" / "python")
DELAY = 1.5  # seconds the shared device's agent waits before measuring: long windows, so an overlap would show


@pytest.fixture(scope="module")
def lab(sshd_fleet, tmp_path_factory, digits):
    """Three devices: one per run, and `shared` (a slow agent) in both runs' targets.yaml."""
    tmp = tmp_path_factory.mktemp("leases")
    devices = sshd_fleet(3, pythons=[LITERT], prefix="ls")
    slow = delayed_python(tmp / "slow-python", LITERT, DELAY)
    data = tmp / "eval.npz"
    np.savez(data, x=digits.x_eval[:40], y=digits.y_eval[:40])
    return {"devices": devices, "slow": slow, "tmp": tmp, "data": data,
            "known_hosts": write_known_hosts(devices, tmp / "known_hosts")}


def _targets(lab, name: str, own: int, db: str) -> Path:
    shared = target_entry(lab["devices"][1], name="shared", python=lab["slow"], mode="float32")
    path = write_targets_yaml([lab["devices"][own]], lab["tmp"] / f"{name}.yaml", defaults={"mode": "float32"},
                              targets=[shared], known_hosts=lab["known_hosts"])
    doc = yaml.safe_load(path.read_text())
    doc["db"] = db
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _run(lab, targets: Path, digits, cache: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--targets", str(targets),
                             "--model", str(digits.model_path), "--data", str(lab["data"]), "--cache-dir", str(cache),
                             "--out", str(lab["tmp"] / "out"), "--baseline", "none", "--json", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_sharing_a_device_both_complete_and_never_overlap(lab, digits, results_db, conversion_cache):
    a, b = _targets(lab, "a", 0, results_db), _targets(lab, "b", 2, results_db)
    warm = _run(lab, a, digits, conversion_cache)            # conversion + float reference cached first
    assert warm.wait(timeout=300) == 0, warm.stderr.read()[-2000:]
    procs = [_run(lab, t, digits, conversion_cache) for t in (a, b)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    docs = [json.loads(out) for out, _ in outs]
    windows = []
    for doc in docs:
        devs = {d["name"]: d for d in doc["devices"]}
        assert all(d["ok"] for d in devs.values()) and doc["complete"]
        lease = devs["shared"]["lease"]
        assert lease["device"] == f"127.0.0.1:{lab['devices'][1].port}" and not lease["lost"]
        assert lease["released"] - lease["acquired"] >= DELAY   # the lease covered the whole measurement
        windows.append((lease["acquired"], lease["released"]))
    (a0, a1), (b0, b1) = sorted(windows)
    assert a1 <= b0, f"measurement windows overlap: {windows}"
    # the later reader sees the same leases: `show RUN_ID --json`
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for doc in docs:
        shown = subprocess.run([sys.executable, "-m", "pipeline.cli", "show", doc["run_id"], "--db", results_db,
                                "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        leases = {d["name"]: d["lease"] for d in json.loads(shown.stdout)["devices"]}
        assert leases == {d["name"]: d["lease"] for d in doc["devices"]}


def test_a_run_that_may_not_wait_fails_the_busy_device_alone(lab, digits, new_db, conversion_cache):
    results_db = new_db(DB_KINDS[-1])  # PostgreSQL unless narrowed (tests/test_leases.py covers the timeout on both)
    a = _targets(lab, "impatient", 0, results_db)
    with Store(results_db) as store:
        holder = Leases(store.db, owner="other-lab-user", run_id="other-run")
        lease = holder.acquire(f"127.0.0.1:{lab['devices'][1].port}", "their-pi")
        try:
            t0 = time.monotonic()
            proc = _run(lab, a, digits, conversion_cache, "--lease-timeout", "0.5")
            out, err = proc.communicate(timeout=300)
        finally:
            holder.release(lease)
            holder.close()
    devs = {d["name"]: d for d in json.loads(out)["devices"]}
    assert devs["ls0"]["ok"] and devs["ls0"]["lease"]["released"] is not None
    assert devs["shared"]["error"]["code"] == "lease_timeout" and "other-run" in devs["shared"]["error"]["message"]
    assert proc.returncode == 1                                # a device failed: the gate says so, as for any failure
    assert time.monotonic() - t0 < 240
