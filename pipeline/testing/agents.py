"""Device "pythons" for tests and benches that need time to pass on a device without a bigger model.

`delayed_python` runs the real agent under the real runtime after an injected delay (long measurement windows, so
overlaps would show); `sleeping_python` sleeps and replays answers the real agent gave (orchestration cost only,
for scale benches). Deploy helpers and probes always go to the real interpreter.
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
