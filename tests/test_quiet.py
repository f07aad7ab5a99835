"""A quiet terminal: nothing TensorFlow, absl, MLIR or LiteRT prints reaches the user's stderr during `convert`
and `run`; it goes to a log file that errors point at. Without a terminal each stage is one plain line."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.convert.worker import run_quiet
from pipeline.errors import ConfigError, ConversionError

ROOT = Path(__file__).resolve().parents[1]
EDGEPIPE = [sys.executable, "-m", "pipeline.cli"]
DEVICE_PYTHONS = {"litert": ROOT / ".venv-devices" / "litert" / "bin" / "python",
                  "tflite-runtime": ROOT / ".venv-devices" / "tflite-runtime" / "bin" / "python"}
# What those libraries print on their own: absl's pre-init warning and its I/W/E-prefixed lines, oneDNN and CUDA
# probing, the MLIR quantizer's summary, LiteRT's delegate banner, Python warnings from TF/Keras.
LIBRARY_LINE = re.compile(
    r"absl|oneDNN|TF_ENABLE_ONEDNN_OPTS|cuda|cuInit|fully_quantize|inference_type|XNNPACK|TensorFlow Lite|"
    r"^[IWEF]\d{4} \d\d:\d\d:\d\d|^\S+\.cc:\d+\]|UserWarning|DeprecationWarning|tensorflow/|keras/",
    re.IGNORECASE | re.MULTILINE)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "ABSL"))}  # no env-var crutches
    return dict(env, PYTHONPATH=str(ROOT), **extra)


def _library_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if LIBRARY_LINE.search(ln)]


@pytest.mark.slow
def test_convert_json_prints_only_its_own_lines(digits, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([*EDGEPIPE, "convert", str(digits.model_path), "--mode", "int8", "-c",
                           str(digits.calibration_path), "--out", str(out), "--no-cache", "--json"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr
    (art,) = json.loads(proc.stdout)["artifacts"]                     # stdout is the JSON and nothing else
    assert art["mode"] == "int8" and art["cached"] is False
    assert _library_lines(proc.stderr) == [], proc.stderr
    # no terminal: one plain line per stage, so a long conversion is never silent
    lines = proc.stderr.splitlines()
    assert any(ln.startswith("convert int8: loading") for ln in lines), lines
    assert any(ln.startswith("convert int8: converting") for ln in lines), lines
    assert re.search(r"^convert int8: done in \d+\.\d s: .*digits_cnn\.int8\.tflite \(\d+ bytes\)$", proc.stderr, re.M)
    # the libraries did print; it went to the artifact's log
    log = (out / "logs" / "digits_cnn.int8.log").read_text()
    assert "fully_quantize" in log and _library_lines(log)


@pytest.mark.slow
def test_run_prints_only_its_own_lines_and_fits_80_columns(digits, tmp_path):
    devices = tmp_path / "devices"
    (tmp_path / "targets.yaml").write_text("targets:\n" + "".join(
        f"  - {{name: {name}, transport: local, kind: cpu, python: {py}, workdir: {devices / name}, runs: 20,"
        f" warmup: 2{', runtime: tflite-runtime==2.14' if name == 'tflite-runtime' else ''}}}\n"
        for name, py in DEVICE_PYTHONS.items()))
    # a fresh conversion cache: the run converts and computes the float reference with TensorFlow itself
    proc = subprocess.run([*EDGEPIPE, "run", "--model", str(digits.model_path), "--data", str(digits.eval_path),
                           "--cache-dir", str(tmp_path / "cache"), "--baseline", "none", "--json"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [d["ok"] for d in doc["devices"]] == [True, True]
    assert _library_lines(proc.stderr) == [], proc.stderr
    for name in DEVICE_PYTHONS:
        assert f"edgepipe run: {name}: artifact: " in proc.stderr and f"edgepipe run: {name}: done: ok" in proc.stderr

    shown = subprocess.run([*EDGEPIPE, "show", "last"], capture_output=True, text=True, cwd=tmp_path,
                           env=_env(COLUMNS="80"), timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert max(len(ln) for ln in shown.stdout.splitlines()) <= 80 and "…" not in shown.stdout
    rows = [ln.split() for ln in shown.stdout.splitlines() if ln.split()[:1] in (["litert"], ["tflite-runtime"])]
    assert len(rows) == 2 and all("yes" in r for r in rows), shown.stdout   # whole names, one line per device


def _tty_run(argv: list[str], cwd: Path, timeout: float = 900) -> tuple[int, str]:
    """Run `argv` on a pseudo-terminal (as a user's shell would) and return its exit code and everything shown."""
    pid, fd = pty.fork()
    if pid == 0:   # pragma: no cover - the child
        os.chdir(cwd)
        os.execve(argv[0], argv, _env(COLUMNS="100", TERM="xterm-256color"))
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:      # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_live_display_on_a_terminal_is_not_torn(digits, tmp_path):
    code, screen = _tty_run([*EDGEPIPE, "convert", str(digits.model_path), "--mode", "float32", "--out",
                             str(tmp_path / "out"), "--no-cache"], tmp_path)
    assert code == 0, screen
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen).replace("\r", "\n")
    assert _library_lines(plain) == [], plain[-3000:]
    assert re.search(r"float32: converting to float32 \d:\d\d:\d\d", plain), plain[-3000:]   # the live spinner
    assert "convert float32: done in" in plain and "digits_cnn.float32.tflite" in plain


