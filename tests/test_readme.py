"""Every command in the README runs, so the README cannot drift.

`make demo` runs for real (with its fleet kept up, in a temporary state dir); then each `edgepipe ...` line and the
Python API block run against that fleet, with the README's placeholders bound to the demo's files. `make test` is
checked by a dry run (running it here would recurse).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.testing.sshd import pid_alive

REPO = Path(__file__).resolve().parent.parent
DETECTION = "det_eval.npz"   # marks the README's detection command (run by its own test, with a detector it builds)
README = (REPO / "README.md").read_text()
pytestmark = pytest.mark.slow


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    out = []
    for block in blocks("sh"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    return out


def test_readme_opens_with_the_two_commands():
    first = blocks("sh")[0]
    lines = [ln.split("#")[0].strip() for ln in first.splitlines() if ln.strip()]
    assert lines == ["make demo", "make test"]
    assert README.index("make demo") < 400


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"`make ([a-z0-9-]+)", README)) | {"demo", "test"}
    assert {"setup", "bench", "test-arm64", "demo-down"} <= targets
    for t in sorted(targets):
        dry = subprocess.run(["make", "-n", t], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0, f"make {t}: {dry.stderr}"


def test_make_test_runs_the_suite():
    dry = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "-m pytest" in dry


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    state = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, DEMO_FLAGS=f"--state {state} --keep")
    proc = subprocess.run(["make", "demo", f"DEMO_FLAGS=--state {state} --keep"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    yield state, proc
    subprocess.run([sys.executable, "-m", "pipeline.testing.demo", "--down", "--state", str(state)], cwd=REPO)


def test_make_demo_runs_the_whole_job(demo):
    state, proc = demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Report:" in proc.stdout and "Verdict: exit code 0" in proc.stdout
    last = json.loads((state / "last_demo.json").read_text())
    html = Path(last["report"]).read_text()
    assert "raspberry-pi-4" in html and "coral-usb" in html and "gpu-board" in html
    # No accelerator here and the demo fleet allows fallback: the report says so, honestly, for both.
    assert "fell back from edgetpu" in html and "fell back from gpu" in html
    assert "fleet enroll" in proc.stderr and "added" in proc.stdout  # host keys enrolled explicitly
    # the newcomer's first minute: the model trains in the quiet worker, TensorFlow's start-up lines go to its log
    noise = [line for line in proc.stderr.splitlines() if re.match(r"(WARNING: All log messages|[IWEF]\d{4} |"
                                                                 r"To enable the following instructions)", line)]
    assert not noise, noise
    assert (state / "digits" / "train.log").is_file()
    # the release passed, so the demo shipped it: canary first, then the rest, each board healthy on what was gated
    assert last["deploy_exit_code"] == 0 and "Deploy:  exit code 0" in proc.stdout
    assert "stage 1 of 2" in proc.stdout and "stage 2 of 2" in proc.stdout
    assert (state / "report" / "deploy.html").is_file()
    import hashlib

    import yaml

    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()   # noqa: E731
    measured = {digest(p) for p in (state / "artifacts").rglob("*.tflite")}
    for t in yaml.safe_load((state / "targets.yaml").read_text())["targets"]:   # each board runs what was measured
        current = Path(t["workdir"]) / "deploy" / "digits_cnn" / "current" / "model.tflite"
        assert current.is_file() and digest(current) in measured, current


def _bindings(state: Path) -> dict[str, str]:
    from pipeline.release.store import Store

    digits = state / "digits"
    with Store(state / "results.db") as store:
        run_id = store.history(limit=1).runs[0].run_id
    return {
        "targets.yaml": str(state / "targets.yaml"), "model.keras": str(digits / "digits_cnn.keras"),
        "eval.npz": str(digits / "digits_eval.npz"), "cal.npz": str(digits / "digits_calibration.npz"),
        "RUN_ID": run_id, "TAG": "demo", "pi4-kitchen": "raspberry-pi-4", "artifacts/": str(state / "readme-artifacts") + "/",
        "out/": str(state / "readme-out") + "/", "out2/": str(state / "readme-out2") + "/", "junit.xml": str(state / "readme-junit.xml"),
        "summary.md": str(state / "readme-summary.md"),
    }


def _bind(text: str, b: dict[str, str]) -> str:
    for k in sorted(b, key=len, reverse=True):
        text = re.sub(rf"(?<![\w/.-]){re.escape(k)}(?![\w-])", b[k], text)
    return text


def test_every_readme_command_runs(demo):
    state, proc = demo
    assert proc.returncode == 0
    env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}")
    ran = 0
    for cmd in commands():
        if cmd.startswith("make ") or DETECTION in cmd:
            continue  # the two make commands are covered above, the detection example below
        bound = _bind(cmd, _bindings(state))  # RUN_ID is the newest run so far; TAG is the demo's labelled run
        if "--db" not in bound and bound.split()[1:2] in (["history"], ["show"], ["gate"], ["report"]):
            bound += f" --db {state / 'results.db'}"
        # run where a user runs them: beside their targets.yaml (a command without --targets reads ./targets.yaml)
        res = subprocess.run(["bash", "-o", "pipefail", "-c", bound], cwd=state, env=env, capture_output=True,
                             text=True, timeout=900)
        # Every command here passes on the demo fleet: the demo's own release passed its gates (asserted above);
        # `run --model-name digits` has no earlier run of that name to regress against; `gate RUN_ID --baseline
        # TAG` re-gates it with the demo's targets.yaml against the demo's run, the same artifacts (no top-1
        # change, no latency history to gate on); `optimize` finds a format within the budget for every class (the
        # digits CNN keeps its accuracy in every mode). Anything else (1 included) is a broken command.
        assert res.returncode == 0, f"{cmd}\n-> {bound}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        ran += 1
    assert ran >= 8


def test_readme_python_api_block_runs(demo):
    state, proc = demo
    assert proc.returncode == 0
    code = _bind(blocks("python")[0], _bindings(state))
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ".html" in res.stdout and "int8" in res.stdout


def test_readme_detection_example_runs_as_written(demo, detector_model, tmp_path):
    """The README's detection gates (its yaml block) and command, on the demo fleet, with the session's detector."""
    import numpy as np
    import yaml

    state, proc = demo
    assert proc.returncode == 0
    (cmd,) = [c for c in commands() if DETECTION in c]
    (gates_block,) = blocks("yaml")
    readme_gates = yaml.safe_load(gates_block)["gates"]
    tm = detector_model
    np.savez(tmp_path / DETECTION, x=tm.x, **tm.labels)
    fleet = yaml.safe_load((state / "targets.yaml").read_text())
    fleet["gates"].update(readme_gates)
    fleet["db"] = str(tmp_path / "results.db")
    (tmp_path / "targets.yaml").write_text(yaml.safe_dump(fleet))
    bound = _bind(cmd, {"targets.yaml": str(tmp_path / "targets.yaml"), "detector.tflite": str(tm.paths["int8"]),
                        "detector_float.tflite": str(tm.paths["float32"]), DETECTION: str(tmp_path / DETECTION),
                        "out/": str(tmp_path / "out") + "/"})
    env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}")
    res = subprocess.run(["bash", "-o", "pipefail", "-c", bound], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    # The detector keeps its mAP in int8 (about 0.9 mAP@0.5, no drop against float, its scores' SNR far above 20 dB:
    # tests/task_models.py trains it deterministically), and the demo fleet's classification gates are skipped for
    # a detection task: the release passes.
    assert res.returncode == 0, ([c for c in doc["verdict"]["checks"] if not c["passed"]], res.stderr[-2000:])
    assert len(doc["devices"]) == 3 and (tmp_path / "out" / "report.html").is_file()
    for d in doc["devices"]:   # what the README says each row carries
        m = d["metrics"]
        assert d["ok"] and m["task"] == "detection" and {"map50", "map", "map50_vs_float"} <= set(m), d["error"]
        assert {o["role"] for o in m["outputs"].values()} == {"boxes", "classes", "scores", "count"}
        assert all(o["snr_db"] is not None for o in m["outputs"].values())
        for gate in readme_gates:   # every README gate was checked, naming the output and the metric it read
            checks = [c for c in doc["verdict"]["checks"] if c["target"] == d["name"] and c["gate"] == gate]
            assert checks and all(c["output"] and c["metric"] and not c["skipped"] for c in checks), gate


def test_readme_two_site_example_runs_as_written_with_its_workers(demo, pg_server, tmp_path):
    """The README's distributed block, run by bash as written (workers in the background, then the run, then show),
    on the demo fleet split into two sites with one PostgreSQL history. Its Coral converts to int8, so the command
    needs its --calibration, as a real fleet's would. The run is bounded by its --queue-timeout default; the test by
    a timeout; the README's background workers are stopped by SIGTERM and say so."""
    import signal
    import time

    import yaml

    state, proc = demo
    assert proc.returncode == 0
    (block,) = blocks("bash")
    fleet = yaml.safe_load((state / "targets.yaml").read_text())
    fleet["db"] = pg_server.new_database("readme")
    for t in fleet["targets"]:
        t["site"] = "lab-b" if t["kind"] == "gpu" else "lab-a"
    (tmp_path / "targets.yaml").write_text(yaml.safe_dump(fleet, sort_keys=False))
    bound = _bind(block, {**_bindings(state), "targets.yaml": str(tmp_path / "targets.yaml"),
                          "out/": str(tmp_path / "out") + "/", "last-run.json": str(tmp_path / "last-run.json")})
    env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    log = tmp_path / "readme.log"   # a file, not a pipe: the background workers keep their output open
    with open(log, "w") as sink:
        # no `bash -e`, as a user types it: the block's last command (`show`) decides its status, so the release's
        # own verdict is read from its output below
        shell = subprocess.Popen(["bash", "-c", bound], cwd=tmp_path, env=env, stdout=sink, stderr=sink,
                                 start_new_session=True)
    try:
        rc = shell.wait(timeout=900)
    finally:
        try:
            os.killpg(shell.pid, signal.SIGTERM)   # the README's background workers
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 120
    while subprocess.run(["pgrep", "-s", str(shell.pid)], capture_output=True).stdout.split():
        assert time.monotonic() < deadline, "the README's workers did not stop on SIGTERM"
        time.sleep(0.5)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, text[-3000:]
    assert "PASSED" in text and "FAILED" not in text, text[-3000:]   # the demo's gates, measured through the sites
    shown = json.loads((tmp_path / "last-run.json").read_text())
    assert {d["name"] for d in shown["devices"] if d["ok"]} == {"raspberry-pi-4", "coral-usb", "gpu-board"}
    assert all(d["lease"]["released"] >= d["lease"]["acquired"] for d in shown["devices"])
    assert shown["verdict_origin"] == "run" and (tmp_path / "out" / "report.html").is_file()
    assert text.count("stopped by SIGTERM") == 2, text[-3000:]


