"""Every number in the README's Performance section is one bench/RESULTS.json recorded, not a figure from memory.

Each table row and each sentence with figures is listed here with the strings it must hold, formatted from
RESULTS.json. Once those strings are taken out, no number may be left in the section, except in a sentence that says
it is illustrative and a few settings of the code (sizes and timers, not measurements). So a changed figure, a new
figure without a source, or a recorded figure the README no longer shows fails this test.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.examples.outliers import STUCK

REPO = Path(__file__).resolve().parent.parent
# A number on its own: not part of a name such as int8, float32, x86, aes128-ctr, hmac-sha2-256 or 16x8.
NUMBER = re.compile(r"(?<![\w.@-])\d+(?:\.\d+)?(?![\w@]|\.\d)")
# Settings of the code that the prose names (protocol sizes, timers): not measurements.
SETTINGS = ("255 KiB", "32 KiB", "every 20 ms", "every 0.1 s", "(0.2 s and\n1 s at most)")


def section(readme: str) -> str:
    return readme[readme.index("## Performance"):readme.index("## Development")]


def x2(v: float) -> str:
    """A ratio as the README writes it: two decimals below 10, a whole number above."""
    return f"{v:.2f}" if v < 10 else f"{v:.0f}"


def probe_row(agent_overhead: dict) -> list[str]:
    """The strings of the README row on the agent's conditions and memory probes (issue 22)."""
    probes = {p["venv"]: p for p in agent_overhead["probes"]}
    lit, tfr = probes["litert"], probes["tflite-runtime"]
    target = next(t["target"] for t in agent_overhead["targets"] if "probes" in t["name"])
    return [f"({lit['runs']} runs, {lit['rounds']} rounds)",
            f"**{100 * lit['probe_share_of_process_wall']:.2f} %** (LiteRT)",
            f"**{100 * tfr['probe_share_of_process_wall']:.2f} %** (tflite-runtime)",
            f"(target < {100 * float(target.lstrip('< ')):g} %)",
            f"CPU {lit['ratio_of_process_cpu']:.3f}× / {tfr['ratio_of_process_cpu']:.3f}×",
            f"wall {lit['ratio_of_process_walls']:.3f}× / {tfr['ratio_of_process_walls']:.3f}×",
            f"{100 * lit['cpu_ratio_sd_per_round']:.1f} %–{100 * tfr['cpu_ratio_sd_per_round']:.1f} %"]


