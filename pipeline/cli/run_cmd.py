"""`edgepipe run`: convert, push, measure on every device, print a table or one JSON object (thin over
pipeline.run.execute). Exit 0 when every device returned a valid result, 3 when none did, 1 when some failed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .app import app, emit_json, handle_errors
from .fleet_cmd import DeviceBoard


def _row(d: Any) -> list[str]:
    r = d.result or {}
    lat = r.get("latency_ms") or {}
    acc = r.get("accuracy") or {}
    agr = r.get("agreement") or {}
    status = "[green]ok[/]" if d.ok else f"[red]{d.error.code}[/]"
    fmt = lambda v, f: (f % v) if isinstance(v, (int, float)) else "-"  # noqa: E731
    return [d.name + (" (emulated)" if d.emulated else ""), d.kind, d.mode, status,
            fmt(lat.get("p50"), "%.3f"), fmt(lat.get("p90"), "%.3f"), fmt(acc.get("top1"), "%.3f"),
            fmt(agr.get("top1"), "%.3f"), (r.get("runtime") or {}).get("name", "-")]


def device_table(result: Any) -> Table:
    t = Table(title=f"run {result.run_id} · {len(result.succeeded)}/{len(result.devices)} devices ok")
    for col in ("device", "kind", "mode", "status", "p50 ms", "p90 ms", "top1", "agree", "runtime"):
        t.add_column(col)
    for d in result.devices:
        t.add_row(*_row(d))
    return t


@app.command("run")
@handle_errors
def run_command(
    targets: Path = typer.Option(Path("targets.yaml"), "--targets", "-t", help="Inventory file."),
    model: Path = typer.Option(..., "--model", "-m", help="SavedModel directory, .keras, .h5 or .tflite"),
    data: Path = typer.Option(..., "--data", "-d", help="Eval .npz with x (inputs) and optionally y (labels)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", "-c", help="Calibration .npz (int8 modes)."),
    select: List[str] = typer.Option([], "--select", "-s", help="Target or group name (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    out: Path = typer.Option(Path(".edgepipe/artifacts"), "--out", help="Where artifacts and eval files go."),
    cache_dir: Optional[Path] = typer.Option(Path(".edgepipe/cache"), "--cache-dir", help="Conversion cache."),
) -> None:
    """Convert once per format, push to every target, run the agent, collect validated results."""
    from ..inventory import load_inventory
    from ..run import execute

    inv = load_inventory(targets)
    chosen = inv.select(select)
    with DeviceBoard([t.name for t in chosen], "edgepipe run") as board:
        result = execute(inv, model, data, calibration=calibration, select=select, out_dir=out,
                         cache_dir=cache_dir, on_event=board)
    if as_json:
        emit_json(json.dumps(result.to_dict()))
    else:
        console = Console(highlight=False)
        console.print(device_table(result))
        for d in result.failed:
            console.print(f"[red]{d.name}[/]: {d.error.code}: {d.error.message}", soft_wrap=True)
    if not result.succeeded:
        raise typer.Exit(3)
    if result.failed:
        raise typer.Exit(1)
