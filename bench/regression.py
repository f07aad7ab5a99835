"""The latency regression detector on this noisy machine, from real agent runs.

A/A: the same model measured twice by the agent (LiteRT device venv); any "regression" is a false alarm.
A/B: the same network with a ~20 % larger input (so ~20 % more work per invoke); a regression should be flagged.
Each trial measures A, A, A, B in random order and feeds the raw samples to `pipeline.release.regression.compare_latency`
with max_latency_regression = 0.10 (the gate's own test). Usage:
    python bench/regression.py [--trials 30] [--runs 300] [--json]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.release.regression import compare_latency  # noqa: E402

PYTHON = REPO / ".venv-devices" / "litert" / "bin" / "python"
AGENT = REPO / "device_agents" / "agent.py"
CACHE = Path.home() / ".cache" / "edgepipe" / "bench-regression"
SIZE_A, SIZE_B = 40, 44  # 44^2 / 40^2 = 1.21: ~21 % more pixels through every conv


def _model(size: int, out: Path) -> tuple[Path, Path]:
    """A small conv net at size x size x 3 (fixed weights), converted to float32 TFLite, with a tiny eval file."""
    import numpy as np

    tflite = out / f"conv{size}.tflite"
    data = out / f"conv{size}.npz"
    if tflite.exists() and data.exists():
        return tflite, data
    import keras

    from pipeline.convert.converter import convert

    keras.utils.set_random_seed(0)
    inp = keras.Input(shape=(size, size, 3), batch_size=1)
    h = inp
    for filters in (32, 32, 48):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(10)(h))
    src = out / f"conv{size}.keras"
    model.save(src)
    art = convert(src, "float32", out_dir=out / "art")
    art.path.replace(tflite)
    np.savez(data, x=np.random.default_rng(0).random((4, size, size, 3), dtype=np.float32))
    return tflite, data


def measure(model: Path, data: Path, runs: int, threads: int) -> list[float]:
    proc = subprocess.run([str(PYTHON), str(AGENT), "--model", str(model), "--data", str(data), "--runs", str(runs),
                           "--warmup", "20", "--threads", str(threads)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=600)
    doc = json.loads(proc.stdout)
    if not doc.get("ok"):
        raise SystemExit(f"agent failed: {doc.get('error')}")
    return doc["samples_ms"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--runs", type=int, default=300, help="timed invokes per agent run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-regression", type=float, default=0.10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    a = _model(SIZE_A, CACHE)
    b = _model(SIZE_B, CACHE)
    rng = random.Random(args.seed)
    aa, ab, true_ratios = [], [], []
    for trial in range(args.trials):
        order = ["a1", "a2", "a3", "b"]
        rng.shuffle(order)
        got = {k: measure(*(b if k == "b" else a), args.runs, args.threads) for k in order}
        c_aa = compare_latency(got["a1"], got["a2"], args.max_regression, seed=trial)
        c_ab = compare_latency(got["a3"], got["b"], args.max_regression, seed=trial)
        aa.append(c_aa)
        ab.append(c_ab)
        true_ratios.append(c_ab.ratio)
        print(f"trial {trial + 1}/{args.trials}: A/A x{c_aa.ratio:.3f} (low {c_aa.ci_low:.3f}) "
              f"{'ALARM' if c_aa.regressed else 'ok'} · A/B x{c_ab.ratio:.3f} (low {c_ab.ci_low:.3f}) "
              f"{'detected' if c_ab.regressed else 'MISSED'}", file=sys.stderr, flush=True)
    false_alarm = sum(c.regressed for c in aa) / len(aa)
    detection = sum(c.regressed for c in ab) / len(ab)
    aa_ratios = [c.ratio for c in aa]
    doc = {
        "trials": args.trials, "runs_per_measurement": args.runs, "threads": args.threads,
        "max_latency_regression": args.max_regression,
        "model_a": f"conv {SIZE_A}x{SIZE_A}x3 float32", "model_b": f"conv {SIZE_B}x{SIZE_B}x3 float32",
        "false_alarm_rate": false_alarm, "detection_rate": detection,
        # what a significance-only rule (no 10 % allowance) would have flagged in A/A: run-to-run drift is real
        "aa_significant_only_rate": sum(c.significant for c in aa) / len(aa),
        "aa_ratio_median": statistics.median(aa_ratios), "aa_ratio_min": min(aa_ratios), "aa_ratio_max": max(aa_ratios),
        "ab_ratio_median": statistics.median(true_ratios), "ab_ratio_min": min(true_ratios),
        "ab_ratio_max": max(true_ratios),
        "median_latency_a_ms": statistics.median(c.base_median for c in aa),
        "targets": [
            {"name": "A/A false-alarm rate", "value": false_alarm, "target": "<= 0.05", "met": false_alarm <= 0.05},
            {"name": "detection rate of a ~20% slowdown", "value": detection, "target": ">= 0.95", "met": detection >= 0.95},
        ],
        "notes": [f"The A/B slowdown actually measured (median over trials): x{statistics.median(true_ratios):.3f}.",
                  "Rule: fail when the one-sided 95% bootstrap lower bound of median(new)/median(base) > 1 "
                  f"AND the ratio > 1 + {args.max_regression}."],
    }
    if args.json:
        print(json.dumps(doc))
    else:
        for t in doc["targets"]:
            print(f"{t['name']}: {t['value']:.3f} (target {t['target']}) {'met' if t['met'] else 'MISSED'}")
        print(doc["notes"][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
