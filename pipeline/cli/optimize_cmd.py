"""`edgepipe optimize`: choose each device class's format by measuring (thin over pipeline.api.optimize)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.cli.app import app, emit_json, err_console, handle_errors, out_console, stop_on_signals
from pipeline.cli.fleet_cmd import DeviceBoard
from pipeline.cli.model_options import MODEL_ARG, MODEL_OPT, PREPROCESS_EPILOG, model_options, one_model
from pipeline.cli.tables import Col, fitted_table
from pipeline.api import human_bytes
from pipeline.api.inputs import DEFAULT_CACHE_DIR

COLUMNS = (Col("variant"), Col("size", 1, justify="right"), Col("p50 ms", 0, justify="right"),
           Col("metric", 0, justify="right"), Col("drop", 2, justify="right"), Col("agree", 3, justify="right"),
           Col("int8 ops", 4, justify="right"), Col("budget", 0), Col("note", 5, wrap=True))


def _cell(v: Any, f: str) -> str:
    return (f % v) if isinstance(v, (int, float)) else "-"


def p50_cell(c: Any) -> str:
    """Four significant digits (a microsecond model reads 0.004123, not 0.004), `≈` when it ties the fastest."""
    if not isinstance(c.p50_ms, (int, float)):
        return "-"
    return f"{c.p50_ms:.4g}" + (" ≈" if c.tie else "")


def _note(c: Any) -> str:
    parts = [c.error or ""] if c.error else []
    parts += [f"{x['op']}@{x['index']}: {x['note']}" for x in c.edgetpu_cost or []]
    if c.int16_layers:
        parts.append(f"{len(c.int16_layers)} layer(s) at 16-bit activations")
    if c.fallback:
        parts.append("CPU fallback")
    return "; ".join(p for p in parts if p)


def class_title(cls: Any, metric: str) -> str:
    """`cpu · tflite-runtime==2.14.0 · cpu · pi-a, pi-b · measured on pi-a (runtime from its probe) · budget`."""
    fallback = " [bold yellow](⚠ CPU fallback)[/]" if cls.fallback else ""
    source = {"probe": "runtime from its probe", "targets.yaml": "runtime declared in targets.yaml"}.get(
        cls.runtime_source, "runtime not probed")
    return (f"{escape(cls.kind)} · {escape(cls.runtime)} · {escape(cls.accelerator)}{fallback} · "
            f"{escape(', '.join(cls.targets))} · measured on {escape(', '.join(cls.measured_on))} ({source}) · "
            f"{escape(metric)} budget: {escape(cls.budget.text())}")


def class_table(cls: Any, metric: str, width: int | None) -> Table:
    """One device class: every measured candidate, ✓/✗ against the budget, ≈ where it ties the fastest, the
    chosen one marked, a CPU fallback named in the title and on each candidate it concerns."""
    rows = []
    for c in cls.candidates:
        chosen = cls.chosen is c
        name = f"[bold]{escape(c.variant)} ◀[/]" if chosen else escape(c.variant)
        rows.append([name, human_bytes(c.bytes) if c.bytes else "-", p50_cell(c),
                     _cell(c.value, "%.4f"), _cell(c.drop, "%+.2f"), _cell(c.agreement, "%.3f"),
                     _cell(c.int8_share * 100 if c.int8_share is not None else None, "%.0f%%"),
                     "[green]✓[/]" if c.within_budget else "[red]✗[/]", escape(_note(c))])
    return fitted_table(class_title(cls, metric), COLUMNS, rows, width)


def _per_device(board: Any) -> Any:
    """Candidates run as `device[variant]`: show them on the device's own row."""
    def event(name: str, stage: str, detail: str) -> None:
        base, _, variant = name.partition("[")
        board(base, stage, f"{variant.rstrip(']')}: {detail}" if variant else detail)
    return event


def _print(res: Any, targets: Path, write_modes: bool) -> None:
    console = out_console()
    for cls in res.classes:
        console.print(class_table(cls, res.metric, console.width))
        if cls.fallback:
            console.print(f"[bold yellow]fallback[/]: CPU timings, not the {escape(cls.accelerator)}'s: "
                          f"{escape(cls.fallback_reason or 'the accelerator was not used')}", soft_wrap=True)
        if any(c.tie for c in cls.candidates):
            console.print(f"≈: as fast as the fastest within noise, or by less than --min-gain {res.min_gain:g} %",
                          soft_wrap=True, style="dim")
        style = "green" if cls.chosen else "red"
        console.print(f"[{style}]{'chosen' if cls.chosen else 'NOTHING PASSES'}[/]: {escape(cls.advice)}",
                      soft_wrap=True)
        for note in cls.notes:
            console.print(f"note: {escape(note)}", soft_wrap=True)
    for change in res.changes:
        console.print(f"{escape(str(res.written or targets))}: {escape(change)}", soft_wrap=True)
    if write_modes and not res.changes:
        console.print(f"{escape(str(targets))}: unchanged (every target already has its class's choice)")
    if res.report_path:
        console.print(f"report: {res.report_path}")


