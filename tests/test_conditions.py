"""Measurements a Pi team can trust (issue 22), over real sshd devices whose sessions see a Pi's conditions.

Each device's sshd sets EDGEPIPE_SYSFS_ROOT (a board's cpufreq and thermal files) and puts a `vcgencmd` stub first
on PATH (pipeline.testing.board); the agent's code paths are the real ones. The stub prints the next value of a
script on each call: the run's probe reads it once, the agent before and after its timed runs, and again before and
after a re-measure, so a throttle can be injected between the readings around the timed runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from pipeline import api
from pipeline.release.store import Store, runtime_label
from pipeline.testing.board import SINCE_BOOT, THROTTLED, make_board
from pipeline.testing.sshd import write_targets_yaml
from tests.fixtures.fleet import FLEET_PYTHONS

ROOT = Path(__file__).resolve().parents[1]
NOW_AND_BOOT = THROTTLED | THROTTLED << SINCE_BOOT   # throttled now, and (so) since boot
BOOT_ONLY = THROTTLED << SINCE_BOOT                  # throttled earlier since boot, not now


@pytest.fixture(scope="module")
def boards():
    return {}


@pytest.fixture(scope="module")
def fleet(sshd_fleet, boards):
    """c0 runs ai-edge-litert, c1 tflite-runtime; each session sees its own board."""
    def env(name, root):
        boards[name] = make_board(root / "board", cpus=4, cur_mhz=1500, max_mhz=1800, zones=(51.5, 47.0),
                                  apex=(44.0,))
        return boards[name].env()

    return sshd_fleet(2, pythons=list(FLEET_PYTHONS), prefix="c", env=env)


def targets(tmp: Path, devices, gates: dict | None = None, **defaults) -> Path:
    path = write_targets_yaml(devices, tmp / "targets.yaml", defaults=dict({"threads": 1}, **defaults))
    if gates:
        doc = yaml.safe_load(path.read_text())
        doc["gates"] = gates
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(inv: Path, model, data, tmp: Path, cache, **kw):
    return api.run(inv, model=model, data=data, out_dir=tmp / "out", cache_dir=cache, db=tmp / "results.db", **kw)


def check(verdict, gate, target):
    (found,) = [c for c in verdict.checks if c.gate == gate and c.target == target]
    return found


# ---------------------------------------------------------------- memory attributable to the model

def test_model_peak_tracks_model_size_and_gates_the_larger(fleet, dense_pair, tmp_path, conversion_cache):
    """Two float32 models 30.7 MB apart in weights, on both runtimes: model_peak_mb differs by at least 20 MB while
    the mark before load does not move; max_model_peak_mb between the two fails the larger one only."""
    inv = targets(tmp_path, fleet, mode="float32", runs=3, warmup=1)
    rels = {name: run(inv, dense_pair[name], dense_pair["eval"], tmp_path, conversion_cache, model_name=name)
            for name in ("small", "large")}
    mem = {name: {d.name: d.result["memory"] for d in rel.run.devices if d.ok} for name, rel in rels.items()}
    assert all(len(m) == 2 for m in mem.values()), [d.error for rel in rels.values() for d in rel.run.devices]
    apart = dense_pair["weights_mb"]["large"] - dense_pair["weights_mb"]["small"]
    assert 29 < apart < 32
    for dev in fleet:
        small, large = mem["small"][dev.name], mem["large"][dev.name]
        assert small["source"] == large["source"] == "proc_status" and small["peak_reset"] and large["peak_reset"]
        assert large["model_peak_mb"] - small["model_peak_mb"] >= 20, (small, large)
        assert large["model_peak_mb"] >= 0.9 * dense_pair["weights_mb"]["large"]   # its weights were all touched
        assert abs(large["rss_before_load_mb"] - small["rss_before_load_mb"]) < 10   # the mark precedes the model
        assert large["process_peak_mb"] >= large["rss_before_load_mb"] + large["model_peak_mb"] - 0.01
    threshold = round(max(m["model_peak_mb"] for m in mem["small"].values()) + 10, 1)
    gated = targets(tmp_path / "gated", fleet, gates={"max_model_peak_mb": threshold}, mode="float32")
    small_gate = api.gate(rels["small"].run.run_id, targets=gated, db=tmp_path / "results.db", baseline="none")
    large_gate = api.gate(rels["large"].run.run_id, targets=gated, db=tmp_path / "results.db", baseline="none")
    assert small_gate.exit_code == 0, [c.message() for c in small_gate.verdict.failures]
    assert large_gate.exit_code == 1
    for dev in fleet:
        c = check(large_gate.verdict, "max_model_peak_mb", dev.name)
        assert not c.passed and c.measured == mem["large"][dev.name]["model_peak_mb"] and c.threshold == threshold
        assert c.source == "gates.max_model_peak_mb" and "proc_status" in c.note


# ---------------------------------------------------------------- throttling: re-measured, marked, no baseline

@pytest.fixture(scope="module")
def throttle_runs(fleet, boards, tiny_artifact, tiny_eval, tmp_path_factory, conversion_cache):
    """On c0: A throttles, then re-measures clean; B throttles again; C is clean and takes B as its baseline."""
    tmp = tmp_path_factory.mktemp("throttle")
    gates = {"conditions": {"throttled": "remeasure", "cooldown_s": 0}, "max_latency_regression": 10.0}
    inv = targets(tmp, fleet[:1], gates=gates, runs=20, warmup=2)
    board, out = boards["c0"], {}
    for name, script in (("A", [0, 0, NOW_AND_BOOT, BOOT_ONLY, BOOT_ONLY]),
                         ("B", [0, 0, NOW_AND_BOOT, BOOT_ONLY, NOW_AND_BOOT]), ("C", [0])):
        board.script_throttled(script)
        rel = run(inv, tiny_artifact.path, tiny_eval, tmp, conversion_cache, model_name="tiny", baseline="last",
                  report_dir=tmp / f"report-{name}", junit=tmp / f"{name}.xml", summary=tmp / f"{name}.md")
        out[name] = (rel, board.vcgencmd_calls)
    return tmp, inv, out


def test_a_throttled_device_is_measured_again_under_the_same_lease(throttle_runs):
    _, _, out = throttle_runs
    rel, calls = out["A"]
    (dev,) = rel.run.devices
    cond = dev.result["conditions"]
    assert calls == 5   # probe, before/after the timed runs, before/after the re-measure
    assert cond["remeasured"] is True and cond["throttled"] is False and cond["flags"] == []
    assert cond["first"]["flags"] == ["throttled"] and cond["before"]["throttled"]["raw"] == hex(BOOT_ONLY)
    lease, stamps = dev.lease, dev.result["timestamps"]
    assert lease["acquired"] <= cond["first"]["started"] < stamps["started"] <= stamps["finished"] <= lease["released"]
    assert rel.exit_code == 0, [c.message() for c in rel.verdict.failures]
    c = check(rel.verdict, "conditions.throttled", dev.name)
    assert c.passed and "re-measured after 0 s: clean" in c.note


def test_throttling_again_marks_the_result_and_fails_it(throttle_runs):
    tmp, _, out = throttle_runs
    rel, calls = out["B"]
    (dev,) = rel.run.devices
    cond = dev.result["conditions"]
    assert calls == 5 and cond["remeasured"] is True and cond["throttled"] is True and cond["flags"] == ["throttled"]
    assert dev.throttled and any("throttled during the timed runs" in w for w in dev.result["warnings"])
    assert rel.exit_code == 1
    c = check(rel.verdict, "conditions.throttled", dev.name)
    assert not c.passed and c.threshold == "remeasure" and c.source == "gates.conditions.throttled"
    assert "throttled again (throttled)" in c.note
    # shown where people look: the report's conditions line, JUnit properties, the Markdown summary
    html = (tmp / "report-B" / "report.html").read_text()
    assert "Memory and start-up" in html and "⚠ throttled" in html and "THROTTLED" in html
    props = {p.get("name"): p.get("value") for p in ET.parse(tmp / "B.xml").iter("property")}
    assert props["edgepipe.throttled"] == "True" and props["edgepipe.flags"] == "throttled"
    assert float(props["edgepipe.model_peak_mb"]) == dev.result["memory"]["model_peak_mb"]
    md = (tmp / "B.md").read_text()
    assert ":warning: throttled: throttled" in md and "THROTTLED" in md


def test_a_throttled_result_is_never_a_baseline_nor_in_the_history_spread(throttle_runs):
    from pipeline.inventory import load_inventory
    from pipeline.release.gate import evaluate

    tmp, inv, out = throttle_runs
    (a,), (b,), (c,) = (out[k][0].run.devices for k in "ABC")
    rel_c, calls = out["C"]
    assert calls == 1 + 2 and not c.throttled and c.result["conditions"]["remeasured"] is False
    run_a, run_b = out["A"][0].run.run_id, out["B"][0].run.run_id
    assert rel_c.verdict.baseline_run_id == run_b        # the last complete run of the model
    stand_in = check(rel_c.verdict, "baseline", c.name)  # B's result on c0 was throttled: A's stands in for it
    assert stand_in.measured == run_a and f"throttled in baseline {run_b}" in stand_in.note
    alone = evaluate(rel_c.run, load_inventory(inv), out["B"][0].run)   # with no earlier clean result: not compared
    reg = check(alone, "max_latency_regression", c.name)
    assert reg.skipped and "was throttled" in reg.note and "never used as a baseline" in reg.note
    with Store(tmp / "results.db") as store:
        spread = store.latency_history(c.name, c.artifact["sha256"], runtime_label(c),
                                       before=rel_c.run.started)
        points = {p.run_id: p for p in store.history(target=c.name, model_name="tiny").points}
    assert spread == [a.result["latency_ms"]["p50"]]   # A's median only: B's throttled one is left out
    assert points[run_b].throttled and not points[run_a].throttled   # the trends know which points to leave out
    assert points[run_a].model_peak_mb == a.result["memory"]["model_peak_mb"]
    assert points[run_a].init_ms == a.result["latency_ms"]["init"]


def test_warn_keeps_a_throttled_result_and_fail_does_not_remeasure(throttle_runs, boards, tiny_artifact, tiny_eval,
                                                                   conversion_cache):
    tmp, inv, out = throttle_runs
    doc = yaml.safe_load(inv.read_text())
    doc["gates"]["conditions"]["throttled"] = "warn"
    warn_inv = tmp / "warn.yaml"
    warn_inv.write_text(yaml.safe_dump(doc))
    warned = api.gate(out["B"][0].run.run_id, targets=warn_inv, db=tmp / "results.db", baseline="none")
    assert warned.exit_code == 0 and any("THROTTLED" in n for n in warned.verdict.notes)
    assert "kept with a warning" in check(warned.verdict, "conditions.throttled", "c0").note
    doc["gates"]["conditions"]["throttled"] = "fail"
    fail_inv = tmp / "fail.yaml"
    fail_inv.write_text(yaml.safe_dump(doc))
    boards["c0"].script_throttled([0, 0, NOW_AND_BOOT])
    rel = run(fail_inv, tiny_artifact.path, tiny_eval, tmp, conversion_cache, model_name="tiny-fail")
    (dev,) = rel.run.devices
    assert boards["c0"].vcgencmd_calls == 3 and dev.result["conditions"]["remeasured"] is False
    assert rel.exit_code == 1 and not check(rel.verdict, "conditions.throttled", "c0").passed


def test_governor_performance_fails_an_ondemand_board(fleet, boards, tiny_artifact, tiny_eval, tmp_path,
                                                      conversion_cache):
    boards["c0"].set_cpus(4, governor="ondemand", cur_mhz=600, max_mhz=1800)
    boards["c1"].set_cpus(4, governor="performance", cur_mhz=1800, max_mhz=1800)
    for b in boards.values():
        b.script_throttled([0])
    try:
        inv = targets(tmp_path, fleet, gates={"kinds": {"cpu": {"conditions": {"governor": "performance"}}}},
                      runs=5)
        rel = run(inv, tiny_artifact.path, tiny_eval, tmp_path, conversion_cache)
    finally:
        boards["c0"].set_cpus(4, cur_mhz=1500, max_mhz=1800)
    bad, good = check(rel.verdict, "conditions.governor", "c0"), check(rel.verdict, "conditions.governor", "c1")
    assert not bad.passed and bad.measured == "ondemand" and bad.source == "gates.kinds.cpu.conditions.governor"
    assert good.passed and good.measured == "performance"
    assert rel.exit_code == 1 and rel.verdict.devices == {"c0": "failed", "c1": "passed"}
    freq = {d.name: d.result["conditions"]["freq_mhz"] for d in rel.run.devices}
    assert freq["c0"] == {f"cpu{i}": {"cur": 600.0, "max": 1800.0} for i in range(4)}


# ---------------------------------------------------------------- duration, and what the CLI shows

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_min_duration_is_honoured_by_the_agents_own_clock(fleet, boards, tiny_artifact, tiny_eval, tmp_path,
                                                          conversion_cache):
    """runs: 5 of a microsecond model with min_duration_s 0.2: the timed runs go on for 0.2 s of the device's
    clock; `run --json` and `show --json` carry memory and conditions as the contract names them."""
    boards["c0"].script_throttled([0])
    inv = targets(tmp_path, fleet[:1], runs=5, warmup=1, min_duration_s=0.2)
    proc = cli("run", "--targets", str(inv), "--model", str(tiny_artifact.path), "--data", str(tiny_eval), "--json",
               "--out", str(tmp_path / "out"), "--cache-dir", str(conversion_cache), "--db", str(tmp_path / "r.db"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    r = doc["devices"][0]["result"]
    stamps = r["timestamps"]
    assert r["config"]["min_duration_s"] == 0.2 and r["runs_done"] > 5 and not r["stopped_early"]
    assert stamps["timed_to"] - stamps["runs_from"] >= 0.2 and stamps["timed_to"] - stamps["timed_from"] >= 0.2
    assert r["latency_ms"]["n"] == r["runs_done"] == len(r["samples_ms"])
    assert {"process_peak_mb", "model_load_mb", "model_peak_mb", "source"} <= set(r["memory"])
    cond = r["conditions"]
    assert {"throttled", "remeasured", "flags", "governor", "freq_mhz", "temps_c"} <= set(cond)
    assert cond["throttled"] is False and cond["governor"] == "performance"
    assert cond["temps_c"] == {"thermal_zone0": 51.5, "thermal_zone1": 47.0, "apex_0": 44.0}
    shown = cli("show", doc["run_id"], "--db", str(tmp_path / "r.db"), "--json")
    assert json.loads(shown.stdout)["devices"][0]["result"]["conditions"] == cond
    table = cli("show", doc["run_id"], "--db", str(tmp_path / "r.db"))
    assert "model/proc MB" in table.stdout, table.stdout


def test_fleet_check_shows_frequencies_temperatures_and_flags(fleet, boards, tmp_path):
    boards["c0"].script_throttled([NOW_AND_BOOT | (0x1 << SINCE_BOOT)])   # throttled now; under-voltage since boot
    boards["c1"].script_throttled([0])
    boards["c1"].set_cpus(4, governor="performance", cur_mhz=1500, max_mhz=1800)
    inv = targets(tmp_path, fleet)
    proc = cli("fleet", "check", "--targets", str(inv), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    devices = {d["name"]: d for d in json.loads(proc.stdout)["devices"]}
    assert devices["c0"]["throttled_now"] == ["throttled"]
    assert devices["c0"]["throttled_since_boot"] == ["under_voltage", "throttled"]
    assert devices["c1"]["throttled_now"] == [] and devices["c1"]["temps_c"]["apex_0"] == 44.0
    assert devices["c1"]["freq_mhz"]["cpu3"] == {"cur": 1500.0, "max": 1800.0}
    table = subprocess.run([sys.executable, "-m", "pipeline.cli", "fleet", "check", "--targets", str(inv)],
                           capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, COLUMNS="240"))
    assert "throttled now" in table.stdout and "under_voltage since boot" in table.stdout, table.stdout
    assert "1500 of 1800" in table.stdout and "apex_0 44" in table.stdout
