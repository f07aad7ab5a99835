"""`edgepipe convert`: one model -> the artifacts for the requested modes, kinds or fleet (thin over converter)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.api.inputs import DEFAULT_CACHE_DIR
from pipeline.cli.app import app, emit_json, handle_errors, out_console
from pipeline.cli.model_options import (INPUT_SHAPE, MODEL_OPT, PRE_CHANNELS, PRE_CROP, PRE_DTYPE, PRE_FILE, PRE_LAYOUT,
                                        PRE_MEAN, PRE_RESIZE, PRE_SCALE, PRE_STD, SIGNATURE, one_model,
                                        preprocess_options)
from pipeline.cli.stages import Stages
from pipeline.cli.tables import Col, fitted_table


def artifact_json(a: Any, targets: list[str]) -> dict[str, Any]:
    m = a.manifest
    out = {"mode": a.mode, "path": str(a.path), "manifest_path": str(a.manifest_path), "sha256": a.sha256,
           "bytes": a.bytes, "inputs": m["inputs"], "outputs": m["outputs"], "operators": m["operators"],
           "calibration": m.get("calibration"), "tf_version": m.get("tf_version"), "compat": m.get("compat"),
           "cached": a.cached, "targets": targets}
    if a.edgetpu is not None:
        out["edgetpu"] = a.edgetpu
    return out


SUMMARY_COLUMNS = (Col("mode"), Col("file"), Col("size", 2, justify="right"), Col("cached", 3),
                   Col("edge tpu ops", 4, wrap=True), Col("targets", 1, wrap=True))


def _summary(rows: list[dict[str, Any]], width: int | None) -> Table:
    with_targets = any(r["targets"] for r in rows)
    cells = []
    for r in rows:
        e = r.get("edgetpu")
        etpu = "" if not e else (f"{e.get('mapped_ops')}/{e.get('total_ops')} {e['status']}"
                                 if e.get("status") != "failed" else f"failed: {e.get('error')}")
        cells.append([r["mode"], Path(r["path"]).name, f"{r['bytes'] / 1024:.1f} KiB", "yes" if r["cached"] else "no",
                      escape(etpu), escape(", ".join(r["targets"]))])
    cols = SUMMARY_COLUMNS if with_targets else SUMMARY_COLUMNS[:-1]
    return fitted_table("artifacts", cols, [c[:len(cols)] for c in cells], width)


def _keep_warnings(stages: Stages, label: str, progress: Any) -> Any:
    """A progress callback that prints warnings and notices as lines of their own (not just in the spinner)."""

    def call(stage: str, detail: str) -> None:
        if stage in ("warning", "notice"):
            stages.line(f"{label}: {stage}: {detail}")
        else:
            progress(stage, detail)

    return call


@app.command("convert")
@handle_errors
def convert_command(
    model_arg: Optional[Path] = typer.Argument(None, metavar="MODEL", show_default=False,
                                               help="SavedModel directory, .keras, .h5 or .tflite (or --model)"),
    model: Optional[Path] = MODEL_OPT,
    mode: List[str] = typer.Option([], "--mode", help="float32 | dynamic | float16 | int8 | int16x8 (repeatable)"),
    mode_m: List[str] = typer.Option([], "-m", hidden=True),   # before --mode was the consistent form
    kind: List[str] = typer.Option([], "--kind", "-k", help="cpu | gpu | edgetpu: the kind's default mode (repeatable)"),
    targets: List[Path] = typer.Option([], "--targets", "-t", help="targets.yaml: one artifact per distinct format"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", "-c", help=".npz with array x, or image folder"),
    calibration_count: int = typer.Option(200, "--calibration-count", help="calibration samples to use"),
    calibration_seed: int = typer.Option(0, "--calibration-seed", help="seed for choosing the samples"),
    io_type: str = typer.Option("int8", "--io-type", help="int8 models' input/output type: int8 | uint8"),
    compat: Optional[str] = typer.Option(None, "--compat", help="runtime the artifacts must load on, e.g. tflite-runtime==2.14"),
    out: Path = typer.Option(Path("artifacts"), "--out", "-o", help="output directory"),
    cache_dir: Path = typer.Option(DEFAULT_CACHE_DIR, "--cache-dir", help="conversion cache directory ($EDGEPIPE_CACHE_DIR)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="always convert"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON object on stdout"),
    signature: Optional[str] = SIGNATURE,
    input_shape: List[str] = INPUT_SHAPE,
    preprocess: Optional[Path] = PRE_FILE,
    resize: Optional[str] = PRE_RESIZE,
    crop: Optional[str] = PRE_CROP,
    scale: Optional[float] = PRE_SCALE,
    mean: Optional[str] = PRE_MEAN,
    std: Optional[str] = PRE_STD,
    channels: Optional[str] = PRE_CHANNELS,
    layout: Optional[str] = PRE_LAYOUT,
    image_dtype: Optional[str] = PRE_DTYPE,
) -> None:
    """Convert MODEL to the TFLite artifacts the requested modes, kinds or fleet need, with manifests."""
    from pipeline import api

    model = one_model(model_arg, model)
    pre = preprocess_options(preprocess, resize, crop, scale, mean, std, channels, layout, image_dtype, None)
    todo = api.conversions(model, modes=list(mode) + list(mode_m), kinds=kind, targets=list(targets),
                           calibration=calibration,
                           calibration_count=calibration_count, calibration_seed=calibration_seed, compat=compat,
                           io_type=io_type, out_dir=out, cache_dir=None if no_cache else cache_dir,
                           signature=signature, input_shapes=input_shape, preprocess=pre)
    rows = []
    with Stages("convert") as stages:
        for c in todo:
            with stages.stage(c.label) as progress:
                art = c.convert(_keep_warnings(stages, c.label, progress))
                progress.finish(f"{art.path} ({art.bytes} bytes)", cached=art.cached)
            rows.append(artifact_json(art, c.targets))
    if as_json:
        emit_json(json.dumps({"artifacts": rows}))
    else:
        console = out_console()
        console.print(_summary(rows, console.width))
