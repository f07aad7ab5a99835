"""Device "pythons" for tests and benches that need time to pass on a device without a bigger model.

`delayed_python` runs the real agent under the real runtime after an injected delay (long measurement windows, so
overlaps would show); `sleeping_python` sleeps and replays answers the real agent gave (orchestration cost only,
for scale benches); `gated_python` runs the real agent whose timed phase waits for a file the test writes (a
measurement exactly as slow as the test needs, with no timer). Deploy helpers and probes always go to the real
interpreter.
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
