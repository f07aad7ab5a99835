"""`edgepipe deploy`, `rollback` and `fleet status` over real sshd boards on loopback, with the product's own
`activate:` and `health:` scripts on each board, from two real gated runs of the digits CNN (A: float32, B: int8).

One fleet and the two runs are shared by the module; each test deploys under its own model name, so each has its
own release directories on the boards and its own records. What a board runs is checked on the board's files
(the symlink, the bytes' sha256), never only through edgepipe's answer.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline import api
from pipeline.release.leases import held_now
from pipeline.release.store import Store
from pipeline.testing.faults import Faults
from pipeline.testing.sshd import restart, stop, write_targets_yaml
from tests.fixtures.fleet import FLEET_PYTHONS, wait_until
from tests.json_shapes import check

ROOT = Path(__file__).resolve().parent.parent
LITERT, TFLITE = FLEET_PYTHONS
NUMPY_ONLY = str(ROOT / ".venv-devices" / "numpy-only" / "bin" / "python")
JSON_KEYS = {"deployment", "release", "stages", "aborted"}
DEVICE_KEYS = {"name", "state", "from", "to", "health", "error"}
STATUS_KEYS = {"name", "model_name", "release", "sha256", "since", "health", "drift"}

ACTIVATE = """#!/bin/sh
# the product's activate: note the release; with a pause file, say so and wait for the go file
root=$(dirname "$0")
echo "$1" >> "$root/activated"
if [ -f "$root/pause" ]; then touch "$root/waiting"; while [ ! -f "$root/go" ]; do sleep 0.05; done; fi
"""
HEALTH = """#!/bin/sh
# the product's probe: the model file is there and not empty; a sha256 listed in ./reject fails it
root=$(dirname "$0")
[ -s "$2" ] || { echo "probe: no model at $2" >&2; exit 1; }
if [ -f "$root/reject" ] && grep -qx "$1" "$root/reject"; then echo "probe: rejects $1" >&2; exit 1; fi
"""
SWAPPABLE = """#!/bin/sh
# this board's Python: whichever interpreter ./python.real names (a runtime swapped on the board)
exec "$(cat "$(dirname "$0")/python.real")" "$@"
"""
READER = r"""
import hashlib, os, sys, time
current, ok_shas, stop, log = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3], sys.argv[4]
reads = bad = 0
seen = set()
while not os.path.exists(stop):
    try:
        with open(os.path.join(current, "model.tflite"), "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        bad += 1; sha = "missing: %s" % e
    reads += 1
    if sha not in ok_shas:
        bad += 1
    seen.add(sha)
open(log, "w").write("%d %d %s" % (reads, bad, ",".join(sorted(seen))))
"""


def sha_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Lab:
    """Four boards (d0 is the canary, d2 runs tflite-runtime, d3's Python can be swapped), their scripts, the
    history, and the two gated runs A and B."""

    def __init__(self, tmp: Path, devices: list, digits, cache: Path) -> None:
        self.tmp, self.devices, self.digits, self.cache = tmp, {d.name: d for d in devices}, digits, cache
        self.db = tmp / "results.db"
        self.data = tmp / "eval.npz"
        np.savez(self.data, x=digits.x_eval[:40], y=digits.y_eval[:40])
        per = {}
        for d in devices:
            (d.root / "activate.sh").write_text(ACTIVATE)
            (d.root / "health.sh").write_text(HEALTH)
            per[d.name] = {"activate": ["sh", str(d.root / "activate.sh"), "{release}"],
                           "health": ["sh", str(d.root / "health.sh"), "{sha256}", "{model}"]}
        per["d0"]["groups"] = ["canary"]
        swap = self.devices["d3"].root / "python"
        swap.write_text(SWAPPABLE)
        swap.chmod(0o755)
        self.swap_runtime(LITERT)
        per["d3"]["python"] = str(swap)
        self.per = per
        self.targets_a = self.write("a.yaml", {"mode": "float32"})
        self.targets_b = self.write("b.yaml", {"mode": "int8"})
        self.targets = self.targets_a   # deploys read the boards' activate/health/deploy_dir from here

    def write(self, name: str, defaults: dict, per: dict | None = None, extra: list | None = None) -> Path:
        path = write_targets_yaml(list(self.devices.values()), self.tmp / name, defaults=defaults,
                                  per_device=per or self.per, targets=extra)
        doc = yaml.safe_load(path.read_text())
        doc["db"] = str(self.db)
        doc["groups"] = {"canary": {"description": "first to get a release"}}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def swap_runtime(self, python: str) -> None:
        (self.devices["d3"].root / "python.real").write_text(python)

    def gate_run(self, targets: Path, tag: str) -> str:
        rel = api.run(targets, model=self.digits.model_path, data=self.data,
                      calibration=self.digits.calibration_path, out_dir=self.tmp / "out", cache_dir=self.cache,
                      baseline="none", label=tag)
        assert rel.verdict.passed, rel.verdict.headline()
        return rel.run.run_id

    def deploy(self, run: str, model: str, **kw):
        kw.setdefault("targets", self.targets)
        return api.deploy(kw.pop("targets"), run, model_name=model, out_dir=self.tmp / "out", cache_dir=self.cache,
                          **kw)

    def deploy_dir(self, name: str, model: str) -> Path:
        return self.devices[name].workdir / "deploy" / model

    def on_board(self, name: str, model: str) -> tuple[str | None, str | None]:
        """(release `current` points to, sha256 of the file it points to), read from the board's disk."""
        cur = self.deploy_dir(name, model) / "current"
        if not cur.is_symlink():
            return None, None
        return os.path.basename(os.readlink(cur)), sha_of(cur / "model.tflite")

    def shas(self, run: str) -> dict[str, str]:
        with Store(self.db) as store:
            return {d.name: d.artifact["sha256"] for d in store.load_run(run).devices}

    def cli(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """The real CLI in its own process, as a user runs it."""
        full = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=self.tmp, env=full,
                              capture_output=True, text=True, timeout=timeout)

    @staticmethod
    def invoke(*args: str) -> Any:
        """The same CLI in this process (typer's CliRunner): exit code, stdout, stderr."""
        from typer.testing import CliRunner

        from pipeline.cli import _load_commands, app

        _load_commands()
        return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def lab(sshd_fleet, tmp_path_factory, digits, conversion_cache):
    devices = sshd_fleet(4, pythons=[LITERT, LITERT, TFLITE, LITERT], prefix="d")
    lab = Lab(tmp_path_factory.mktemp("deploy"), devices, digits, conversion_cache)
    lab.run_a = lab.gate_run(lab.targets_a, "A")
    lab.run_b = lab.gate_run(lab.targets_b, "B")
    lab.sha_a, lab.sha_b = lab.shas(lab.run_a), lab.shas(lab.run_b)
    assert set(lab.sha_a.values()).isdisjoint(lab.sha_b.values())
    return lab


def steps(lab: Lab, dep_id: str) -> dict[str, list[str]]:
    with Store(lab.db) as store:
        rec = store.deployments.load(dep_id)
    out: dict[str, list[str]] = {}
    for s in rec.steps:
        out.setdefault(s.target, []).append(s.state)
    return out


def states(doc: dict) -> dict[str, str]:
    return {d["name"]: d["state"] for s in doc["stages"] for d in s["devices"]}


def test_canary_then_the_fleet_healthy_and_a_rerun_skips_them(lab):
    dep = lab.deploy(lab.run_a, "canary")
    doc = dep.to_dict()
    check("deploy", doc)   # docs/json.md
    assert set(doc) == JSON_KEYS and dep.exit_code == 0 and not doc["aborted"]
    assert [[d["name"] for d in s["devices"]] for s in doc["stages"]] == [["d0"], ["d1", "d2", "d3"]]
    for d in (d for s in doc["stages"] for d in s["devices"]):
        assert set(d) == DEVICE_KEYS and d["state"] == "healthy" and d["error"] is None, d
        assert d["to"] == lab.sha_a[d["name"]] and d["from"] is None
        release, sha = lab.on_board(d["name"], "canary")
        assert sha == lab.sha_a[d["name"]] and release == f"{lab.run_a}-{sha[:12]}"
        info = json.loads((lab.deploy_dir(d["name"], "canary") / "current" / "release.json").read_text())
        assert info["run_id"] == lab.run_a and info["sha256"] == sha and info["verdict"] == "passed"
        assert info["model_name"] == "canary" and info["deployment"] == doc["deployment"] and info["by"]
        assert (lab.devices[d["name"]].root / "activated").read_text().splitlines().count(release) == 1
        assert d["health"]["ok"] and {c["check"] for c in d["health"]["checks"]} >= {"activate", "health", "runtime"}
    assert all(v == ["pending", "installed", "healthy"] for v in steps(lab, doc["deployment"]).values())

    again = lab.deploy(lab.run_a, "canary").to_dict()
    assert states(again) == {n: "healthy" for n in lab.devices} and again["deployment"] != doc["deployment"]
    for name in lab.devices:   # skipped: not activated again, nothing switched
        release, _ = lab.on_board(name, "canary")
        assert (lab.devices[name].root / "activated").read_text().splitlines().count(release) == 1
    assert all(v == ["pending", "healthy"] for v in steps(lab, again["deployment"]).values())


def test_boards_failing_health_roll_back_by_themselves_and_the_stage_aborts(lab, tmp_path):
    first = lab.deploy(lab.run_a, "abort", stages="100%")
    assert first.exit_code == 0
    (lab.devices["d1"].root / "reject").write_text(lab.sha_b["d1"] + "\n")   # d1's product rejects release B
    lab.swap_runtime(TFLITE)    # d3's runtime was swapped after the gate
    try:
        dep = lab.deploy(lab.run_b, "abort", stages="1,100%", max_fail_percent=50, report_dir=tmp_path,
                         junit=tmp_path / "junit.xml", summary=tmp_path / "summary.md")
        doc = dep.to_dict()
        check("deploy", doc)
        assert dep.exit_code == 1 and doc["aborted"]
        assert states(doc) == {"d0": "healthy", "d1": "rolled_back", "d2": "rolled_back", "d3": "rolled_back"}
        errors = {d["name"]: (d["error"] or {}).get("code") for s in doc["stages"] for d in s["devices"]}
        assert errors == {"d0": None, "d1": "health_failed", "d2": "stage_aborted", "d3": "runtime_changed"}
        assert lab.on_board("d0", "abort")[1] == lab.sha_b["d0"]         # stage 1 stays: no --rollback-all
        for name in ("d1", "d2", "d3"):
            assert lab.on_board(name, "abort")[1] == lab.sha_a[name]
        rec = steps(lab, doc["deployment"])
        assert rec["d1"] == rec["d3"] == ["pending", "installed", "failed", "rolled_back"]
        assert rec["d2"] == ["pending", "installed", "healthy", "rolled_back"]
        activated = (lab.devices["d1"].root / "activated").read_text().splitlines()
        assert activated[-2:] == [f"{lab.run_b}-{lab.sha_b['d1'][:12]}", f"{lab.run_a}-{lab.sha_a['d1'][:12]}"]
        d3 = next(d for d in doc["stages"][1]["devices"] if d["name"] == "d3")
        runtime = next(c for c in d3["health"]["checks"] if c["check"] == "runtime")
        assert runtime == {"check": "runtime", "ok": False, "measured": "tflite-runtime",
                           "threshold": "ai-edge-litert"}
        junit = (tmp_path / "junit.xml").read_text()
        assert 'failures="3"' in junit and "health_failed" in junit
        assert "stage\\_aborted" in (tmp_path / "summary.md").read_text()   # Markdown-escaped
        html = (tmp_path / "deploy.html").read_text()
        assert html.count("<rect") >= 3 * 4 and "Stage timeline" in html

        # --rollback-all: every board this rollout changed goes back, the canary of stage 1 too
        assert api.rollback(lab.targets, select=["d0"], model_name="abort").exit_code == 0
        assert lab.on_board("d0", "abort")[1] == lab.sha_a["d0"]
        again = lab.deploy(lab.run_b, "abort", stages="1,100%", max_fail_percent=50, rollback_all=True).to_dict()
        assert again["aborted"] and states(again)["d0"] == "rolled_back"
        assert all(lab.on_board(n, "abort")[1] == lab.sha_a[n] for n in lab.devices)
    finally:
        (lab.devices["d1"].root / "reject").unlink()
        lab.swap_runtime(LITERT)


def test_kill_9_mid_rollout_then_the_same_command_finishes_it(lab):
    d2 = lab.devices["d2"].root
    (d2 / "pause").touch()
    args = ["deploy", lab.run_a, "--targets", str(lab.targets), "--model-name", "kill", "--stages", "1,100%",
            "--out", str(lab.tmp / "out"), "--cache-dir", str(lab.cache), "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), EDGEPIPE_LEASE_TTL="2")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=lab.tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (d2 / "waiting").exists() or proc.poll() is not None, "d2 activating", 120)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    for name in lab.devices:   # no board without a valid current: none, or a whole release
        release, sha = lab.on_board(name, "kill")
        if release is not None:
            info = json.loads((lab.deploy_dir(name, "kill") / "current" / "release.json").read_text())
            assert info["sha256"] == sha == lab.sha_a[name]
    assert lab.on_board("d0", "kill")[1] == lab.sha_a["d0"] and lab.on_board("d2", "kill")[1] == lab.sha_a["d2"]
    with Store(lab.db) as store:
        killed = [r for r in store.db.all("SELECT id, state FROM deployments WHERE model_name='kill'")]
    assert [r["state"] for r in killed] == ["running"]
    (d2 / "pause").unlink()
    (d2 / "go").touch()
    res = lab.invoke(*args)   # waits for the killed process's leases to lapse (its ttl: 2 s)
    assert res.exit_code == 0, res.output[-3000:]
    doc = json.loads(res.stdout)
    assert doc["deployment"] == killed[0]["id"] and states(doc) == {n: "healthy" for n in lab.devices}
    assert all(lab.on_board(n, "kill")[1] == lab.sha_a[n] for n in lab.devices)
    rec = steps(lab, doc["deployment"])
    assert rec["d0"][-1] == "healthy" and rec["d2"].count("installed") == 2 and rec["d2"][-1] == "healthy"
    for f in ("go", "waiting"):
        (d2 / f).unlink()


def test_rollback_fleet_status_and_drift_with_a_reader_on_a_board(lab):
    assert lab.deploy(lab.run_a, "rb", stages="100%").exit_code == 0
    cur = lab.deploy_dir("d1", "rb") / "current"
    stop_file, log = lab.tmp / "reader.stop", lab.tmp / "reader.log"
    reader = subprocess.Popen([LITERT, "-c", READER, str(cur), f"{lab.sha_a['d1']},{lab.sha_b['d1']}",
                               str(stop_file), str(log)])
    try:
        assert lab.deploy(lab.run_b, "rb", stages="100%").exit_code == 0
        res = lab.invoke("rollback", "--targets", str(lab.targets), "--model-name", "rb", "--json")
        assert res.exit_code == 0, res.output[-2000:]
        doc = json.loads(res.stdout)
        check("rollback", doc)
        assert set(doc) == JSON_KEYS and states(doc) == {n: "rolled_back" for n in lab.devices}
        assert all(lab.on_board(n, "rb")[1] == lab.sha_a[n] for n in lab.devices)
        back = api.rollback(lab.targets, to=lab.run_b, model_name="rb")   # and forth again, by run
        assert back.exit_code == 0 and all(lab.on_board(n, "rb")[1] == lab.sha_b[n] for n in lab.devices)
    finally:
        stop_file.touch()
        reader.wait(timeout=60)
    reads, bad, seen = log.read_text().split(" ")
    assert int(reads) > 0 and int(bad) == 0 and set(seen.split(",")) == {lab.sha_a["d1"], lab.sha_b["d1"]}

    res = lab.invoke("fleet", "status", "--targets", str(lab.targets), "--model-name", "rb", "--json")
    assert res.exit_code == 0, res.output[-2000:]
    check("fleet status", json.loads(res.stdout))
    rows = json.loads(res.stdout)["devices"]
    assert [set(r) for r in rows] == [STATUS_KEYS] * 4
    assert {r["name"]: (r["release"], r["sha256"], r["drift"]) for r in rows} == \
        {n: (lab.run_b, lab.sha_b[n], False) for n in lab.devices}
    model = lab.deploy_dir("d2", "rb") / "current" / "model.tflite"
    model.chmod(0o644)
    with open(model, "ab") as f:   # changed by hand on the board
        f.write(b"\0")
    res = lab.invoke("fleet", "status", "--targets", str(lab.targets), "--model-name", "rb", "--json")
    assert res.exit_code == 1
    rows = {r["name"]: r for r in json.loads(res.stdout)["devices"]}
    assert rows["d2"]["drift"] is True and rows["d2"]["sha256"] == sha_of(model) != lab.sha_b["d2"]
    assert [n for n, r in rows.items() if r["drift"]] == ["d2"]


def test_an_unpassed_run_is_refused_and_force_ships_it_with_the_reason(lab, tmp_path):
    strict = lab.write("strict.yaml", {"mode": "float32"})
    doc = yaml.safe_load(strict.read_text())
    doc["gates"] = {"min_top1": 0.999}   # the digits CNN scores ~0.98: this gate fails
    strict.write_text(yaml.safe_dump(doc, sort_keys=False))
    rel = api.run(strict, model=lab.digits.model_path, data=lab.data, select=["d1"], out_dir=lab.tmp / "out",
                  cache_dir=lab.cache, baseline="none")
    assert not rel.verdict.passed
    base = ["deploy", rel.run.run_id, "--targets", str(lab.targets), "--select", "d1", "--model-name", "forced",
            "--out", str(lab.tmp / "out"), "--cache-dir", str(lab.cache)]
    res = lab.invoke(*base)
    assert res.exit_code == 2 and "did not pass its gate" in res.stderr and "--force" in res.stderr
    refused = json.loads(lab.invoke(*base, "--json").stdout)   # --json: one error object, as every command
    check("error", refused)
    assert refused["error"]["exit_code"] == 2 and "--force" in refused["error"]["hint"]
    assert lab.on_board("d1", "forced") == (None, None)
    res = lab.invoke(*base, "--force", "hotfix approved by QA", "--json")
    assert res.exit_code == 0, res.output[-2000:]
    dep_id = json.loads(res.stdout)["deployment"]
    with Store(lab.db) as store:
        assert store.deployments.load(dep_id).forced == "hotfix approved by QA"
    info = json.loads((lab.deploy_dir("d1", "forced") / "current" / "release.json").read_text())
    assert info["forced"] == "hotfix approved by QA" and info["verdict"].startswith("forced")


def test_boards_down_full_or_cut_keep_their_current_and_the_others_carry_on(lab, tmp_path):
    assert lab.deploy(lab.run_a, "faults", stages="100%").exit_code == 0
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(full)], capture_output=True)
    per = {n: dict(v) for n, v in lab.per.items()}
    if mounted.returncode == 0:   # d1's work directory is a full disk; its releases stay where they are
        per["d1"].update(workdir=str(full), deploy_dir=str(lab.deploy_dir("d1", "{model_name}")))
    targets = lab.write("faults.yaml", {"mode": "float32"}, per)
    d2_dir = str(lab.deploy_dir("d2", "faults"))
    cut = Faults(drop="after_run", match=lambda argv: "release-stage" in argv and d2_dir in " ".join(argv))
    stop([lab.devices["d3"]])
    try:
        doc = lab.deploy(lab.run_b, "faults", targets=targets, stages="100%", max_fail_percent=100,
                         transport_factory=cut.factory()).to_dict()
    finally:
        restart(lab.devices["d3"])
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(full)], check=False)
    errors = {d["name"]: (d["state"], (d["error"] or {}).get("code")) for d in doc["stages"][0]["devices"]}
    assert errors["d0"] == ("healthy", None) and lab.on_board("d0", "faults")[1] == lab.sha_b["d0"]
    assert errors["d2"] == ("failed", "unreachable") and cut.drops == 1
    assert errors["d3"] == ("failed", "unreachable")
    if mounted.returncode == 0:
        assert errors["d1"] == ("failed", "disk_full")
    for name in ("d1", "d2", "d3"):
        assert lab.on_board(name, "faults")[1] == lab.sha_a[name], name
    assert not doc["aborted"]
    # a connection lost during the check (after the switch): the board is reached again and goes back
    lost = Faults(drop="run")   # cut while the agent checks `current`
    doc = lab.deploy(lab.run_a, "faults", select=["d0"], transport_factory=lost.factory()).to_dict()
    (d0,) = doc["stages"][0]["devices"]
    assert (d0["state"], d0["error"]["code"], lost.drops) == ("rolled_back", "unreachable", 1)
    assert lab.on_board("d0", "faults")[1] == lab.sha_b["d0"]