def expected(doc: dict) -> dict[str, list[str]]:
    """README anchor (a row's start, or a sentence's words) -> the strings formatted from RESULTS.json it holds."""
    b = doc["benches"]
    conv, lat = b["convert"]["figures"], b["latency"]["figures"]
    agent = {r["venv"]: r for r in b["agent_overhead"]["figures"]["results"]}
    fan, push, cpu = b["fanout"]["figures"], b["push"]["figures"], b["host_cpu"]["figures"]
    reg, opt = b["regression"]["figures"], b["optimize"]["figures"]
    dep = b["deploy"]["figures"]
    size = {m: conv["modes"][m]["size_ratio"] for m in conv["modes"]}
    lit = {k.split(".", 1)[1]: v["ratio_to_float32"] for k, v in lat["figures"].items() if k.startswith("ai-edge")}
    tfr = {k.rsplit(".", 1)[1]: v["ratio_to_float32"] for k, v in lat["figures"].items() if k.startswith("tflite")}
    (tfr_name,) = {k.rsplit(".", 1)[0] for k in lat["figures"] if k.startswith("tflite")}
    n = reg["cycles"]
    rec = opt["recovery"]["ai-edge-litert"]
    stuck, stuck_rank = opt["recovery_stuck"]["ai-edge-litert"], opt["ranking_stuck"]
    alpha, px = re.search(r"alpha=([\d.]+), (\d+)x\d+", opt["model"]).groups()
    kept = int(re.fullmatch(r"int8\+float(\d+)", rec["recovered"]["variant"]).group(1))
    push_target = float(push["targets"][0]["target"].lstrip(">= "))
    cpu_target = cpu["targets"][0]["target"].lstrip("<= ")
    fan_target = float(fan["targets"][0]["target"].lstrip("<= "))
    minutes = round(sum(e["seconds"] for e in b.values()) / 60)
    return {
        "2-core x86 machine": [f"{doc['machine']['cores']}-core"],
        "| artifact size vs float32": [f"dynamic **{size['dynamic']:.3f}×**", f"int8 **{size['int8']:.3f}×**",
                                      f"float16 **{size['float16']:.3f}×**", f"int16x8 {size['int16x8']:.3f}×"],
        "| cached re-conversion vs cold": [f"**{conv['cache_ratio']:.2g}×**"],
        "| latency vs float32 on ai-edge-litert": [
            f"{lat['threads']} thread", f"int8 **{x2(lit['int8'])}×**", f"float16 {x2(lit['float16'])}×",
            f"dynamic {x2(lit['dynamic'])}×", f"int16x8 {x2(lit['int16x8'])}×"],
        f"| latency vs float32 on {tfr_name}": [
            tfr_name, f"float16 {x2(tfr['float16'])}×", f"int8 {x2(tfr['int8'])}×", f"dynamic {x2(tfr['dynamic'])}×",
            f"int16x8 {x2(tfr['int16x8'])}×"],
        "| agent vs a bare `invoke()` loop": [
            f"({agent['litert']['rounds']} rounds)", f"**{agent['litert']['ratio_of_means']:.2f}×** (LiteRT)",
            f"**{agent['tflite-runtime']['ratio_of_means']:.2f}×** (tflite-runtime)"],
        "| the agent's conditions and memory probes": probe_row(b["agent_overhead"]["figures"]),
        "| identical second `edgepipe run`": [f"**{fan['rerun_cli']['again_bytes_sent']} bytes**",
                                             f"**{fan['rerun_cli']['again_over_cold']:.2f}×**"],
        "| push of 200 MB vs OpenSSH `scp`, both on an open": [
            f"push of {push['file_mb']} MB", f"**{push['put_over_scp_open']:.2f}×**", f"(target ≥ {push_target}×)",
            f"CPU {push['client_cpu_s']['put_open']:.2f} s vs {push['client_cpu_s']['scp_controlmaster']:.2f} s"],
        "| push of 200 MB cold": [f"push of {push['file_mb']} MB", f"**{push['put_over_scp_cold']:.2f}×**"],
        **resumed_and_hashing(push, b["hashing"]["figures"]),
        "| orchestrator CPU per extra device": [
            f"1 vs {cpu['devices']} loopback", f"**{cpu['marginal_ms_per_device']:.1f} ms**",
            f"(target ≤ {cpu_target})"],
        "| latency regression gate on back-to-back whole runs": [
            f"{reg['work_ratio_B_over_A']:.1f}× MACs",
            f"**{round(reg['false_alarm_rate'] * 2 * n)}/{2 * n}**",
            f"({round(reg['false_alarm_rate_same_artifact'] * n)}/{n} same artifact",
            f"{round(reg['false_alarm_rate_same_work_other_artifact'] * n)}/{n} retrained",
            f"**{round(reg['detection_rate'] * n)}/{n}**", f"{reg['whole_runs']} whole runs in {reg['seconds']:.0f} s"],
        "| `edgepipe optimize` vs one `edgepipe run`": [
            f"**{opt['demo_time']['ratio']:.2f}×**",
            f"(target ≤ {float(opt['demo_time']['target'].lstrip('<= ')):g}×)",
            f"empty conversion caches {opt['demo_time']['cold_ratio']:.2f}×"],
        "| int8 recovery: MobileNetV2": [
            f"MobileNetV2 {alpha}/{px}", f"full int8 {rec['int8_top1']:.3f}", f"**{rec['recovered']['top1']:.3f}**",
            f"with {kept} layer kept", f"(float32 {rec['float32_top1']:.3f})",
            f"**{100 * rec['recovered']['int8_share']:.1f} %**",
            f"{rec['recovered']['bytes_vs_int8']:.3f}× the size of full int8",
            f"{rec['recovered']['bytes_vs_float32']:.2f}× float32"],
        "| int8 recovery, activation outlier": [
            f"stuck at {STUCK:,.0f} at its first op", f"(RMSE / scale {opt['worst_layers_stuck'][0]['rmse_scale']:.3f}",
            f"full int8 {stuck['int8_top1']:.3f}", f"**{stuck['recovered']['top1']:.3f}**",
            f"with {len(stuck['recovered']['layers_kept'])} layers kept", f"(float32 {stuck['float32_top1']:.3f})",
            f"**{100 * stuck['recovered']['int8_share']:.1f} %**", f"host ranking **{stuck_rank['seconds']:.1f} s**",
            f"{stuck['recovered']['bytes_vs_int8']:.3f}× the size and {stuck['recovered']['p50_vs_int8']:.2f}× the p50 "
            "of full int8", f"{stuck['recovered']['bytes_vs_float32']:.2f}× the size and "
            f"{stuck['recovered']['p50_vs_float32']:.2f}× the p50 of float32"],
        "| fan-out, 8 loopback devices vs 1": [
            f"fan-out, {max(fan['fanout']['ratio_to_1'], key=int)} loopback devices vs 1",
            f"{fan['fanout']['ratio_to_1']['8']:.2f}×", f"(target {fan_target}×"],
        "| `edgepipe deploy` to": [
            f"to {dep['devices']} loopback boards", f"**{dep['deploy_over_plain']:.2f}×**",
            f"(target ≤ {float(dep['targets'][0]['target'].lstrip('<= ')):g}×)",
            f"host CPU per device-deploy {dep['host_cpu_ms_per_device_deploy']['edgepipe']:.0f} ms vs "
            f"{dep['host_cpu_ms_per_device_deploy']['plain']:.0f} ms"],
        "The deploy ratio": [
            f"from {min(dep['per_round_ratio']):.2f}× to {max(dep['per_round_ratio']):.2f}×",
            f"{dep['edgepipe_phases_median_s']['health_check_s']:.2f} s",
            f"{dep['edgepipe_phases_median_s']['upload_stage_switch_s']:.2f} s"],
        "What the latency table says": [f"the older {tfr_name} has slow int8"],
        "the machine was": [f"{100 * fan['fanout']['machine_cpu_busy']['8']:.0f} % busy",
                            f"alone cost {fan['fanout_replayed_agent']['ratio_to_1']['8']:.2f}×"],
        "load average at": [f"{round(push['load_average_1m'][0])}–{round(push['load_average_1m'][1])} and "
                            f"{round(cpu['load_average_1m'][0])}–{round(cpu['load_average_1m'][1])}",
                            f"push {min(push['per_round_open']):.2f}×–{max(push['per_round_open']):.2f}×"],
        "the same put reached": [
            f"reached {push['old_settings_over_scp_open']:.2f}×",
            f"used {push['client_cpu_s']['put_open_old_settings'] / push['client_cpu_s']['put_open']:.1f}× the CPU",
            f"({push['client_cpu_s']['put_open_old_settings']:.2f} s per file)"],
        "on an exec\nchannel was faster still": [f"({push['cat_over_scp_open']:.2f}×)"],
        "the recorded runs' sum": [f"about {minutes} minutes"],
    }


