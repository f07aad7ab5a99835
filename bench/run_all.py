"""Run every bench/ script with --json and write bench/RESULTS.md (figures, machine, date, commit).

Each figure is a ratio measured side by side inside one script run; scripts report medians over repeats.
Usage: python bench/run_all.py [--only NAME ...] [--out bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Order: cheap first. Each entry: (script, title, what the figure means).
SUITE = [
    ("convert.py", "Conversion: size per mode vs float32 (MobileNetV2), conversion time, cached re-run"),
    ("latency.py", "Latency per mode per runtime (MobileNetV2, measured by the agent), as a ratio to float32"),
    ("agent_overhead.py", "Agent overhead against a bare invoke() loop"),
    ("fanout.py", "Fan-out wall time (1/4/8 loopback sshd devices), re-run ratio"),
    ("push.py", "Push throughput of a 200 MB file against OpenSSH scp, on an open connection and cold; a push cut "
                "at half, resumed"),
    ("hashing.py", "Integrity: the host's sha256 work per warm run of a 100 MB model, against the run's wall time"),
    ("host_cpu.py", "Orchestrator host CPU per device, warm run, 1 vs 24 loopback sshd devices"),
    ("regression.py", "Regression detector: A/A false-alarm rate, detection rate of a 20% slowdown"),
    ("optimize.py", "edgepipe optimize: int8 recovery on MobileNetV2 with an outlier, format claims vs measured, "
                    "optimize vs run wall time"),
    ("arm64_start.py", "Emulated Raspberry Pi 4 (qemu user-mode): cached start time against an x86 sshd device"),
    ("deploy.py", "edgepipe deploy to 32 loopback boards (upload, switch, health check) vs a parallel scp + ssh mv -T "
                  "loop, wall time ratio and host CPU per device-deploy"),
    ("scale.py", "Orchestration at scale: host CPU per device-run and wall time, 1-128 sleeping devices, one "
                 "orchestrator vs two site workers (docs/scaling.md)"),
]


def _machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": str(os.cpu_count()), "machine": platform.machine(),
            "os": platform.platform(), "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit + (" (+ uncommitted changes)" if dirty else "")}


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list) and obj and all(not isinstance(v, (dict, list)) for v in obj) and len(obj) <= 12:
        yield prefix, ", ".join(_fmt(v) for v in obj)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, _fmt(obj)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _targets(doc: dict) -> list[dict]:
    """Each script's target checks as [{name, value, target, met}] (scripts report them in a few shapes)."""
    t = doc.get("targets")
    if isinstance(t, list):
        return t
    if isinstance(t, dict) and isinstance(doc.get("met"), dict):  # thresholds + separate met flags
        return [{"name": k, "value": None, "target": "see figures", "met": bool(v)} for k, v in doc["met"].items()]
    if isinstance(t, dict) and all(isinstance(v, bool) for v in t.values()):
        return [{"name": k, "value": None, "target": k, "met": v} for k, v in t.items()]
    return []


def _section(title: str, script: str, doc: dict, seconds: float) -> str:
    lines = [f"## {title}", "", f"`python bench/{script}` · {seconds:.0f} s", ""]
    if doc.get("table_md"):
        lines += [doc["table_md"], ""]
    targets = _targets(doc)
    if targets:
        lines += ["| figure | measured | target | met |", "|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t.get('name')} | {_fmt(t.get('value'))} | {t.get('target')} | {'yes' if t.get('met') else '**no**'} |")
        lines.append("")
    figures = {k: v for k, v in doc.items() if k not in ("targets", "met", "table_md", "notes")}
    if figures:
        lines += ["<details><summary>all figures</summary>", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _flatten(figures)]
        lines += ["", "</details>", ""]
    for note in doc.get("notes") or []:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def _run_script(script: str) -> tuple[dict | None, float, int]:
    print(f"== bench/{script}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(HERE / script), "--json"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    seconds = time.monotonic() - t0
    try:
        doc = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None
    except (ValueError, IndexError):
        doc = None
    return (doc if proc.returncode == 0 else None), seconds, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", default=None, help="re-run these benches; keep the others' last figures")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if args.only and out.with_suffix(".json").exists() else {}
    raw: dict[str, dict] = dict(previous.get("benches", {}))
    machine = _machine()
    failures: list[str] = []
    for script, _title in SUITE:
        name = script.removesuffix(".py")
        if args.only and name not in args.only:
            continue
        doc, seconds, rc = _run_script(script)
        if doc is None:
            failures.append(f"{script}: exit {rc}")
            raw.pop(name, None)
            continue
        raw[name] = {"seconds": round(seconds, 1), "figures": doc, "date": machine["date"], "commit": machine["commit"]}
    sections, misses = [], []
    for script, title in SUITE:
        name = script.removesuffix(".py")
        if name not in raw:
            sections.append(f"## {title}\n\n`bench/{script}` has no figures (it failed or was not run).\n")
            continue
        entry = raw[name]
        sections.append(_section(title, script, entry["figures"], entry["seconds"]))
        misses += [f"{script}: {t['name']} = {_fmt(t.get('value'))} (target {t.get('target')})"
                   for t in _targets(entry["figures"]) if not t.get("met")]
    head = ["# edgepipe benchmark results", "",
            "Every figure is a ratio measured side by side in one run on this machine; medians over repeats.",
            "Reproduce with `make bench` (writes this file and RESULTS.json).", "",
            "| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in machine.items()] + [""]
    if misses:
        head += ["**Targets missed** (the reasons are in each section and in the README):", ""]
        head += [f"- {m}" for m in misses] + [""]
    if failures:
        head += ["**Scripts that failed:**", ""] + [f"- {f}" for f in failures] + [""]
    out.write_text("\n".join(head) + "\n" + "\n".join(sections))
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "benches": raw}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
