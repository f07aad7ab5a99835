"""Task metrics per mode, as `edgepipe run` reports them: each task's test model (the digits CNN and
tests/task_models.py) through `api.run` on four local targets with the ai-edge-litert device venv, one per mode
(float32, dynamic, float16, int8, the pipeline's own recipes), scored on the host against labels and the float model.

Every model goes as a user hands it over (the detector as its SavedModel ending in the postprocess composite).
Prints one Markdown table per task (or JSON with --json). Takes about three minutes on an idle 2-core machine.

    PYTHONPATH=$PWD .venv/bin/python bench/task_metrics.py [--json] [--models digits,detector]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.task_models import BUILDERS, MODES  # noqa: E402

LITERT = ROOT / ".venv-devices" / "litert" / "bin" / "python"
MODELS = ("digits",) + tuple(BUILDERS)
SHOWN = {  # task -> figures shown (agreement last)
    "classification": ("top1", "top5", "top1_agreement"),
    "binary": ("accuracy", "auc", "top1_agreement"),
    "regression": ("mae", "rmse", "r2"),
    "keypoints": ("mae", "rmse", "r2"),
    "segmentation": ("miou", "pixel_accuracy", "top1_agreement"),
    "detection": ("map50", "map", "map50_vs_float", "map_vs_float"),
}


def fleet(root: Path, modes: tuple[str, ...]) -> Path:
    """targets.yaml: one local target per mode, all on the ai-edge-litert device venv (no TensorFlow there)."""
    import yaml

    targets = [{"name": f"litert-{m}", "host": "localhost", "transport": "local", "python": str(LITERT),
                "workdir": str(root / f"dev-{m}"), "kind": "cpu", "mode": m, "threads": 1} for m in modes]
    path = root / "targets.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"runs": 2, "warmup": 0, "timeout": 300}, "targets": targets}))
    return path


def release(root: Path, model: Path, data: dict[str, np.ndarray], **kw: Any) -> list[Any]:
    """One `api.run` over the four targets; its DeviceResults."""
    from pipeline import api

    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "eval.npz", **data)
    if "calibration" in kw and not isinstance(kw["calibration"], (str, Path)):
        np.savez(root / "calibration.npz", x=kw["calibration"])
        kw["calibration"] = root / "calibration.npz"
    rel = api.run(fleet(root, MODES), model=model, data=root / "eval.npz", out_dir=root / "out",
                  cache_dir=root.parent / "cache", db=root / "results.db", baseline="none", **kw)
    bad = [f"{d.name}: {d.error.code}: {d.error.message}" for d in rel.run.devices if not d.ok]
    if bad:
        raise SystemExit("\n".join(bad))
    return rel.run.devices


def row(model: str, device: Any) -> dict[str, Any]:
    m = device.metrics
    snrs = [o["snr_db"] for o in m["outputs"].values() if o.get("snr_db") is not None]
    return {"model": model, "task": m["task"], "mode": device.mode, "bytes": device.artifact["bytes"],
            **{k: m.get(k) for k in SHOWN[m["task"]]}, "min_snr_db": min(snrs) if snrs else None}


def measure(names: list[str], tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        where = tmp / name
        if name == "digits":
            from pipeline.examples.digits import train_digits

            d = train_digits(where / "model")
            devices = release(where / "run", d.model_path, {"x": d.x_eval, "y": d.y_eval},
                              calibration=d.calibration_path)
            rows += [row(name, dev) for dev in devices]
            continue
        tm = BUILDERS[name](where / "model")
        rows += [row(name, dev) for dev in release(where / "run", tm.source, {"x": tm.x, **tm.labels},
                                                   calibration=tm.calib)]
        if name == "multihead":   # the box head, scored as keypoints (two corners [N, 2, 2]: the 4-wide output)
            rows += [row(name, dev) for dev in release(where / "box", tm.source,
                                                       {"x": tm.x, "y": tm.extra["box"].reshape(-1, 2, 2)},
                                                       calibration=tm.calib, task="keypoints")]
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    out = []
    for task, model in dict.fromkeys((r["task"], r["model"]) for r in rows):
        mine = [r for r in rows if (r["task"], r["model"]) == (task, model)]
        keys = list(SHOWN[task]) + ["min_snr_db"]
        out += [f"**{task}** ({model})", "", "| mode | size | " + " | ".join(keys) + " |",
                "|---|---:|" + "---:|" * len(keys)]
        for r in sorted(mine, key=lambda r: MODES.index(r["mode"])):
            cells = ["–" if r[k] is None else f"{r[k]:.4f}" if k != "min_snr_db" else f"{r[k]:.1f}" for k in keys]
            out.append(f"| {r['mode']} | {r['bytes'] / 1024:.1f} KiB | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgepipe-task-bench-") as tmp:
        rows = measure([n for n in args.models.split(",") if n], Path(tmp))
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