def resumed_and_hashing(push: dict, hashing: dict) -> dict[str, list[str]]:
    """Issue 19's rows: a cut push resumed (bench/push.py) and the host's hashing per warm run (bench/hashing.py)."""
    r, touched = push["resume"], hashing["after_a_touch"]
    exact = "exactly the missing bytes" if r["resumed_sent_bytes"] == r["missing_bytes"] else "MORE than the missing"
    return {
        "| push of 200 MB cut at about half": [f"push of {push['file_mb']} MB", f"({r['rounds']} rounds)", exact,
                                              f"**{r['resumed_sent_share']:.3f}×**",
                                              f"**{r['resume_over_whole_time']:.2f}×**"],
        "| host sha256 work per warm run": [f"of a {round(hashing['model_mb'])} MB model",
                                            f"({hashing['rounds']} runs)",
                                            f"**{100 * hashing['hash_share_of_warm_run']:.2f} %**",
                                            f"(target < {100 * float(hashing['targets'][0]['target'].lstrip('< ')):g} %)",
                                            f"{100 * touched['hash_share']:.2f} %"],
    }


def _units(text: str) -> list[str]:
    """The section as table rows and sentences (a sentence may span lines)."""
    rows = [ln for ln in text.splitlines() if ln.startswith("|")]
    prose = "\n".join(ln for ln in text.splitlines() if not ln.startswith("|"))
    return rows + re.split(r"(?<=[.:;])\s+(?=[A-Z`(])", prose)