def test_conversion_error_names_its_log_and_quotes_it(tmp_path):
    import tensorflow as tf

    class Svd(tf.Module):   # SVD has no TFLite builtin kernel: conversion fails inside the MLIR converter
        @tf.function(input_signature=[tf.TensorSpec([1, 4, 4], tf.float32)])
        def serve(self, x):
            return {"s": tf.linalg.svd(x, compute_uv=False)}

    m = Svd()
    tf.saved_model.save(m, str(tmp_path / "svd_savedmodel"), signatures={"serving_default": m.serve})
    proc = subprocess.run([*EDGEPIPE, "convert", str(tmp_path / "svd_savedmodel"), "--mode", "float32", "--out",
                           str(tmp_path / "out"), "--no-cache"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=900)
    assert proc.returncode == 2
    (error,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]   # one line for the user
    log = tmp_path / "out" / "logs" / "svd.float32.log"
    assert f"full log: {log}" in error and "conversion to float32 failed" in error
    text = log.read_text()
    assert "Svd" in text and "Traceback" not in proc.stderr and _library_lines(proc.stderr) == []
    quoted = error.split("log ends: ", 1)[1].split("; full log: ")[0]
    assert quoted.strip() and quoted in text


# ---- the worker itself (functions here run in the child, imported from this module) ----
def report_pid_then_sleep(seconds: float, progress) -> None:
    progress("pid", str(os.getpid()))
    time.sleep(seconds)


def die_by_signal() -> None:
    print("about to crash", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)


def raise_config_error() -> None:
    raise ConfigError("bad array", file="data.npz", field="x", hint="reshape it")


def pid_and_noise() -> int:
    os.write(1, b"I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on.\n")
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    return os.getpid()


def _gone(pid: int, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            with open(f"/proc/{pid}/stat") as fh:    # a zombie has exited too (its parent reaps it)
                if fh.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_worker_output_goes_to_the_log_and_errors_keep_their_type(tmp_path, capfd):
    log = tmp_path / "calls" / "one.log"
    pid = run_quiet(pid_and_noise, log=log, what="a test call")
    assert pid != os.getpid()
    out, err = capfd.readouterr()
    assert _library_lines(out + err) == []
    assert "oneDNN" in log.read_text() and "absl::InitializeLog" in log.read_text()
    with pytest.raises(ConfigError) as exc:         # the user's data error, not a "conversion failed"
        run_quiet(raise_config_error, log=tmp_path / "two.log", what="a test call")
    assert exc.value.one_line() == "data.npz: x: bad array (reshape it)"
    assert run_quiet(pid_and_noise, log=log, what="a test call") == pid     # one child, reused


def test_a_crashed_worker_is_a_conversion_error_and_the_next_call_gets_a_new_one(tmp_path):
    log = tmp_path / "crash.log"
    with pytest.raises(ConversionError) as exc:
        run_quiet(die_by_signal, log=log, what="the test step", file="model.keras")
    line = exc.value.one_line()
    assert line.startswith("model.keras: the test step: the TensorFlow worker process died (signal SIGSEGV)")
    assert "log ends: about to crash" in line and f"full log: {log}" in line
    assert run_quiet(pid_and_noise, log=tmp_path / "after.log", what="a test call") > 0


def test_interrupt_kills_the_worker(tmp_path):
    pids = []

    def progress(stage, detail):
        pids.append(int(detail))
        raise KeyboardInterrupt      # what Ctrl-C raises in the main thread while the child works

    with pytest.raises(KeyboardInterrupt):
        run_quiet(report_pid_then_sleep, 300, log=tmp_path / "slow.log", what="a slow step", progress=progress)
    assert _gone(pids[0])


def test_worker_dies_with_its_parent(tmp_path):
    parent_code = (
        "import sys, time\n"
        "from pipeline.convert.worker import run_quiet\n"
        "from tests.test_quiet import report_pid_then_sleep\n"
        "def progress(stage, detail):\n"
        "    print(detail, flush=True)\n"
        f"run_quiet(report_pid_then_sleep, 300, log={str(tmp_path / 'w.log')!r}, what='x', progress=progress)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=_env())
    worker = int(parent.stdout.readline())
    parent.kill()                    # SIGKILL: no atexit, no cleanup in the parent
    parent.wait()
    assert _gone(worker)


def test_stop_worker_mid_call_ends_that_call_and_the_next_one_works(tmp_path):
    import threading

    from pipeline.convert.worker import stop_worker

    pids, errors = [], []

    def call():
        try:
            run_quiet(report_pid_then_sleep, 300, log=tmp_path / "slow.log", what="a slow step",
                      progress=lambda stage, detail: pids.append(int(detail)))
        except ConversionError as exc:
            errors.append(exc.one_line())

    t = threading.Thread(target=call)
    t.start()
    while not pids and t.is_alive():
        time.sleep(0.05)
    stop_worker()                    # e.g. from an interrupt handler while the main thread waits on a conversion
    t.join(60)
    assert not t.is_alive() and _gone(pids[0])
    assert errors and "a slow step: the TensorFlow worker process died (signal SIGKILL)" in errors[0]
    assert run_quiet(pid_and_noise, log=tmp_path / "after.log", what="a test call") not in pids
