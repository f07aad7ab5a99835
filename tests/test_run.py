"""`execute` and the `run` / `fleet check` / `fleet enroll` commands over a real mixed-runtime sshd fleet."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import _load_commands, app
from pipeline.inventory import load_inventory
from pipeline.run import execute
from pipeline.testing.sshd import write_targets_yaml

FAST = {"runs": 3, "warmup": 1, "timeout": 120, "retries": 0, "connect_timeout": 5}


@pytest.fixture(scope="module")
def fleet(sshd_fleet):
    return sshd_fleet(3)  # litert, tflite-runtime, litert


@pytest.fixture(scope="module")
def targets_yaml(fleet, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    return write_targets_yaml(fleet, d / "targets.yaml", defaults=FAST,
                              per_device={fleet[2].name: {"emulated": True, "groups": ["lab"]}})


@pytest.fixture(scope="module")
def small_eval(digits, tmp_path_factory):
    p = tmp_path_factory.mktemp("run-eval") / "eval.npz"
    np.savez(p, x=digits.x_eval[:40], y=digits.y_eval[:40])
    return p


@pytest.fixture(scope="module")
def cli():
    _load_commands()
    return CliRunner()


def test_execute_fits_each_artifact_to_the_runtime_the_device_has(targets_yaml, digits, small_eval, tmp_path,
                                                                  conversion_cache):
    inv = load_inventory(targets_yaml)
    events, streamed = [], []
    res = execute(inv, digits.model_path, small_eval, out_dir=tmp_path / "out", cache_dir=conversion_cache,
                  on_event=lambda *e: events.append(e), on_result=streamed.append)
    assert [d.ok for d in res.devices] == [True, True, True], [d.error for d in res.devices]
    assert sorted(d.name for d in streamed) == sorted(d.name for d in res.devices)
    # dynamic mode: ai-edge-litert loads the default artifact, tflite-runtime 2.14 needs its compat build
    assert len(res.artifacts) == 2
    litert, tfl, emu = res.devices
    assert litert.artifact["sha256"] == emu.artifact["sha256"] != tfl.artifact["sha256"]
    assert tfl.result["runtime"]["name"] == "tflite-runtime"
    assert sum(1 for _, s, _ in events if s == "convert") == 3  # announced per device, converted per format
    # float references computed on the host travelled in the eval file: agreement measured on device
    assert all(d.result["agreement"]["n"] == 40 for d in res.devices)
    assert res.float_top1 is not None and abs(res.float_top1 - litert.result["accuracy"]["top1"]) < 0.1
    assert [d.emulated for d in res.devices] == [False, False, True]
    assert {s for _, s, _ in events} >= {"probe", "convert", "connect", "push", "run", "collect", "done"}


def test_unreachable_device_fails_alone_in_probe(fleet, digits, small_eval, tmp_path, conversion_cache):
    y = write_targets_yaml(fleet[:1], tmp_path / "t.yaml", defaults=FAST,
                           targets=[{"name": "ghost", "host": "127.0.0.1", "port": 1, "kind": "cpu",
                                     "identity_file": str(fleet[0].identity_file)}])
    res = execute(load_inventory(y), digits.model_path, small_eval, out_dir=tmp_path / "o", cache_dir=conversion_cache)
    assert res.devices[0].ok
    assert res.devices[1].error.code == "unreachable"


def test_run_json_shape_and_exit_codes(cli, targets_yaml, digits, small_eval, tmp_path, conversion_cache):
    args = ["run", "--targets", str(targets_yaml), "--model", str(digits.model_path), "--data", str(small_eval),
            "--out", str(tmp_path / "out"), "--cache-dir", str(conversion_cache), "--json", "--select", "lab"]
    r = cli.invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["run_id"] and [d["name"] for d in doc["devices"]] == ["dev2"]
    d = doc["devices"][0]
    assert {"name", "kind", "mode", "ok", "error", "result"} <= set(d)
    assert d["ok"] is True and d["error"] is None and d["result"]["schema_version"] == 1


def test_run_exit_3_when_no_device_answers(cli, fleet, digits, small_eval, tmp_path):
    y = write_targets_yaml([], tmp_path / "t.yaml", defaults=FAST,
                           targets=[{"name": "ghost", "host": "127.0.0.1", "port": 1, "kind": "cpu"}])
    r = cli.invoke(app, ["run", "--targets", str(y), "--model", str(digits.model_path), "--data", str(small_eval),
                         "--out", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 3
    assert json.loads(r.stdout.strip().splitlines()[-1])["devices"][0]["error"]["code"] == "unreachable"


def test_run_bad_data_is_one_line_exit_2(cli, targets_yaml, digits, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputs=np.zeros((2, 8, 8, 1)))
    r = cli.invoke(app, ["run", "--targets", str(targets_yaml), "--model", str(digits.model_path),
                         "--data", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "bad.npz" in r.output and "'x'" in r.output and "Traceback" not in r.output


def test_fleet_check_json(cli, targets_yaml, fleet):
    r = cli.invoke(app, ["fleet", "check", "--targets", str(targets_yaml), "--json"])
    assert r.exit_code == 0, r.output
    devs = json.loads(r.stdout.strip().splitlines()[-1])["devices"]
    assert [d["ok"] for d in devs] == [True] * 3
    assert devs[0]["runtimes"] == {"ai-edge-litert": "2.3.0"}
    assert devs[1]["runtimes"] == {"tflite-runtime": "2.14.0"}
    for d in devs:
        assert d["python"] and d["connect_ms"] > 0 and d["disk_free_bytes"] > 0
        assert d["coral_usb"] == [] and d["coral_pcie"] is False
    r = cli.invoke(app, ["fleet", "check", "--targets", str(targets_yaml), "--json", "--select", "dev1"])
    assert [d["name"] for d in json.loads(r.stdout.strip().splitlines()[-1])["devices"]] == ["dev1"]


def test_fleet_enroll_then_check(cli, fleet, tmp_path):
    kh = tmp_path / "fresh_known_hosts"
    y = write_targets_yaml(fleet, tmp_path / "t.yaml", known_hosts=kh, defaults=FAST)
    kh.unlink(missing_ok=True)
    r = cli.invoke(app, ["fleet", "check", "--targets", str(y), "--json"])
    assert r.exit_code == 3 and not kh.exists()  # refused, and nothing recorded
    assert {d["error"]["code"] for d in json.loads(r.stdout.strip().splitlines()[-1])["devices"]} == {"host_key_unknown"}
    r = cli.invoke(app, ["fleet", "enroll", "--targets", str(y)])
    assert r.exit_code == 0, r.output
    for d in fleet:
        assert d.host_key_fingerprint in r.output
    assert cli.invoke(app, ["fleet", "check", "--targets", str(y), "--json"]).exit_code == 0


def test_eval_data_of_the_wrong_shape_is_one_line_naming_both_shapes(cli, targets_yaml, digits, tmp_path,
                                                                      conversion_cache):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((5, 9, 9, 1), np.float32), y=np.zeros(5, np.int64))
    r = cli.invoke(app, ["run", "--targets", str(targets_yaml), "--model", str(digits.model_path), "--data", str(bad),
                         "--out", str(tmp_path / "out"), "--cache-dir", str(conversion_cache)])
    assert r.exit_code == 2, r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in r.output
    assert str(bad) in line[0] and "(5, 9, 9, 1)" in line[0] and "(N, 8, 8, 1)" in line[0]


def test_a_device_that_cannot_run_the_agent_is_ok_no_and_run_refuses_it_before_pushing(cli, fleet, tiny_artifact,
                                                                                      tiny_eval, device_python,
                                                                                      tmp_path):
    """fleet check is a health check: reachable is not enough. No runtime (a venv with numpy only, over SSH and as a
    local target), no Python at all: each is `ok: no` naming why, exit 3 when none can run the agent; `run` refuses
    them before anything but the agent's probe reaches them."""
    local_wd = tmp_path / "local-wd"
    y = write_targets_yaml(fleet[:2], tmp_path / "t.yaml", defaults=FAST,
                           per_device={fleet[0].name: {"python": str(device_python["numpy-only"])},
                                       fleet[1].name: {"python": "/nonexistent/bin/python3"}},
                           targets=[{"name": "here", "transport": "local", "kind": "cpu", "workdir": str(local_wd),
                                     "python": str(device_python["numpy-only"])}])
    r = cli.invoke(app, ["fleet", "check", "--targets", str(y), "--json"])
    assert r.exit_code == 3, r.output
    devs = {d["name"]: d for d in json.loads(r.stdout)["devices"]}
    assert {n: (d["ok"], d["reachable"], d["error"]["code"]) for n, d in devs.items()} == {
        fleet[0].name: (False, True, "no_runtime"), fleet[1].name: (False, True, "no_python"),
        "here": (False, True, "no_runtime")}
    assert "`python:`" in devs[fleet[1].name]["error"]["message"]          # the fix names the field
    table = cli.invoke(app, ["fleet", "check", "--targets", str(y)], env={"COLUMNS": "200"})
    assert table.exit_code == 3
    rows = {line.split()[0]: line for line in table.stdout.splitlines() if line.split()[:1] in
            ([fleet[0].name], [fleet[1].name], ["here"])}
    assert "[red]" not in table.stdout and "[/]" not in table.stdout          # markup rendered, never printed
    assert " no: no_runtime " in rows["here"] and " none " in rows["here"]    # the runtimes column says none
    assert rows["here"].split()[1] == "local" and "localhost" not in table.stdout
    assert " no: no_python " in rows[fleet[1].name]
    # run refuses all three before pushing: no artifact, nothing sent, exit 3 (nothing measured)
    def files() -> set:
        return {p for wd in (fleet[0].workdir, local_wd) for p in wd.rglob("*") if p.is_file()}

    before = files()   # this module's earlier runs left results on dev0
    r = cli.invoke(app, ["run", str(tiny_artifact.path), "--targets", str(y), "--data", str(tiny_eval),
                         "--out", str(tmp_path / "out"), "--db", str(tmp_path / "r.db"), "--json"])
    assert r.exit_code == 3, r.output
    run = {d["name"]: d for d in json.loads(r.stdout)["devices"]}
    assert {n: d["error"]["code"] for n, d in run.items()} == {fleet[0].name: "no_runtime",
                                                              fleet[1].name: "no_python", "here": "no_runtime"}
    assert all(d["bytes_sent"] == 0 and d["artifact"] is None for d in run.values())
    assert not [p for p in files() - before if p.suffix in (".tflite", ".npz")]   # no model, no data went there


