"""The latency regression gate on back-to-back WHOLE runs, exactly as `edgepipe run --baseline last` uses it.

Every measurement is one `pipeline.api.run` (probe, push, agent, store, gate) on a one-device local fleet
(LiteRT device venv, `threads: 1`, `gates.max_latency_regression: 0.10`), all under one model name, so `last` is
simply the previous run. Three float32 conv nets with the same input, runtime and mode:
  A   the base model;
  A'  the same layers with other weights (a retrained model: another file, the same work);
  B   six of A's five identical conv layers: 1.2x A's multiply-accumulates, counted from the .tflite (the real
      20 % slowdown; more depth, not width, because XNNPACK pads channels to its SIMD width).
After WARMUP runs of A (the history of A on the device), each cycle runs A, A, A', B:
  A -> A    same artifact: an A/A pair of whole runs, gated across runs against A's run-to-run spread;
  A -> A'   another artifact, same work: an A/A pair, gated on A re-measured beside A' in the same run;
  A' -> B   the 20 % slowdown, gated on A' re-measured beside B; B -> A (a speedup) is not counted.
Usage: python bench/regression.py [--cycles 30] [--runs 100] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PYTHON = REPO / ".venv-devices" / "litert" / "bin" / "python"
CACHE = Path.home() / ".cache" / "edgepipe" / "bench-regression-v3"
SIZE, CHANNELS, LAYERS_A, LAYERS_B = 32, 32, 5, 6   # identical 3x3 conv layers on 32x32x32: 6 vs 5 is 1.2x the work
MODEL_NAME = "bench-conv"


def _model(name: str, layers: int, seed: int) -> Path:
    """A float32 .tflite: `layers` 3x3 convs of CHANNELS -> CHANNELS on SIZE x SIZE, global pooling, dense 10."""
    path = CACHE / f"{name}.tflite"
    if path.exists():
        return path
    import keras

    from pipeline.convert.converter import capture_stdout, convert

    with capture_stdout():
        keras.utils.set_random_seed(seed)
        inp = keras.Input((SIZE, SIZE, CHANNELS), batch_size=1)
        h = inp
        for _ in range(layers):
            h = keras.layers.Conv2D(CHANNELS, 3, padding="same", activation="relu")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        src = CACHE / f"{name}.keras"
        keras.Model(inp, keras.layers.Dense(10)(h)).save(src)
    art = convert(src, "float32", out_dir=CACHE / "art" / name)
    art.path.replace(path)
    return path


def macs(path: Path) -> int:
    """Multiply-accumulates per invoke, from the .tflite's conv and dense layers (output size x kernel volume)."""
    from pipeline.convert.manifest import read_model

    info = read_model(path)
    total = 0
    for op in info.ops:
        out = info.tensors[op.outputs[0]].shape
        weights = info.tensors[op.inputs[1]].shape if len(op.inputs) > 1 else []
        if op.name == "CONV_2D":            # out [1, H, W, Co], weights [Co, kh, kw, Ci]
            total += out[1] * out[2] * out[3] * weights[1] * weights[2] * weights[3]
        elif op.name == "DEPTHWISE_CONV_2D":  # weights [1, kh, kw, C]
            total += out[1] * out[2] * out[3] * weights[1] * weights[2]
        elif op.name == "FULLY_CONNECTED":    # weights [out, in]
            total += weights[0] * weights[1]
    return total


