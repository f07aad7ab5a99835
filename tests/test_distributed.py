"""`edgepipe run --distributed` with real parts: a PostgreSQL 15 server, two `edgepipe worker --site` processes for
two sites, each with its own real sshd devices. Runs complete through the queue and gate as usual; two concurrent
runs share a device without overlapping; a worker killed mid-job (SIGKILL) costs nothing but time: its device
goes to another worker of the site, or is reported worker_lost, and every other device's result is kept."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import api
from pipeline.release.store import Store
from pipeline.testing.agents import delayed_python
from pipeline.testing.sshd import write_targets_yaml

ROOT = Path(__file__).resolve().parent.parent
LITERT = str(ROOT / ".venv-devices" / "litert" / "bin" / "python")
SITES = {"a0": "lab-a", "a1": "lab-a", "b0": "lab-b", "b1": "lab-b"}
SLOW = 4.0       # seconds a0's agent waits before measuring (an injected delay: time to kill its worker mid-job)
LEASE_TTL = 3.0  # workers' lease ttl here, so a killed worker's lease lapses quickly


class Lab:
    """The two-site lab: devices, targets.yaml, the database, and the worker processes (stopped by PID)."""

    def __init__(self, tmp: Path, devices: list, url: str, digits) -> None:
        self.tmp, self.devices, self.url, self.digits = tmp, devices, url, digits
        self.workers: dict[int, subprocess.Popen] = {}
        slow = delayed_python(tmp / "slow-python", LITERT, SLOW)
        per = {d.name: {"site": SITES[d.name]} for d in devices}
        per["a0"]["python"] = slow
        self.targets = write_targets_yaml(devices, tmp / "targets.yaml", defaults={"mode": "float32", "runs": 20},
                                          per_device=per)
        doc = yaml.safe_load(self.targets.read_text())
        doc["db"] = url
        self.targets.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.data = tmp / "eval.npz"
        np.savez(self.data, x=digits.x_eval[:40], y=digits.y_eval[:40])

    def start_worker(self, site: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(ROOT), EDGEPIPE_LEASE_TTL=str(LEASE_TTL))
        log = open(self.tmp / f"worker-{site}-{len(self.workers)}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker", "--site", site, "--targets",
                                 str(self.targets), "--heartbeat", "1", "--concurrency", "4",
                                 "--cache-dir", str(self.tmp / f"cache-{site}")],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.workers[proc.pid] = proc
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self, cache: Path, **kw):
        return api.run(self.targets, model=self.digits.model_path, data=self.data, out_dir=self.tmp / "out",
                       cache_dir=cache, baseline="none", distributed=True, **kw)

    def progress(self, run_id: str) -> dict[str, dict]:
        with Store(self.url) as store:
            rows = store.exchange.progress_since(run_id, 0.0)
        return {r.target: {"stage": r.stage, "worker": r.worker} for r in rows}


def _host_top1(artifact: str, x: np.ndarray, y: np.ndarray) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=artifact)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    hits = 0
    for xi, yi in zip(x, y):
        it.set_tensor(inp["index"], xi[None].astype(np.float32))
        it.invoke()
        hits += int(it.get_tensor(out["index"])[0].argmax() == yi)
    return hits / len(y)


@pytest.fixture(scope="module")
def lab(sshd_fleet, pg_server, tmp_path_factory, digits):
    devices = sshd_fleet(2, pythons=[LITERT], prefix="a") + sshd_fleet(2, pythons=[LITERT], prefix="b")
    lab = Lab(tmp_path_factory.mktemp("dist"), devices, pg_server.new_database("dist"), digits)
    Store(lab.url).close()
    lab.start_worker("lab-a")
    lab.start_worker("lab-b")
    yield lab
    lab.stop_workers()


def test_a_distributed_run_measures_every_site_and_gates_as_usual(lab, conversion_cache):
    from pipeline.cli import _load_commands, app

    _load_commands()
    args = ["run", "--distributed", "--targets", str(lab.targets), "--model", str(lab.digits.model_path), "--data",
            str(lab.data), "--out", str(lab.tmp / "out"), "--cache-dir", str(conversion_cache), "--baseline", "none",
            "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output[-3000:]
    doc = json.loads(r.stdout)
    devs = {d["name"]: d for d in doc["devices"]}
    assert set(devs) == set(SITES) and all(d["ok"] for d in devs.values()), [d["error"] for d in devs.values()]
    assert doc["verdict"]["passed"] and doc["complete"] and doc["db"].startswith("postgresql://")
    # each device was measured by a worker of its own site, under a lease, with the artifact the coordinator made
    workers = lab.progress(doc["run_id"])
    assert {n: w["worker"].split("@")[0] for n, w in workers.items()} == SITES
    arts = {d["artifact"]["sha256"] for d in devs.values()}
    assert len(arts) == 1 and all(d["lease"]["released"] >= d["lease"]["acquired"] for d in devs.values())
    assert len(devs["a1"]["result"]["samples_ms"]) == 20
    # every output travelled back through the artifact store and was scored here, as in a local run: the accuracy
    # equals the same artifact run on the host with LiteRT and scored with numpy
    assert doc["task"]["task"] == "classification"
    expected = _host_top1(devs["a1"]["artifact"]["path"], lab.digits.x_eval[:40], lab.digits.y_eval[:40])
    for d in devs.values():
        assert d["metrics"]["task"] == "classification" and d["result"]["outputs"]["stored"]["sha256"]
        assert d["result"]["accuracy"]["top1"] == pytest.approx(expected)
        assert all(o["snr_db"] > 30 for o in d["metrics"]["outputs"].values())
    # the same exit codes as a local run: a gate nobody can meet fails with 1
    strict = yaml.safe_load(lab.targets.read_text())
    strict["gates"] = {"max_p50_ms": 1e-6}
    strict_path = lab.tmp / "strict.yaml"
    strict_path.write_text(yaml.safe_dump(strict, sort_keys=False))
    args[args.index("--targets") + 1] = str(strict_path)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and not json.loads(r.stdout)["verdict"]["passed"]


def test_bad_distributed_input_is_one_line_before_anything_is_recorded(lab, tmp_path):
    from pipeline.cli import _load_commands, app

    _load_commands()
    doc = yaml.safe_load(lab.targets.read_text())
    del doc["targets"][1]["site"]
    bad = tmp_path / "nosite.yaml"
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    with Store(lab.url) as store:
        before = len(store.history(limit=1000).runs)
    base = ["run", "--distributed", "--model", str(lab.digits.model_path), "--data", str(lab.data), "--baseline", "none"]
    r = CliRunner().invoke(app, base + ["--targets", str(bad)])
    assert r.exit_code == 2 and "targets[1].site" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, base + ["--targets", str(lab.targets), "--db", str(tmp_path / "local.db")])
    assert r.exit_code == 2 and "PostgreSQL" in r.output
    with Store(lab.url) as store:
        assert len(store.history(limit=1000).runs) == before


def test_a_site_without_a_worker_fails_after_the_queue_timeout_whose_default_is_finite(lab, conversion_cache, tmp_path):
    """No worker serves lab-c: its device is no_worker after --queue-timeout, never a run that waits for ever (the
    default is 10 minutes); nothing was measured, so exit 3, with the reason in the JSON."""
    from pipeline.cli import _load_commands, app
    from pipeline.distributed.coordinator import DistributedOptions

    _load_commands()
    doc = yaml.safe_load(lab.targets.read_text())
    doc["targets"][2]["site"] = "lab-c"
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text(yaml.safe_dump(doc, sort_keys=False))
    name = doc["targets"][2]["name"]
    r = CliRunner().invoke(app, ["run", "--distributed", "--targets", str(orphan), "--select", name, "--model",
                                 str(lab.digits.model_path), "--data", str(lab.data), "--out", str(tmp_path / "out"),
                                 "--cache-dir", str(conversion_cache), "--baseline", "none", "--queue-timeout", "1",
                                 "--json"])
    assert r.exit_code == 3, r.output[-2000:]
    (dev,) = json.loads(r.stdout)["devices"]
    assert dev["error"]["code"] == "no_worker" and "edgepipe worker --site lab-c" in dev["error"]["message"]
    assert DistributedOptions().queue_timeout == 600.0
    assert re.search(r"--queue-timeout\s+FLOAT RANGE.*?\[default: 600\.0", CliRunner().invoke(
        app, ["run", "-h"], env={"COLUMNS": "200"}).output, flags=re.S)


def test_a_worker_stopped_by_sigterm_says_so_and_exits_143(lab):
    log = lab.tmp / f"worker-lab-b-{len(lab.workers)}.log"
    proc = lab.start_worker("lab-b")
    deadline = time.monotonic() + 120
    while "queue edgepipe-site-lab-b" not in log.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    said = [line for line in log.read_text().splitlines() if "SIGTERM" in line]
    assert said and said[-1].endswith("stopped by SIGTERM; its running jobs finished and were stored"), said


def test_two_concurrent_distributed_runs_share_a_device_without_overlap(lab, conversion_cache):
    results = {}

    def one(k: int) -> None:
        results[k] = lab.run(conversion_cache, select=["a0", "b0"], label=f"concurrent-{k}")

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(results) == 2 and all(r.exit_code == 0 for r in results.values())
    for name in ("a0", "b0"):
        windows = sorted((d.lease["acquired"], d.lease["released"]) for r in results.values()
                         for d in r.run.devices if d.name == name)
        (a0, a1), (b0, b1) = windows
        assert a1 <= b0, f"{name}: measurement windows overlap: {windows}"
    slow = sorted((d.lease["acquired"], d.lease["released"]) for r in results.values() for d in r.run.devices
                  if d.name == "a0")
    assert all(end - start >= SLOW for start, end in slow)


def _wait_stage(lab, run_id: str, target: str, stage: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.progress(run_id).get(target, {}).get("stage") == stage:
            return
        time.sleep(0.2)
    raise AssertionError(f"{target} never reached {stage}")


def _kill_site_a_worker_mid_job(lab, conversion_cache, *, retries: int, replace: bool):
    """Start a run, SIGKILL lab-a's worker while a0 measures (a1 done), maybe start a replacement; the Release."""
    (old,) = [p for p in lab.workers.values() if p.poll() is None and "lab-a" in p.args]
    run_id = f"kill-{retries}-{int(time.time())}"
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(rel=lab.run(conversion_cache, run_id=run_id, worker_timeout=3,
                                                               worker_retries=retries)))
    t.start()
    _wait_stage(lab, run_id, "a1", "done")
    _wait_stage(lab, run_id, "a0", "run")   # its agent is in the injected 4 s delay, or measuring
    old.send_signal(signal.SIGKILL)
    assert old.wait(timeout=30) == -signal.SIGKILL
    new = lab.start_worker("lab-a") if replace else None
    t.join(timeout=600)
    return out["rel"], new


