"""`make demo`: the whole job on a local simulated fleet (three real sshd devices on loopback).

It trains the bundled digits CNN, starts a "Raspberry Pi" (tflite-runtime 2.14), a "Coral" (edgetpu, LiteRT) and a
"GPU board" (gpu, LiteRT), enrolls their host keys with `edgepipe fleet enroll`, then runs `edgepipe run` with
gating, history and the HTML report, exactly as a user would on a real fleet; when the release passes, ships it with
`edgepipe deploy last` (canary first, each board checked against what was gated) and shows `edgepipe fleet status`.
State lives in `.demo/` so a second
demo reuses the conversion cache and the content-addressed artifacts already on the devices.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEVICE_VENVS = REPO / ".venv-devices"
EDGEPIPE = [sys.executable, "-m", "pipeline.cli"]

# name, kind, device venv, what it pretends to be
FLEET = [
    ("raspberry-pi-4", "cpu", "tflite-runtime", "Raspberry Pi 4 CPU, tflite-runtime 2.14"),
    ("coral-usb", "edgetpu", "litert", "Coral USB Accelerator (no TPU here: falls back to CPU)"),
    ("gpu-board", "gpu", "litert", "GPU board (no GPU delegate here: falls back to CPU)"),
]

DEPLOY_NAME = "digits_cnn"   # where the boards keep it: <workdir>/deploy/digits_cnn/current/model.tflite

GATES = {
    "min_top1": 0.90,
    "max_top1_drop": 2.0,
    "min_agreement": 0.95,
    "max_fail_percent": 0,
    "require_all_kinds": ["cpu", "edgetpu", "gpu"],
    # The digits CNN runs in microseconds on boards that share this machine's cores: a slowdown counts only when
    # it is significant, over 10 %, and adds more than 0.05 ms to the median.
    "max_latency_regression": 0.10,
    "min_latency_regression_ms": 0.05,
    "kinds": {"edgetpu": {"min_edgetpu_mapped": 0.5}},
}


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _pidfile(state: Path) -> Path:
    return state / "sshd.pids"


def down(state: Path) -> int:
    """Stop every sshd a previous demo left running (by the PIDs it recorded)."""
    pf = _pidfile(state)
    stopped = 0
    if pf.exists():
        for line in pf.read_text().split():
            try:
                os.killpg(int(line), signal.SIGTERM)
                stopped += 1
            except (ProcessLookupError, ValueError, PermissionError):
                pass
        pf.unlink()
    _say(f"stopped {stopped} sshd process group(s)")
    return 0


def _python(venv: str) -> str:
    py = DEVICE_VENVS / venv / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"[demo] {py} is missing: run `make setup` first")
    return str(py)


def _targets_doc(entries: list[dict], state: Path, known_hosts: Path | None) -> dict:
    defaults = {"runs": 30, "warmup": 3, "threads": 1, "timeout": 300, "connect_timeout": 5, "retries": 1, "max_parallel": 3,
                "allow_fallback": True}
    if known_hosts is not None:
        defaults["known_hosts"] = str(known_hosts)
    return {"defaults": defaults, "targets": entries, "gates": GATES, "db": str(state / "results.db")}


def start_ssh_fleet(state: Path) -> tuple[Path, list]:
    from pipeline.testing.sshd import generate_key, start_sshd

    client_key = generate_key(state / "client" / "id_ed25519", comment="edgepipe-demo")
    devices, entries = [], []
    try:
        for name, kind, venv, desc in FLEET:
            d = start_sshd(name, state / "devices" / name, client_key=client_key, python=_python(venv))
            devices.append(d)
            entries.append({"name": name, "host": d.host, "port": d.port, "user": d.user, "kind": kind,
                            "identity_file": str(client_key), "python": d.python, "workdir": str(d.workdir),
                            "description": desc, **({"runtime": "tflite-runtime==2.14"} if venv == "tflite-runtime" else {})})
    finally:
        _pidfile(state).write_text("".join(f"{d.pid}\n" for d in devices))
    known_hosts = state / "known_hosts"
    known_hosts.unlink(missing_ok=True)  # each demo enrolls its fresh ports explicitly, as a user would
    path = state / "targets.yaml"
    path.write_text(yaml.safe_dump(_targets_doc(entries, state, known_hosts), sort_keys=False))
    for d in devices:
        _say(f"device {d.name}: sshd pid {d.pid} on {d.host}:{d.port}, host key {d.host_key_fingerprint}")
    return path, devices


def write_local_fleet(state: Path) -> Path:
    entries = [{"name": name, "kind": kind, "transport": "local", "python": _python(venv),
                "workdir": str(state / "devices" / name / "home" / ".edgepipe"), "description": desc,
                **({"runtime": "tflite-runtime==2.14"} if venv == "tflite-runtime" else {})}
               for name, kind, venv, desc in FLEET]
    path = state / "targets.yaml"
    path.write_text(yaml.safe_dump(_targets_doc(entries, state, None), sort_keys=False))
    return path


def _edgepipe(args: list[str]) -> int:
    _say("$ edgepipe " + " ".join(args))
    return subprocess.call(EDGEPIPE + args, cwd=REPO)


VERDICTS = {
    0: "PASSED: every gate held; this release may ship.",
    1: "FAILED: at least one gate failed; the report lists each failed check with its measured value, threshold and source.",
    2: "CONFIGURATION ERROR: fix the inventory or the command line (see the one-line error above).",
    3: "INFRASTRUCTURE FAILURE: no device could be measured.",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--state", default=str(REPO / ".demo"))
    ap.add_argument("--down", action="store_true", help="stop the demo fleet's sshd processes and exit")
    ap.add_argument("--local", action="store_true", help="use transport: local targets instead of sshd")
    ap.add_argument("--keep", action="store_true", help="leave the sshd fleet running after the run")
    args = ap.parse_args(argv)
    state = Path(args.state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    if args.down:
        return down(state)
    down(state)  # a previous demo interrupted hard

    from pipeline.convert.worker import run_quiet, stop_worker
    from pipeline.examples.digits import train_digits

    _say("training (or reusing) the digits CNN and its calibration/evaluation data")
    # in the quiet worker, like a conversion: TensorFlow's start-up lines go to the log, not the newcomer's terminal
    log = state / "digits" / "train.log"
    bundle = run_quiet(train_digits, state / "digits", log=log, what=f"training the digits CNN (log: {log})")
    stop_worker()
    _say(f"float model top-1 on the evaluation split: {bundle.float_top1:.3f}")

    use_ssh = not args.local and bool(shutil.which("sshd") or Path("/usr/sbin/sshd").exists())
    devices: list = []
    deployed = None
    try:
        if use_ssh:
            targets, devices = start_ssh_fleet(state)
            rc = _edgepipe(["fleet", "enroll", "--targets", str(targets)])
            if rc != 0:
                return rc
        else:
            _say("note: OpenSSH sshd is not available (no root/apt); using transport: local targets instead")
            targets = write_local_fleet(state)
        report_dir = state / "report"
        rc = _edgepipe(["run", "--targets", str(targets), "--model", str(bundle.model_path),
                        "--data", str(bundle.eval_path), "--calibration", str(bundle.calibration_path),
                        "--report", str(report_dir), "--baseline", "last", "--label", "demo",
                        "--junit", str(state / "junit.xml"), "--summary", str(state / "summary.md"),
                        "--out", str(state / "artifacts")])
        deployed = _ship(targets, state, report_dir) if rc == 0 else None
    finally:
        if devices and not args.keep:
            from pipeline.testing.sshd import stop

            stop(devices)
            _pidfile(state).unlink(missing_ok=True)
            _say(f"stopped {len(devices)} sshd devices")
    report = report_dir / "report.html"
    print()
    print(f"Report:  {report if report.exists() else '(not written)'}")
    print(f"History: {sys.executable} -m pipeline.cli history --db {state / 'results.db'}")
    print(f"Verdict: exit code {rc}: {VERDICTS.get(rc, 'unexpected exit code')}")
    if deployed is not None:
        print(f"Deploy:  exit code {deployed}: " + ("every board runs the release it was gated with, checked on the "
                                                    f"board ({report_dir / 'deploy.html'})" if deployed == 0 else
                                                    "see the table above: failed boards went back by themselves"))
    summary = {"report": str(report), "exit_code": rc, "targets": str(targets), "deploy_exit_code": deployed}
    (state / "last_demo.json").write_text(json.dumps(summary))
    return rc or (deployed or 0)


def _ship(targets: Path, state: Path, report_dir: Path) -> int:
    """The release passed: ship it as on a real fleet (canary first, then every board, each checked against what was
    gated for its class), then show what each board runs."""
    common = ["--targets", str(targets), "--model-name", DEPLOY_NAME]
    rc = _edgepipe(["deploy", "last", *common, "--out", str(state / "artifacts"), "--report", str(report_dir)])
    _edgepipe(["fleet", "status", *common])
    return rc


if __name__ == "__main__":
    sys.exit(main())
