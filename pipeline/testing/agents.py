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
for a in "$@"; do [ "$a" = "--probe" ] && exec {real} "$@"; done
sleep {seconds}
exec cat {result}
"""


def delayed_python(path: Path, real: str | Path, seconds: float) -> str:
    path = Path(path)
    path.write_text(DELAYED.format(real=shlex.quote(str(real)), seconds=seconds))
    path.chmod(0o755)
    return str(path)


def sleeping_python(path: Path, real: str | Path, seconds: float, result: dict) -> str:
    """`result`: a real agent result document (schema-valid), replayed as the device's answer."""
    path = Path(path)
    answer = path.with_suffix(".result.json")
    answer.write_text(json.dumps(result))
    path.write_text(SLEEPING.format(real=shlex.quote(str(real)), seconds=seconds, result=shlex.quote(str(answer))))
    path.chmod(0o755)
    return str(path)
