"""Task metrics per mode: each task's test model (tests/task_models.py) converted to float32, dynamic, float16 and
int8, run with ai-edge-litert on the host, scored by pipeline.metrics against labels and the float32 outputs.

Prints one Markdown table (or JSON with --json). Takes about a minute on an idle 2-core machine.

    PYTHONPATH=$PWD .venv/bin/python bench/task_metrics.py [--json] [--models multihead,detector]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.metrics import resolve_task, score_device  # noqa: E402
from tests.task_models import BUILDERS, MODES  # noqa: E402

SHOWN = {  # task -> figures shown (agreement last)
    "classification": ("top1", "top5", "top1_agreement"),
    "binary": ("accuracy", "auc", "top1_agreement"),
    "regression": ("mae", "rmse", "r2"),
    "keypoints": ("mae", "rmse", "r2"),
    "segmentation": ("miou", "pixel_accuracy", "top1_agreement"),
    "detection": ("map50", "map", "map50_vs_float", "map_vs_float"),
}


def measure(names: list[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgepipe-task-bench-") as tmp:
        for name in names:
            tm = BUILDERS[name](Path(tmp) / name)
            cases = [(None, None, tm.labels)]
            if name == "multihead":  # the box head, scored as keypoints (two corners) with --output
                box = next(s["name"] for s in tm.specs["float32"] if s["shape"] == [1, 4])
                cases.append(("keypoints", box, {"y": tm.extra["box"].reshape(-1, 2, 2)}))
            for task_flag, output, labels in cases:
                for mode in MODES:
                    specs = tm.specs[mode]
                    task = resolve_task(task_flag, output, specs, labels)
                    m = score_device(task, tm.outputs[mode], tm.outputs["float32"], labels, specs)
                    snr = min(o["snr_db"] for o in m["outputs"].values() if o.get("snr_db") is not None)
                    rows.append({"model": name, "task": task.task, "mode": mode, "bytes": tm.paths[mode].stat().st_size,
                                 **{k: m.get(k) for k in SHOWN[task.task]}, "min_snr_db": snr})
    return rows


def markdown(rows: list[dict]) -> str:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        keys = list(SHOWN[task]) + ["min_snr_db"]
        out += [f"**{task}** ({mine[0]['model']})", "", "| mode | size | " + " | ".join(keys) + " |",
                "|---|---:|" + "---:|" * len(keys)]
        for r in mine:
            cells = ["–" if r[k] is None else f"{r[k]:.4f}" if k != "min_snr_db" else f"{r[k]:.1f}" for k in keys]
            out.append(f"| {r['mode']} | {r['bytes'] / 1024:.1f} KiB | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--models", default=",".join(BUILDERS))
    args = ap.parse_args()
    rows = measure([n for n in args.models.split(",") if n])
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