def test_a_killed_workers_device_is_measured_by_another_worker_of_its_site(lab, conversion_cache):
    rel, new = _kill_site_a_worker_mid_job(lab, conversion_cache, retries=1, replace=True)
    devs = {d.name: d for d in rel.run.devices}
    assert all(d.ok for d in devs.values()), {n: d.error for n, d in devs.items()}
    assert rel.exit_code == 0 and rel.run.complete
    assert lab.progress(rel.run.run_id)["a0"]["worker"].endswith(f":{new.pid}")   # the replacement measured a0
    assert devs["a0"].lease["device"].endswith(f":{lab.devices[0].port}") and not devs["a0"].lease["lost"]
    with Store(lab.url) as store:
        stored = store.load_run(rel.run.run_id)
    assert {d.name for d in stored.devices if d.ok} == set(SITES)


def test_a_killed_worker_without_retries_is_worker_lost_and_the_rest_is_kept(lab, conversion_cache):
    rel, _ = _kill_site_a_worker_mid_job(lab, conversion_cache, retries=0, replace=False)
    devs = {d.name: d for d in rel.run.devices}
    assert devs["a0"].error is not None and devs["a0"].error.code == "worker_lost"
    assert all(devs[n].ok for n in ("b0", "b1")), {n: d.error for n, d in devs.items()}
    assert rel.exit_code == 1                      # a device failed, the gate says so; the others' results stand
    with Store(lab.url) as store:
        stored = {d.name: d for d in store.load_run(rel.run.run_id).devices}
    assert stored["a0"].error.code == "worker_lost" and stored["b0"].ok and stored["b1"].ok
    lab.start_worker("lab-a")  # leave the site served for any later test
