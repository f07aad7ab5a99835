"""The README's push, orchestrator-CPU and optimize figures are the ones bench/RESULTS.json recorded, not figures from memory."""
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


def test_optimize_rows_follow_the_recorded_bench():
    fig = json.loads((REPO / "bench" / "RESULTS.json").read_text())["benches"]["optimize"]["figures"]
    readme = (REPO / "README.md").read_text()
    t, rec = fig["demo_time"], fig["recovery"]["ai-edge-litert"]
    assert f"**{t['ratio']:.2f}×**" in row(readme, "| `edgepipe optimize` vs one `edgepipe run`")
    line = row(readme, "| int8 recovery: MobileNetV2")
    assert f"**{rec['recovered']['top1']:.3f}**" in line and f"full int8 {rec['int8_top1']:.3f}" in line
    assert f"**{100 * rec['recovered']['int8_share']:.1f} %**" in line and rec["recovered"]["within_budget"]
    dyn = fig["claims"]["ai-edge-litert"]["dynamic"]
    assert f"| {dyn['smaller_measured']:.2f}× smaller" in row(readme, '| dynamic range "2–3× faster, 4× smaller"')
    stuck, ranking = fig["recovery_stuck"]["ai-edge-litert"], fig["ranking_stuck"]
    r = stuck["recovered"]
    line = row(readme, "| int8 recovery, activation outlier: the same MobileNetV2")
    assert f"**{r['top1']:.3f}**" in line and f"full int8 {stuck['int8_top1']:.3f}" in line and r["within_budget"]
    assert f"with {len(r['layers_kept'])} layers kept in float (float32 {stuck['float32_top1']:.3f})" in line
    assert f"**{100 * r['int8_share']:.1f} %**" in line and f"host ranking **{ranking['seconds']:.1f} s**" in line
    assert (f"{r['bytes_vs_int8']:.3f}× the size and {r['p50_vs_int8']:.2f}× the p50 of full int8, "
            f"{r['bytes_vs_float32']:.2f}× the size and {r['p50_vs_float32']:.2f}× the p50 of float32") in line
    first = fig["worst_layers_stuck"][0]
    assert f"RMSE / scale {first['rmse_scale']:.3f} there" in line
    text = " ".join(readme.split())
    assert (f"that layer's RMSE / scale is {first['rmse_scale']:.3f} and its relative error {first['rel_error']:.2f}; "
            f"keeping it and its reader in float brings top-1 agreement with float on the held-out samples from "
            f"{ranking['int8']['agreement']:.2f} to {first['effect']['agreement']:.2f} (SNR "
            f"{ranking['int8']['snr_db']:.1f} to {first['effect']['snr_db']:.1f} dB)") in text
