"""`edgepipe run`: the release job (thin over pipeline.api.run): convert, push, measure, store, gate, report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.api.inputs import DEFAULT_CACHE_DIR, QUEUE_TIMEOUT_S
from pipeline.cli.app import app, emit_json, err_console, handle_errors, interrupted_exit, out_console, stop_on_signals
from pipeline.cli.fleet_cmd import DeviceBoard
from pipeline.cli.model_options import MODEL_ARG, MODEL_OPT, PREPROCESS_EPILOG, model_options, one_model
from pipeline.cli.tables import Col, fitted_table, memory_cell, throttle_mark


def print_verdict_notes(console: Any, verdict: Any) -> None:
    """Fallbacks, uncompiled Edge TPU models and cross-model comparisons, one line each (never silent)."""
    for name in verdict.fallbacks:
        console.print(f"[bold yellow]FALLBACK[/] {escape(name)} {escape(verdict.fallback_text(name))}", soft_wrap=True)
    for note in verdict.notes:
        console.print(f"[yellow]note[/] {escape(note)}", soft_wrap=True)
    if verdict.cross_model:
        console.print(f"[yellow]cross-model comparison[/]: {escape(str(verdict.cross_model.get('model')))} against "
                      f"the baseline model {escape(str(verdict.cross_model.get('baseline_model')))}", soft_wrap=True)


def _row(d: Any) -> list[str]:
    m = d.measured
    status = ("[bold yellow]ok, FALLBACK[/]" if d.fallback else "[green]ok[/]") if d.ok else f"[red]{d.error.code}[/]"
    status += throttle_mark(d)
    fmt = lambda v, f: (f % v) if isinstance(v, (int, float)) else "-"  # noqa: E731
    return [escape(d.name) + (" (emulated)" if d.emulated else ""), d.kind, d.mode, status,
            fmt(m.latency.p50, "%.3f"), fmt(m.latency.p90, "%.3f"), fmt(m.top1, "%.3f"),
            fmt(m.agreement_top1, "%.3f"), memory_cell(m), m.runtime or "-", _delegate(m),
            _human_bytes(d.bytes_sent)]


def _human_bytes(n: Any) -> str:
    from pipeline import api

    return api.human_bytes(n)


def _delegate(m: Any) -> str:
    """The accelerator a device measured on (a pipeline.results.Measurement), in red when it fell back."""
    use = m.accelerator
    used = use.used or m.block("delegate").get("used") or "-"
    return f"[bold red]{used} (FALLBACK from {use.requested})[/]" if use.fallback else used


RUN_COLUMNS = (Col("device"), Col("kind", 3), Col("mode", 1), Col("status"), Col("p50 ms", 0, justify="right"),
               Col("p90 ms", 4, justify="right"), Col("top1", 2, justify="right"), Col("agree", 2, justify="right"),
               Col("model/proc MB", 3, justify="right"), Col("runtime", 3), Col("accelerator", 5, wrap=True),
               Col("sent", 6, justify="right"))


def device_table(result: Any, width: int | None = None) -> Table:
    return fitted_table(f"run {result.run_id}" + (f" · model {escape(result.model_name)}" if result.model_name else "")
                        + f" · {len(result.succeeded)}/{len(result.devices)} devices ok",
                        RUN_COLUMNS, [_row(d) for d in result.devices], width)


@app.command("run", epilog=PREPROCESS_EPILOG)
@handle_errors
@model_options(brief=True)
def run_command(
    model_arg: Optional[Path] = MODEL_ARG,
    targets: Path = typer.Option(Path("targets.yaml"), "--targets", "-t", help="Inventory file."),
    model: Optional[Path] = MODEL_OPT,
    model_m: Optional[Path] = typer.Option(None, "-m", hidden=True),   # before --model was the consistent form
    data: Path = typer.Option(..., "--data", "-d", help="Eval .npz (model inputs, labels such as y) or image folder."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", "-c", help="Calibration .npz or image folder "
                                               "(int8)."),
    select: List[str] = typer.Option([], "--select", "-s", help="Target or group name (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    out: Path = typer.Option(Path(".edgepipe/artifacts"), "--out", help="Where artifacts and eval files go."),
    cache_dir: Optional[Path] = typer.Option(DEFAULT_CACHE_DIR, "--cache-dir", show_default="~/.cache/edgepipe/convert",
                                             help="Conversion cache ($EDGEPIPE_CACHE_DIR)."),
    db: Optional[str] = typer.Option(None, "--db", help="SQLite path or postgresql://user@host/db (default: db: in "
                                     "targets.yaml)."),
    baseline: str = typer.Option("last", "--baseline", help="last | RUN_ID | TAG | none."),
    label: Optional[str] = typer.Option(None, "--label", "--tag", help="A tag for this run (usable as a baseline)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the HTML report into this directory."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML (a testcase per device x check)."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Write a Markdown summary (PR comment)."),
    lease_timeout: Optional[float] = typer.Option(None, "--lease-timeout", min=0, help="Seconds to wait for a device "
                                                  "another run holds (default: wait)."),
    distributed: bool = typer.Option(False, "--distributed", help="Measure through `edgepipe worker --site`."),
    worker_timeout: float = typer.Option(30.0, "--worker-timeout", min=1, help="--distributed: a silent worker's "
                                         "devices move after this."),
    worker_retries: int = typer.Option(1, "--worker-retries", min=0, help="--distributed: moves before worker_lost."),
    queue_timeout: float = typer.Option(QUEUE_TIMEOUT_S, "--queue-timeout", min=1, help="--distributed: seconds a "
                                        "device waits for a worker (then no_worker)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Name for baselines and history (default: "
                                             "the file's stem)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="The float model, to measure agreement of a "
                                             "quantized .tflite."),
    model_kw: Any = None,
) -> None:
    """Convert once per format, push to every target, measure, store, gate, report.

    Exit codes: 0 passed, 1 a gate failed, 2 bad input, 3 no device could be measured, 130 / 143 interrupted
    (agents stopped, finished devices kept, run marked interrupted).
    """
    from pipeline import api
    from pipeline.inventory import load_inventory

    model = one_model(model_arg, model, model_m)
    inv = load_inventory(targets)
    chosen = inv.select(select)
    with stop_on_signals() as cancel, DeviceBoard([t.name for t in chosen], "edgepipe run") as board:
        rel = api.run(inv, model=model, data=data, calibration=calibration, select=select, out_dir=out,
                      cache_dir=cache_dir, db=db, baseline=baseline, label=label, report_dir=report, junit=junit,
                      summary=summary, on_event=board, cancel=cancel,
                      model_name=model_name, reference=reference, **model_kw,
                      on_notice=lambda msg: err_console.print(f"notice: {msg}", markup=False, highlight=False,
                                                              soft_wrap=True),
                      lease_timeout=lease_timeout, distributed=distributed, worker_timeout=worker_timeout,
                      worker_retries=worker_retries, queue_timeout=queue_timeout)
    if as_json:
        doc = rel.run.to_dict()
        doc["verdict"] = rel.verdict.to_dict()
        doc["report"] = str(rel.report_path) if rel.report_path else None
        doc["db"] = str(rel.db_path)
        emit_json(json.dumps(doc))
    else:
        console = out_console()
        console.print(device_table(rel.run, console.width))
        for d in rel.run.failed:
            console.print(f"[red]{escape(d.name)}[/]: {d.error.code}: {escape(d.error.message)}", soft_wrap=True)
        for c in rel.verdict.failures:
            console.print(f"[red]FAILED[/] {escape(c.message())}", soft_wrap=True)
        print_verdict_notes(console, rel.verdict)
        style = "green" if rel.verdict.passed else "red"
        console.print(f"[bold {style}]{escape(rel.verdict.headline())}[/]  run {rel.run.run_id} · db {rel.db_path}")
        if rel.report_path:
            console.print(f"report: {rel.report_path}")
    if cancel.cancelled:  # the signal came after every device was stored and gated: nothing left to stop
        late = cancel.error(f"interrupted after run {rel.run.run_id} was complete and gated")
        err_console.print(late.message, markup=False, highlight=False, soft_wrap=True)
        raise interrupted_exit(late.exit_code)
    raise typer.Exit(rel.exit_code)