def _targets(root: Path, runs: int) -> Path:
    import yaml

    doc = {"defaults": {"runs": runs, "warmup": 10, "threads": 1, "timeout": 300, "transport": "local"},
           "targets": [{"name": "board", "kind": "cpu", "mode": "float32", "python": str(PYTHON),
                        "workdir": str(root / "board")}],
           "gates": {"max_latency_regression": 0.10}}
    path = root / "targets.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _latency_check(rel) -> object | None:
    return next((c for c in rel.verdict.checks if c.gate == "max_latency_regression"), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--warmup-runs", type=int, default=6, help="runs of A first, to build its history")
    ap.add_argument("--runs", type=int, default=100, help="timed invokes per agent run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import numpy as np

    from pipeline import api

    CACHE.mkdir(parents=True, exist_ok=True)
    models = {"A": _model("a", LAYERS_A, 0), "A'": _model("a2", LAYERS_A, 1), "B": _model("b", LAYERS_B, 0)}
    work = {k: macs(v) for k, v in models.items()}
    data = CACHE / "eval.npz"
    if not data.exists():
        np.savez(data, x=np.random.default_rng(0).random((4, SIZE, SIZE, CHANNELS), dtype=np.float32))
    t0 = time.monotonic()
    outcomes: dict[str, list] = {"A->A": [], "A->A'": [], "A'->B": []}
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-regression-") as tmp:
        root = Path(tmp)
        targets = _targets(root, args.runs)

        def whole_run(which: str):
            return api.run(targets, model=models[which], data=data, out_dir=root / "out", cache_dir=CACHE / "convert",
                           db=root / "results.db", baseline="last", model_name=MODEL_NAME)

        for _ in range(args.warmup_runs):
            whole_run("A")
        for cycle in range(args.cycles):
            previous = None
            for which in ("A", "A", "A'", "B"):
                rel = whole_run(which)
                pair = f"{previous}->{which}" if previous else None
                previous = which
                if pair not in outcomes:
                    continue
                c = _latency_check(rel)
                outcomes[pair].append(c)
                state = "skipped" if c is None or c.skipped else ("ALARM" if not c.passed else "pass")
                print(f"cycle {cycle + 1}/{args.cycles} {pair:6s}: {state:7s} "
                      f"{(c.note if c is not None else 'no check')[:150]}", file=sys.stderr, flush=True)
    seconds = time.monotonic() - t0

    def rate(pair: str, want_fail: bool) -> tuple[float, int, int]:
        checks = outcomes[pair]
        gated = [c for c in checks if c is not None and not c.skipped]
        hits = sum(1 for c in gated if not c.passed)
        return (hits / len(checks) if checks else float("nan")), hits, len(checks) - len(gated)

    fa_same, fa_same_n, fa_same_skipped = rate("A->A", False)
    fa_other, fa_other_n, fa_other_skipped = rate("A->A'", False)
    det, det_n, det_skipped = rate("A'->B", True)
    false_alarm = (fa_same_n + fa_other_n) / max(1, len(outcomes["A->A"]) + len(outcomes["A->A'"]))

    def ratios(pair: str) -> list[float]:
        return [1.0 + c.measured for c in outcomes[pair] if c is not None and c.measured is not None]

    doc = {
        "cycles": args.cycles, "runs_per_measurement": args.runs, "threads": 1, "max_latency_regression": 0.10,
        "whole_runs": args.warmup_runs + 4 * args.cycles, "seconds": round(seconds, 1),
        "macs": work, "work_ratio_B_over_A": round(work["B"] / work["A"], 4),
        "false_alarm_rate": false_alarm, "detection_rate": det,
        "false_alarm_rate_same_artifact": fa_same, "false_alarm_rate_same_work_other_artifact": fa_other,
        "skipped": {"A->A": fa_same_skipped, "A->A'": fa_other_skipped, "A'->B": det_skipped},
        "ratio_median": {p: (statistics.median(ratios(p)) if ratios(p) else None) for p in outcomes},
        "ratio_range": {p: ([min(ratios(p)), max(ratios(p))] if ratios(p) else None) for p in outcomes},
        "targets": [
            {"name": "A/A false-alarm rate (whole runs, both kinds)", "value": false_alarm, "target": "<= 0.05",
             "met": false_alarm <= 0.05},
            {"name": "detection rate of a 20% slowdown (1.2x MACs)", "value": det, "target": ">= 0.95",
             "met": det >= 0.95},
        ],
        "notes": ["A skipped check counts as no alarm (A/A) and as a miss (A'->B).",
                  "A->A: same artifact, gated across runs (one-sided 99% beyond the run-to-run spread of the last "
                  "10 runs of A on the device, and > 10 %). A->A' and A'->B: the baseline's model re-measured on "
                  "the device in the same run, interleaved over 20 rounds (95% lower bound > 1 and > 10 %)."],
    }
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"work: B/A = {doc['work_ratio_B_over_A']:.3f} x MACs ({work['A']} vs {work['B']})")
        print(f"A/A false alarms: same artifact {fa_same_n}/{len(outcomes['A->A'])} (skipped {fa_same_skipped}), "
              f"retrained (same work) {fa_other_n}/{len(outcomes[chr(65) + '->A' + chr(39)])} "
              f"(skipped {fa_other_skipped}) -> rate {false_alarm:.3f} (target <= 0.05)")
        print(f"20% slowdown detected: {det_n}/{len(outcomes[chr(65) + chr(39) + '->B'])} -> rate {det:.3f} "
              f"(target >= 0.95); measured ratios {doc['ratio_median']}")
        print(f"{doc['whole_runs']} whole runs in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