def test_second_demo_reuses_cache_and_device_blobs_then_demo_down_stops_fleet(demo):
    state, proc = demo
    assert proc.returncode == 0
    again = subprocess.run([sys.executable, "-m", "pipeline.testing.demo", "--state", str(state), "--keep"], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count(": cache hit,") == 3 and ": converted," not in again.stderr  # no TF conversion
    from pipeline.release.store import Store

    with Store(state / "results.db") as store:
        newest = store.history(limit=1).runs[0].run_id
        run = store.load_run(newest)
    assert len(run.devices) == 3 and all(d.ok for d in run.devices)
    assert [d.bytes_sent for d in run.devices] == [0, 0, 0]  # artifacts and agent already on the devices
    pids = [int(p) for p in (state / "sshd.pids").read_text().split()]
    assert pids and all(pid_alive(p) for p in pids)
    down = subprocess.run(["make", "demo-down", f"DEMO_FLAGS=--state {state}"], cwd=REPO, capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    import time

    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids)


def test_demo_without_sshd_falls_back_to_local_targets_and_still_reports(demo, tmp_path):
    import shutil

    shutil.copytree(demo[0] / "digits", tmp_path / "digits")   # the demo's model: "training (or reusing)" reuses it
    res = subprocess.run([sys.executable, "-m", "pipeline.testing.demo", "--local", "--state", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    import yaml

    fleet = yaml.safe_load((tmp_path / "targets.yaml").read_text())
    assert {t["transport"] for t in fleet["targets"]} == {"local"}
    assert (tmp_path / "report" / "report.html").exists()
    assert "Verdict: exit code 0" in res.stdout