def test_dry_run_plans_a_new_board_of_a_measured_class_and_refuses_an_unmeasured_one(lab):
    d2, d0 = lab.devices["d2"], lab.devices["d0"]

    def board(name: str, d, python: str, mode: str) -> dict:   # another target on a fleet board, not in the run
        return {"name": name, "host": d.host, "port": d.port, "user": d.user, "identity_file": str(d.identity_file),
                "python": python, "workdir": str(d.root / name), "kind": "cpu", "mode": mode}

    extra = [board("spare", d2, TFLITE, "float32"),     # tflite-runtime, float32: d2's class, measured in run A
             board("other", d0, LITERT, "float16"),     # LiteRT, float16: a class run A never measured
             board("bare", d0, NUMPY_ONLY, "float32")]  # no runtime at all: its probe fails
    targets = lab.write("new.yaml", {"mode": "float32"}, extra=extra)
    res = lab.invoke("deploy", lab.run_a, "--targets", str(targets), "--select", "spare", "--select", "other",
                     "--select", "bare", "--select", "d1", "--stages", "1,100%", "--dry-run", "--json", "--out",
                     str(lab.tmp / "out"), "--cache-dir", str(lab.cache))
    assert res.exit_code == 0, res.output[-2000:]
    doc = json.loads(res.stdout)
    check("deploy", doc, absent=("stages[].devices[].health", "stages[].devices[].health.checks[]"))
    assert doc["deployment"] is None and doc["release"] == lab.run_a
    rows = {d["name"]: d for s in doc["stages"] for d in s["devices"]}
    assert rows["spare"]["to"] == lab.sha_a["d2"] and rows["spare"]["state"] == "pending"   # measured on d2's class
    assert rows["other"]["error"]["code"] == "not_validated" and "cpu/ai-edge-litert/cpu/float16" in \
        rows["other"]["error"]["message"]
    assert rows["bare"]["state"] == "failed" and rows["bare"]["error"]["code"] == "no_runtime"
    assert not (d2.root / "spare" / "deploy").exists()   # a dry run changes nothing
    text = lab.invoke("deploy", lab.run_a, "--targets", str(targets), "--select", "other", "--select", "d1",
                      "--dry-run", "--out", str(lab.tmp / "out"), "--cache-dir", str(lab.cache))
    assert "stage 1: d1 <- " in text.stdout and "refused other: not_validated" in text.stdout