def test_what_a_probe_finds_decides_whether_a_device_can_run_the_agent(tmp_path):
    """The rules behind `ok: no` beyond no Python and no runtime: the declared runtime must be the one installed, and
    the work directory must hold the agent, a model and the results."""
    from pipeline.devices.probe import MIN_FREE_BYTES, agent_health

    (tmp_path / "t.yaml").write_text("targets:\n  - {name: pi, host: 10.0.0.7, kind: cpu}\n"
                                     "  - {name: pinned, host: 10.0.0.8, kind: cpu, runtime: tflite-runtime}\n")
    pi, pinned = load_inventory(tmp_path / "t.yaml").targets
    probe = {"runtimes": {"ai_edge_litert": "2.3.0", "tflite_runtime": None}, "disk_free_bytes": MIN_FREE_BYTES,
             "workdir": "/home/pi/.edgepipe", "executable": "/usr/bin/python3"}
    assert agent_health(pi, probe) is None
    full = agent_health(pi, dict(probe, disk_free_bytes=MIN_FREE_BYTES - 1))
    assert full.code == "disk_full" and "`workdir:`" in full.message and full.details["needed_bytes"] == MIN_FREE_BYTES
    declared = agent_health(pinned, probe)
    assert declared.code == "no_runtime" and "tflite-runtime" in declared.message and "ai-edge-litert 2.3.0" in \
        declared.message