def test_every_number_in_the_performance_section_was_recorded_by_a_bench():
    doc = json.loads((REPO / "bench" / "RESULTS.json").read_text())
    text = section((REPO / "README.md").read_text())
    left = text
    for anchor, figures in expected(doc).items():
        found = [u for u in _units(text) if anchor in u]
        assert len(found) == 1, f"the Performance section should have one row or sentence with {anchor!r}"
        unit = found[0]
        for fig in figures:
            assert fig in unit, f"{anchor!r}: README does not say {fig!r} (bench/RESULTS.json)\n{found[0]}"
            unit = unit.replace(fig, "", 1)
        left = left.replace(found[0], unit)
    for setting in SETTINGS:
        assert setting in left, setting
        left = left.replace(setting, "")
    for unit in _units(left):
        if "illustrative" not in unit:
            assert not NUMBER.findall(unit), f"no bench/RESULTS.json figure for {NUMBER.findall(unit)} in: {unit!r}"


def test_optimize_claims_row_follows_the_recorded_bench():
    fig = json.loads((REPO / "bench" / "RESULTS.json").read_text())["benches"]["optimize"]["figures"]
    readme = (REPO / "README.md").read_text()
    [line] = [ln for ln in readme.splitlines() if ln.startswith('| dynamic range "2–3× faster, 4× smaller"')]
    dyn = fig["claims"]["ai-edge-litert"]["dynamic"]
    assert f"| {dyn['smaller_measured']:.2f}× smaller" in line


def test_optimize_recovery_paragraph_follows_the_recorded_bench():
    """The activation outlier's figures in the optimize section (outside Performance) are the bench's too."""
    fig = json.loads((REPO / "bench" / "RESULTS.json").read_text())["benches"]["optimize"]["figures"]
    text = " ".join((REPO / "README.md").read_text().split())
    first, ranking = fig["worst_layers_stuck"][0], fig["ranking_stuck"]
    assert (f"that layer's RMSE / scale is {first['rmse_scale']:.3f} and its relative error {first['rel_error']:.2f}; "
            f"keeping it and its reader in float brings top-1 agreement with float on the held-out samples from "
            f"{ranking['int8']['agreement']:.2f} to {first['effect']['agreement']:.2f} (SNR "
            f"{ranking['int8']['snr_db']:.1f} to {first['effect']['snr_db']:.1f} dB)") in text


def test_numbers_are_told_from_names():
    assert NUMBER.findall("int8 0.44×, float32, x86, aes128-ctr, hmac-sha2-256, 16x8, 2-core, 1.2× MACs, 0/60") == \
        ["0.44", "2", "1.2", "0", "60"]
