"""Device "pythons" for tests and benches that need time to pass on a device without a bigger model.

`paced_python` makes every invoke of a model of a given mode last a set time (candidates built to run equally
fast, or one faster by an injected margin); `delayed_python` runs the real agent under the real runtime after an
injected delay (long measurement windows, so overlaps would show); `sleeping_python` sleeps and replays answers the
real agent gave (orchestration cost only, for scale benches); `gated_python` runs the real agent whose timed phase
waits for a file the test writes (a measurement exactly as slow as the test needs, with no timer). Deploy helpers
and probes always go to the real interpreter.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

DELAYED = """#!/bin/sh
# the agent's measurement starts {seconds}s late: an injected delay, the agent itself is real
for a in "$@"; do [ "$a" = "--model" ] && {{ sleep {seconds}; break; }}; done
exec {real} "$@"
"""

SLEEPING = """#!/bin/sh
# a device whose agent sleeps {seconds}s instead of computing, then answers what the real agent once answered
case "$1" in -c) exec {real} "$@";; esac
for a in "$@"; do [ "$a" = "--probe" ] && exec {probe}; done
sleep {seconds}
exec cat {result}
"""


def delayed_python(path: Path, real: str | Path, seconds: float) -> str:
    path = Path(path)
    path.write_text(DELAYED.format(real=shlex.quote(str(real)), seconds=seconds))
    path.chmod(0o755)
    return str(path)


def sleeping_python(path: Path, real: str | Path, seconds: float, result: dict, probe: dict | None = None) -> str:
    """`result` (and `probe`): real agent answers (schema-valid), replayed as the device's; without `probe` the
    real agent probes."""
    path = Path(path)
    answer = path.with_suffix(".result.json")
    answer.write_text(json.dumps(result))
    probe_cmd = f'{shlex.quote(str(real))} "$@"'
    if probe is not None:
        probe_file = path.with_suffix(".probe.json")
        probe_file.write_text(json.dumps(probe))
        probe_cmd = f"cat {shlex.quote(str(probe_file))}"
    path.write_text(SLEEPING.format(real=shlex.quote(str(real)), seconds=seconds, result=shlex.quote(str(answer)),
                                    probe=probe_cmd))
    path.chmod(0o755)
    return str(path)


PACED = """#!/bin/sh
# test-only: the agent's model invokes take at least the time given for the model's mode (an injected delay);
# the agent and the runtime are real, the probe and the helpers run untouched
for a in "$@"; do [ "$a" = "--model" ] && {{ export PYTHONPATH={site} EDGEPIPE_PACE_MS={pace}; break; }}; done
exec {real} "$@"
"""

# Imported first by the device's Python (PYTHONPATH): wraps the runtime's Interpreter.invoke so that each invoke
# lasts at least EDGEPIPE_PACE_MS for the mode its tensors show ("int8=4,*=2": int8 models 4 ms, the rest 2 ms).
PACE_SITE = r'''
import os
import time

def _pace():
    out = {}
    for item in os.environ.get("EDGEPIPE_PACE_MS", "").split(","):
        if "=" in item:
            mode, ms = item.split("=", 1)
            out[mode.strip()] = float(ms) / 1000.0
    return out

def _mode(interp):
    inp = interp.get_input_details()[0]["dtype"].__name__
    kinds = {d["dtype"].__name__ for d in interp.get_tensor_details()}
    if inp in ("int8", "uint8"):
        return "int8"
    for dtype, mode in (("int16", "int16x8"), ("float16", "float16"), ("int8", "dynamic")):
        if dtype in kinds:
            return mode
    return "float32"

def _patch(cls, pace):
    invoke = cls.invoke

    def paced(self, *args, **kwargs):
        start = time.perf_counter()
        out = invoke(self, *args, **kwargs)
        if not hasattr(self, "_edgepipe_pace"):
            mode = _mode(self)
            self._edgepipe_pace = pace.get(mode, pace.get("*", 0.0))
        end = start + self._edgepipe_pace
        while True:
            left = end - time.perf_counter()
            if left <= 0:
                return out
            time.sleep(left)

    cls.invoke = paced

_PACE = _pace()
if _PACE:
    try:
        from ai_edge_litert import interpreter as _rt
    except ImportError:
        from tflite_runtime import interpreter as _rt
    _patch(_rt.Interpreter, _PACE)
'''


def paced_python(path: Path, real: str | Path, pace_ms: dict[str, float]) -> str:
    """A device "python" whose agent runs every invoke of a model for at least `pace_ms[mode]` ms (`"*"`: any
    other mode), the mode read from the model's tensor types: candidates built to run equally fast, or one faster
    by an injected margin, on any machine."""
    path = Path(path)
    site = path.with_name(path.name + ".site")
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(PACE_SITE)
    pace = ",".join(f"{mode}={ms:g}" for mode, ms in pace_ms.items())
    path.write_text(PACED.format(real=shlex.quote(str(real)), site=shlex.quote(str(site)), pace=shlex.quote(pace)))
    path.chmod(0o755)
    return str(path)


GATED = """#!/bin/sh
# the real agent, whose timed phase waits for {gate}/go (helper steps and probes go straight to the real python)
case "$1" in -c) exec {real} "$@";; esac
for a in "$@"; do [ "$a" = "--model" ] && exec {real} {shim} {gate} "$@"; done
exec {real} "$@"
"""

GATE_SHIM = """
import importlib.util, os, sys, time
gate, agent_path, args = sys.argv[1], sys.argv[2], sys.argv[3:]
spec = importlib.util.spec_from_file_location("edgepipe_agent", agent_path)
agent = importlib.util.module_from_spec(spec)
spec.loader.exec_module(agent)
timed = agent.time_model


def note(what):
    with open(os.path.join(gate, "log"), "a") as f:
        f.write("%s %d %.6f\\n" % (what, os.getpid(), time.time()))


def gated(*a, **kw):
    note("enter")
    open(os.path.join(gate, "measuring-%d" % os.getpid()), "w").close()
    try:
        while not os.path.exists(os.path.join(gate, "go")):
            time.sleep(0.02)
        return timed(*a, **kw)
    finally:
        note("exit")


agent.time_model = gated
sys.argv = [agent_path] + args
sys.exit(agent.main(args))
"""


def gated_python(path: Path, real: str | Path, gate: Path) -> str:
    """A device python whose agent measures only once `gate/go` exists. While it waits it has taken the board's
    lock and written `gate/measuring-<pid>`; `gate/log` gets "enter|exit PID EPOCH" lines from the agent itself."""
    path, gate = Path(path), Path(gate)
    gate.mkdir(parents=True, exist_ok=True)
    shim = path.with_suffix(".shim.py")
    shim.write_text(GATE_SHIM)
    path.write_text(GATED.format(real=shlex.quote(str(real)), shim=shlex.quote(str(shim)), gate=shlex.quote(str(gate))))
    path.chmod(0o755)
    return str(path)


def gate_log(gate: Path) -> list[tuple[str, int, float]]:
    """The gated agents' own (what, pid, epoch seconds) lines, in order."""
    f = Path(gate) / "log"
    rows = [line.split() for line in f.read_text().splitlines()] if f.exists() else []
    return [(w, int(p), float(t)) for w, p, t in rows]
