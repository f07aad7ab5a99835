"""Latency per conversion mode per device runtime on MobileNetV2, measured by the agent, as a ratio to float32.

Each runtime runs in its own device venv (no TensorFlow), every mode side by side in one run, repeated; the figure
is the median over repeats of the agent's p50, divided by float32's on the same runtime. Usage:
    python bench/latency.py [--repeats 5] [--runs 20] [--threads 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _mobilenet import CACHE, mobilenet_v2  # noqa: E402

MODES = ["float32", "dynamic", "float16", "int8", "int16x8"]
RUNTIMES = {"ai-edge-litert": REPO / ".venv-devices/litert/bin/python",
            "tflite-runtime 2.14": REPO / ".venv-devices/tflite-runtime/bin/python"}
COMPAT = {"tflite-runtime 2.14": "tflite-runtime==2.14"}


def agent_p50(python: Path, model: Path, data: Path, runs: int, threads: int) -> tuple[float | None, str]:
    proc = subprocess.run([str(python), str(REPO / "device_agents/agent.py"), "--model", str(model), "--data", str(data),
                           "--runs", str(runs), "--warmup", "3", "--threads", str(threads)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        return None, "no JSON"
    if not doc.get("ok"):
        return None, doc["error"]["code"]
    return float(doc["latency_ms"]["p50"]), ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="interpreter threads (1: a pool's speed depends on the cores other jobs leave free)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from pipeline.convert.converter import convert

    load = [round(os.getloadavg()[0], 2)]
    model, cal, ev = mobilenet_v2()
    out = CACHE / "latency_artifacts"
    arts: dict[tuple[str, str], Path] = {}
    for rt in RUNTIMES:
        for mode in MODES:
            a = convert(model, mode, calibration=cal, out_dir=out, cache_dir=CACHE / "convert_cache",
                        compat=COMPAT.get(rt) if mode == "dynamic" else None)
            arts[(rt, mode)] = a.path
    p50: dict[tuple[str, str], list[float]] = {k: [] for k in arts}
    errors: dict[tuple[str, str], str] = {}
    for rep in range(args.repeats):
        for (rt, mode), path in arts.items():  # interleaved, so drift hits every mode alike
            v, err = agent_p50(RUNTIMES[rt], path, ev, args.runs, args.threads)
            if v is None:
                errors[(rt, mode)] = err
            else:
                p50[(rt, mode)].append(v)
        print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in p50.items() if v}
    rows, figures = [], {}
    for rt in RUNTIMES:
        base = med.get((rt, "float32"))
        for mode in MODES:
            m = med.get((rt, mode))
            ratio = (m / base) if (m is not None and base) else None
            figures[f"{rt}.{mode}"] = {"p50_ms": m, "ratio_to_float32": ratio, "error": errors.get((rt, mode))}
            verdict = "" if ratio is None else ("faster" if ratio < 0.9 else "slower" if ratio > 1.1 else "same")
            rows.append(f"| {rt} | {mode} | {'-' if m is None else f'{m:.1f}'} | "
                        f"{'-' if ratio is None else f'{ratio:.2f}x'} | {verdict or errors.get((rt, mode), '')} |")
    table = "\n".join(["| runtime | mode | p50 ms (median) | ratio to float32 | int8 helps? |",
                       "|---|---|---|---|---|"] + rows)
    load.append(round(os.getloadavg()[0], 2))
    doc = {"repeats": args.repeats, "runs": args.runs, "threads": args.threads, "load_average_1m": load,
           "figures": figures, "table_md": table,
           "notes": ["Ratios < 1 mean faster than float32 on the same runtime; absolute ms depend on this noisy 2-core x86 host."]}
    print(json.dumps(doc) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