@app.command("optimize", epilog=PREPROCESS_EPILOG)
@handle_errors
@model_options(brief=True)
def optimize_command(
    model_arg: Optional[Path] = MODEL_ARG,
    model: Optional[Path] = MODEL_OPT,
    targets: Path = typer.Option(Path("targets.yaml"), "--targets", "-t", help="Inventory file."),
    data: Path = typer.Option(..., "--data", "-d", help="Eval .npz (inputs and labels) or an image folder."),
    calibration: Path = typer.Option(..., "--calibration", "-c", help="Calibration .npz or image folder."),
    objective: str = typer.Option("latency", "--objective", help="latency | size | balanced"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Accuracy budget: points of the task's metric "
                                             "below float (default: the accuracy gates in targets.yaml, else 1)."),
    select: List[str] = typer.Option([], "--select", "-s", help="Target or group name (repeatable)."),
    each: bool = typer.Option(False, "--each", help="Measure on every device of a class, not one."),
    max_float_layers: Optional[int] = typer.Option(None, "--max-float-layers", help="How many layers int8 recovery "
                                                   "may keep in float (default: 20 % of the ops, at least 3)."),
    min_gain: float = typer.Option(5.0, "--min-gain", help="Percent a candidate must be faster by, beyond noise, "
                                   "for its speed to count; closer candidates tie and the smaller one wins."),
    candidates: List[str] = typer.Option([], "--candidates", help="Only these formats (comma-separated or repeated), "
                                         "e.g. int8: full int8 and what its recovery reaches."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write optimize.html (tables, Pareto plots) here."),
    write_modes: bool = typer.Option(False, "--write-modes", help="Set each target's chosen mode (and keep_float) "
                                     "in targets.yaml, keeping its comments."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    out: Path = typer.Option(Path(".edgepipe/artifacts"), "--out", help="Where artifacts and eval files go."),
    cache_dir: Optional[Path] = typer.Option(DEFAULT_CACHE_DIR, "--cache-dir", help="Conversion cache."),
    db: Optional[str] = typer.Option(None, "--db", help="Results database holding the device leases (default: "
                                     "targets.yaml `db:`, else .edgepipe/results.db beside it); no run is stored."),
    lease_timeout: Optional[float] = typer.Option(None, "--lease-timeout", min=0,
                                                  help="Seconds to wait for a device another run holds (default: "
                                                       "wait); then that device fails with lease_timeout."),
    model_kw: Any = None,
) -> None:
    """Measure every candidate format per device class (kind + the runtime each board's probe finds + the accelerator
    really there); when int8 misses the accuracy budget, keep the layers it hurts most (ranked by their measured
    effect) in float, or on a CPU at 16-bit activations, and choose per class by the objective. A latency lead
    counts only when significant and above --min-gain; otherwise the smaller artifact wins.

    Exit codes: 0 every class has a chosen format, 1 some class has none (advice printed), 2 usage or
    configuration error, 130 / 143 interrupted.
    """
    from pipeline import api
    from pipeline.inventory import load_inventory

    model = one_model(model_arg, model)
    inv = load_inventory(targets)
    chosen = inv.select(select)
    notice = lambda msg: err_console.print(f"notice: {msg}", markup=False, highlight=False, soft_wrap=True)  # noqa
    with stop_on_signals() as cancel, DeviceBoard([t.name for t in chosen], "edgepipe optimize") as board:
        res = api.optimize(inv, model=model, data=data, calibration=calibration, select=select, objective=objective,
                           max_drop=max_drop, each=each, out_dir=out, cache_dir=cache_dir, report_dir=report,
                           write_modes=write_modes, on_event=_per_device(board),
                           on_notice=notice, cancel=cancel, db=db, lease_timeout=lease_timeout,
                           max_float_layers=max_float_layers, min_gain=min_gain, candidates=candidates,
                           **model_kw)
    if as_json:
        emit_json(json.dumps(res.to_dict()))
    else:
        _print(res, targets, write_modes)
    raise typer.Exit(res.exit_code)
