"""The README's push and orchestrator-CPU figures are the ones bench/RESULTS.json recorded, not figures from memory."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def row(readme: str, start: str) -> str:
    rows = [ln for ln in readme.splitlines() if ln.startswith(start)]
    assert len(rows) == 1, f"README should have one Performance row starting {start!r}"
    return rows[0]


def test_push_and_host_cpu_rows_follow_the_recorded_bench():
    benches = json.loads((REPO / "bench" / "RESULTS.json").read_text())["benches"]
    push, cpu = benches["push"]["figures"], benches["host_cpu"]["figures"]
    readme = (REPO / "README.md").read_text()
    assert f"**{push['put_over_scp_open']:.2f}×**" in row(readme, "| push of 200 MB vs OpenSSH `scp`, both on an open")
    assert f"**{push['put_over_scp_cold']:.2f}×**" in row(readme, "| push of 200 MB cold")
    assert f"**{cpu['marginal_ms_per_device']:.1f} ms**" in row(readme, "| orchestrator CPU per extra device")
    assert push["file_mb"] == 200 and cpu["devices"] == 24
