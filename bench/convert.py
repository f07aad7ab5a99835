"""Conversion benchmark: MobileNetV2 (random weights, BatchNorm statistics re-estimated) in every mode.

Prints each mode's size as a ratio to float32 and its cold conversion time, then the time of a cached re-run as a
ratio to the cold conversion, all measured side by side in one run. `--json` prints one JSON object instead.
Targets: int8 <= 0.27x, dynamic <= 0.27x, float16 <= 0.51x of float32; cached re-run <= 0.05x of cold.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _mobilenet import mobilenet_v2  # noqa: E402

MODES = ("float32", "dynamic", "float16", "int8", "int16x8")
SIZE_TARGETS = {"int8": 0.27, "dynamic": 0.27, "float16": 0.51}
CACHE_TARGET = 0.05


def run(work: Path, log=print) -> dict:
    from pipeline.convert.converter import convert

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log("building (or reusing) MobileNetV2 (weights=None, BatchNorm re-estimated)...")
    model, calib, _ = mobilenet_v2()
    cache = work / "cache"
    rows: dict[str, dict] = {}
    for mode in MODES:
        t0 = time.perf_counter()
        art = convert(model, mode, calibration=calib, out_dir=work / "cold", cache_dir=cache)
        cold = time.perf_counter() - t0
        assert not art.cached
        rows[mode] = {"bytes": art.bytes, "cold_seconds": round(cold, 3)}
        log(f"  {mode:8s} cold {cold:6.1f} s  {art.bytes / 2**20:6.2f} MiB")
    for mode in MODES:
        times = []
        for i in range(5):
            t0 = time.perf_counter()
            art = convert(model, mode, calibration=calib, out_dir=work / f"warm{i}", cache_dir=cache)
            times.append(time.perf_counter() - t0)
            assert art.cached
        rows[mode]["cached_seconds"] = round(statistics.median(times), 4)
    f32 = rows["float32"]["bytes"]
    for mode, r in rows.items():
        r["size_ratio"] = round(r["bytes"] / f32, 4)
        r["cache_ratio"] = round(r["cached_seconds"] / r["cold_seconds"], 4)
    total_cold = sum(r["cold_seconds"] for r in rows.values())
    total_cached = sum(r["cached_seconds"] for r in rows.values())
    checks = [{"name": f"{m} size / float32 size", "value": rows[m]["size_ratio"], "target": f"<= {t}",
               "met": rows[m]["size_ratio"] <= t} for m, t in SIZE_TARGETS.items()]
    checks.append({"name": "cached re-run / cold conversion (all modes)", "value": round(total_cached / total_cold, 4),
                   "target": f"<= {CACHE_TARGET}", "met": total_cached / total_cold <= CACHE_TARGET})
    table = "\n".join(["| mode | MiB | size / float32 | cold conversion s | cached re-run s |", "|---|---|---|---|---|"] + [
        f"| {m} | {r['bytes'] / 2**20:.2f} | {r['size_ratio']:.3f} | {r['cold_seconds']:.1f} | {r['cached_seconds']:.3f} |"
        for m, r in rows.items()])
    return {"bench": "convert", "model": "MobileNetV2(weights=None, 224x224)", "modes": rows,
            "cold_total_seconds": round(total_cold, 2), "cached_total_seconds": round(total_cached, 4),
            "cache_ratio": round(total_cached / total_cold, 4), "targets": checks, "table_md": table,
            "ok": all(c["met"] for c in checks)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--workdir", type=Path, default=None, help="keep models and artifacts here")
    args = ap.parse_args(argv)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = run(work, log)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"\n{'mode':9s} {'size MiB':>9s} {'x float32':>10s} {'cold s':>8s} {'cached s':>9s} {'cached/cold':>12s}")
    for mode, r in res["modes"].items():
        target = f"  (target <= {SIZE_TARGETS[mode]})" if mode in SIZE_TARGETS else ""
        print(f"{mode:9s} {r['bytes'] / 2**20:9.2f} {r['size_ratio']:10.3f} {r['cold_seconds']:8.1f} "
              f"{r['cached_seconds']:9.3f} {r['cache_ratio']:12.4f}{target}")
    print(f"\nall modes: cold {res['cold_total_seconds']:.1f} s, cached re-run {res['cached_total_seconds']:.3f} s, "
          f"ratio {res['cache_ratio']:.4f} (target <= {CACHE_TARGET})")
    for t in res["targets"]:
        print(f"  {'PASS' if t['met'] else 'FAIL'}  {t['name']} = {t['value']} (target {t['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
