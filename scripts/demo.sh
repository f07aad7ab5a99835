#!/usr/bin/env bash
# `make demo`: convert the digits CNN for three kinds of targets, deploy it over SSH to a local fleet of real sshd
# devices on loopback, measure, gate, store and report. `make demo-down` stops a fleet left running.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [[ "${1:-}" == "--down" ]]; then exec "$PY" -m pipeline.testing.demo "$@"; fi
flags=()
if ! bash scripts/system_deps.sh --demo; then
  echo "[demo] note: openssh-server is not installed and cannot be (no root/apt): using transport: local targets" >&2
  flags+=(--local)
fi
exec "$PY" -m pipeline.testing.demo "${flags[@]}" "$@"