def test_ctrl_c_lets_a_switched_board_finish_then_exits_130_and_starts_no_new_stage(lab):
    d1 = lab.devices["d1"].root
    for f in ("waiting", "go"):
        (d1 / f).unlink(missing_ok=True)
    (d1 / "pause").touch()
    args = ["deploy", lab.run_a, "--targets", str(lab.targets), "--model-name", "ctrlc", "--stages", "2,100%",
            "--out", str(lab.tmp / "out"), "--cache-dir", str(lab.cache), "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=lab.tmp,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_until(lambda: (d1 / "waiting").exists() or proc.poll() is not None, "d1 activating", 120)
        with Store(lab.db) as store:   # the board is leased for the deploy, as for a run: nothing measures on it
            held = {h["device"]: h["run_id"] for h in held_now(store.db)}
        assert held.get(f"127.0.0.1:{lab.devices['d1'].port}", "").startswith("dep-"), held
        proc.send_signal(signal.SIGINT)
        assert proc.poll() is None   # d1 switched: it is not abandoned half-way
        (d1 / "go").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        (d1 / "pause").unlink()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    doc = json.loads(out)
    assert states(doc) == {"d0": "healthy", "d1": "healthy", "d2": "pending", "d3": "pending"}
    assert lab.on_board("d1", "ctrlc")[1] == lab.sha_a["d1"]
    assert lab.on_board("d2", "ctrlc") == (None, None) and lab.on_board("d3", "ctrlc") == (None, None)
    with Store(lab.db) as store:
        assert store.deployments.load(doc["deployment"]).state == "interrupted"
