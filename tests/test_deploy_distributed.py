"""`edgepipe deploy --distributed`: the same rollout through a site's `edgepipe worker` process, with a real
PostgreSQL history and real sshd boards: canary then the rest, healthy; a board whose product probe rejects the
release rolls back by itself on the worker, the stage aborts and the worker takes its healthy neighbour back."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import api
from pipeline.release.store import Store
from pipeline.testing.sshd import write_targets_yaml
from tests.test_deploy import HEALTH, sha_of

ROOT = Path(__file__).resolve().parent.parent
LITERT = str(ROOT / ".venv-devices" / "litert" / "bin" / "python")


@pytest.fixture(scope="module")
def site(sshd_fleet, pg_server, tmp_path_factory, digits, conversion_cache):
    tmp = tmp_path_factory.mktemp("deploy-dist")
    devices = sshd_fleet(3, pythons=[LITERT], prefix="s")
    per = {}
    for d in devices:
        (d.root / "health.sh").write_text(HEALTH)
        per[d.name] = {"site": "lab", "health": ["sh", str(d.root / "health.sh"), "{sha256}", "{model}"]}
    targets = write_targets_yaml(devices, tmp / "targets.yaml", defaults={"mode": "float32"}, per_device=per)
    doc = yaml.safe_load(targets.read_text())
    doc["db"] = pg_server.new_database("deploydist")
    targets.write_text(yaml.safe_dump(doc, sort_keys=False))
    data = tmp / "eval.npz"
    np.savez(data, x=digits.x_eval[:40], y=digits.y_eval[:40])
    rel = api.run(targets, model=digits.model_path, data=data, out_dir=tmp / "out", cache_dir=conversion_cache,
                  baseline="none")
    assert rel.verdict.passed
    log = open(tmp / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker", "--site", "lab", "--targets",
                               str(targets), "--heartbeat", "1", "--concurrency", "4", "--cache-dir", str(tmp / "wc")],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log,
                              stderr=subprocess.STDOUT)
    yield {"tmp": tmp, "devices": {d.name: d for d in devices}, "targets": targets, "url": doc["db"],
           "run": rel.run, "cache": conversion_cache}
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def deploy(site, model: str):
    return api.deploy(site["targets"], site["run"].run_id, model_name=model, stages="1,100%", distributed=True,
                      out_dir=site["tmp"] / "out", cache_dir=site["cache"])


def current(site, name: str, model: str) -> str | None:
    cur = site["devices"][name].workdir / "deploy" / model / "current"
    return sha_of(cur / "model.tflite") if cur.is_symlink() else None


def test_a_distributed_deploy_goes_through_the_site_worker_canary_first(site):
    dep = deploy(site, "dist")
    doc = dep.to_dict()
    assert dep.exit_code == 0, doc
    assert [[d["name"] for d in s["devices"]] for s in doc["stages"]] == [["s0"], ["s1", "s2"]]
    shas = {d.name: d.artifact["sha256"] for d in site["run"].devices}
    assert all(d["state"] == "healthy" for s in doc["stages"] for d in s["devices"])
    assert {n: current(site, n, "dist") for n in shas} == shas
    with Store(site["url"]) as store:
        rec = store.deployments.load(doc["deployment"])
        workers = {r.target: r.worker for r in store.exchange.progress_since(doc["deployment"], 0.0)}
    assert {s.state for s in rec.steps} == {"pending", "installed", "healthy"}
    assert set(workers) == set(shas) and all(w.startswith("lab@") for w in workers.values())


def test_a_board_failing_its_probe_rolls_back_on_the_worker_and_the_stage_aborts(site):
    sha = {d.name: d.artifact["sha256"] for d in site["run"].devices}
    reject = site["devices"]["s1"].root / "reject"
    reject.write_text(sha["s1"] + "\n")
    try:
        dep = deploy(site, "dist-bad")
    finally:
        reject.unlink()
    doc = dep.to_dict()
    states = {d["name"]: (d["state"], (d["error"] or {}).get("code")) for s in doc["stages"] for d in s["devices"]}
    assert dep.exit_code == 1 and doc["aborted"]
    assert states == {"s0": ("healthy", None), "s1": ("rolled_back", "health_failed"),
                      "s2": ("rolled_back", "stage_aborted")}
    assert current(site, "s0", "dist-bad") == sha["s0"]
    assert current(site, "s1", "dist-bad") is None and current(site, "s2", "dist-bad") is None   # nothing before
