"""`edgepipe convert`: one model -> the artifacts for the requested modes, kinds or fleet (thin over converter)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.convert.cache import DEFAULT_CACHE_DIR
from pipeline.cli.app import app, emit_json, handle_errors, out_console
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


@app.command("convert")
@handle_errors
def convert_command(
    model: Path = typer.Argument(..., metavar="MODEL", help="SavedModel directory, .keras, .h5 or .tflite"),
    mode: List[str] = typer.Option([], "--mode", "-m", help="float32 | dynamic | float16 | int8 | int16x8 (repeatable)"),
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
) -> None:
    """Convert MODEL to the TFLite artifacts the requested modes, kinds or fleet need, with manifests."""
    from pipeline.convert.calibration import load_calibration
    from pipeline.convert.converter import convert

    from pipeline.inventory import load_inventory
    from pipeline.convert.recipes import requested_formats

    reqs = requested_formats(mode, kind, [load_inventory(p) for p in targets], compat=compat, io_type=io_type)
    calib = load_calibration(calibration, count=calibration_count, seed=calibration_seed) if calibration else None
    rows = []
    with Stages("convert") as stages:
        for r in reqs:
            label = r.mode + (f" [{r.compat}]" if r.compat else "")
            with stages.stage(label) as progress:
                art = convert(model, r.mode, calibration=calib, out_dir=out, cache_dir=None if no_cache else cache_dir,
                              compat=r.compat, io_type=r.io_type, progress=progress)
                progress.finish(f"{art.path} ({art.bytes} bytes)", cached=art.cached)
            rows.append(artifact_json(art, r.targets))
    if as_json:
        emit_json(json.dumps({"artifacts": rows}))
    else:
        console = out_console()
        console.print(_summary(rows, console.width))
