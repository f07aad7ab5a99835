"""`edgepipe history`, `show`, `gate` and `report`: thin commands over pipeline.api (history, show, gate, report)."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from pipeline.cli.app import app, emit_json, err_console, handle_errors, out_console
from pipeline.cli.tables import Col, fitted_table, memory_cell, throttle_mark
from pipeline.cli.run_cmd import _delegate, print_verdict_notes

HISTORY_COLUMNS = (Col("run"), Col("started (UTC)", 1), Col("model", 4, wrap=True), Col("tag", 3, wrap=True),
                   Col("complete"), Col("ok"), Col("fallbacks"), Col("verdict", wrap=True),
                   Col("median p50 ms", 2, justify="right"))
HISTORY_NOTES = ("verdict: the run's own (stored by `edgepipe run`); \"gate:\" the newest `edgepipe gate --record` "
                 "stored beside it (`edgepipe show RUN` lists all). ok: devices measured / targets of the run. "
                 "median p50 ms: the median of the devices' p50 (emulated left out); --target NAME shows one device.")
TREND_COLUMNS = (Col("run"), Col("started (UTC)", 3), Col("model", 5, wrap=True), Col("tag", 5, wrap=True),
                 Col("mode", 2), Col("ok", wrap=True),
                 Col("p50 ms", justify="right"), Col("p90 ms", 4, justify="right"), Col("top-1", 1, justify="right"),
                 Col("agreement", 1, justify="right"), Col("bytes", 6, justify="right"))
SHOW_COLUMNS = (Col("device"), Col("kind", 3), Col("mode", 1), Col("ok"), Col("runtime", 2, wrap=True),
                Col("accelerator", wrap=True),
                Col("p50 ms", justify="right"), Col("p90 ms", 4, justify="right"), Col("top-1", 1, justify="right"),
                Col("agreement", 1, justify="right"), Col("model/proc MB", 3, justify="right"))
DB_OPT = typer.Option(None, "--db", help="Results database: a SQLite path or postgresql://user@host/db (default: "
                      "targets.yaml `db:`, else .edgepipe/results.db beside it).")
MODEL_OPT = typer.Option(None, "--model-name", help="Only runs of this model (the name `edgepipe run` recorded).")


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _inventory(targets: Optional[Path], required: bool):
    from pipeline.inventory import load_inventory

    if targets is None and not required:
        return load_inventory("targets.yaml") if Path("targets.yaml").exists() else None
    return load_inventory(targets or Path("targets.yaml"))


def _verdict_word(passed: bool | None, exit_code: int | None) -> str:
    return "-" if passed is None else ("passed" if passed else f"failed (exit {exit_code})")


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


@app.command("history")
@handle_errors
def history(
    target: Optional[str] = typer.Option(None, "--target", help="Show one target's trend."),
    limit: int = typer.Option(20, "--limit", min=1, help="How many runs, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print runs and per-target points as JSON."),
    db: Optional[str] = DB_OPT,
    targets: Optional[Path] = typer.Option(None, "--targets", "-t", help="Inventory (for its db: setting)."),
    model_name: Optional[str] = MODEL_OPT,
) -> None:
    """List recent runs with their verdicts, or one target's trend with --target."""
    from pipeline import api

    hist = api.history(db=db, targets=_inventory(targets, required=False), target=target, limit=limit,
                       model_name=model_name)
    if as_json:
        emit_json(json.dumps(hist.to_dict()))
        return
    console = out_console()
    if target is not None:
        rows = [[escape(p.run_id), _when(p.started), escape(p.model_name or "-"), escape(p.label or "-"),
                 escape(p.mode or "-"),
                 ("yes" + (" (FALLBACK: CPU)" if p.fallback else "")) if p.ok else escape(p.error_code or "no"),
                 _f(p.p50), _f(p.p90), _f(p.top1, 4), _f(p.agreement, 4), _f(p.bytes)] for p in hist.points]
        console.print(fitted_table(f"trend of {escape(target)}", TREND_COLUMNS, rows, console.width))
        return
    console.print(fitted_table(f"last {len(hist.runs)} run(s)", HISTORY_COLUMNS, [_run_row(r, hist) for r in hist.runs],
                               console.width))
    console.print(HISTORY_NOTES, style="dim", soft_wrap=True)


def _run_row(r: Any, hist: Any) -> list[str]:
    """One run of `history`: its own verdict (and the newest recorded by `gate --record`), devices measured of the
    targets it set out to measure, the median of its devices' p50."""
    p50s = sorted(p.p50 for p in hist.points if p.run_id == r.run_id and p.p50 is not None and not p.emulated)
    fell = sum(1 for p in hist.points if p.run_id == r.run_id and p.fallback)
    verdict = _verdict_word(r.passed, r.exit_code) + (
        f"; gate: {_verdict_word(r.gate_passed, r.gate_exit_code)}" if r.gate_verdicts else "")
    complete = "yes" if r.complete else ("interrupted" if r.interrupted else "NO")
    return [escape(r.run_id), _when(r.started), escape(r.model_name or "-"), escape(r.label or "-"), complete,
            f"{r.ok}/{max(r.planned or 0, r.devices)}", str(fell) if fell else "-", verdict,
            _f(p50s[len(p50s) // 2] if p50s else None)]


@app.command("show")
@handle_errors
def show(
    run: str = typer.Argument(..., metavar="RUN", help="Run id, tag, unique id prefix, or 'last'."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored run (and its last verdict) as JSON."),
    db: Optional[str] = DB_OPT,
    targets: Optional[Path] = typer.Option(None, "--targets", "-t", help="Inventory (for its db: setting)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="With 'last': the last run of this model."),
) -> None:
    """Show one stored run: its devices, figures and last gate verdict."""
    from pipeline import api

    stored = api.show(run, db=db, targets=_inventory(targets, required=False), model_name=model_name)
    result, verdict = stored.run, stored.verdict
    if as_json:
        doc = result.to_dict()
        doc["verdict"] = stored.verdict_doc           # the run's own, else the newest `gate --record` stored
        doc["verdict_origin"] = stored.verdict_origin
        doc["verdicts"] = [r.to_dict() for r in stored.records]
        emit_json(json.dumps(doc))
        return
    state = ("complete" if result.complete else f"INTERRUPTED by {result.interrupted}" if result.interrupted
             else "INCOMPLETE (stopped before the end)")
    rows = []
    for d in result.devices:
        m = d.measured
        rows.append([escape(d.name), d.kind, d.mode,
                     ("yes" + throttle_mark(d)) if d.ok else escape(d.error.code if d.error else "no"),
                     escape(m.runtime_label or "-"), _delegate(m), _f(m.latency.p50), _f(m.latency.p90),
                     _f(m.top1, 4), _f(m.agreement_top1, 4), memory_cell(m)])
    console = out_console()
    model = f" · model {escape(result.model_name)}" if result.model_name else ""
    console.print(fitted_table(f"run {escape(result.run_id)}{model} · {_when(result.started)} UTC · {state}",
                               SHOW_COLUMNS, rows, console.width))
    for d in result.devices:
        if d.fallback:
            console.print(f"[bold yellow]FALLBACK[/] {escape(d.name)}: {escape(d.fallback_reason or 'ran on the CPU')}",
                          soft_wrap=True)
    if verdict is not None:
        for note in verdict.notes:
            console.print(f"[yellow]note[/] {escape(note)}", soft_wrap=True)
    for record in stored.records:   # every verdict, each saying who stored it; the run's own first
        who = ("the run's own, stored by `edgepipe run`" if record.origin == "run" else
               f"stored by `edgepipe gate --record` at {_when(record.created)} UTC"
               + (f" with {record.targets}" if record.targets else ""))
        console.print(f"verdict ({escape(who)}): {escape(str(record.verdict.get('headline') or '-'))}",
                      soft_wrap=True)
    if not stored.records:
        console.print("verdict: none stored (`edgepipe gate RUN --record` stores one)")


@app.command("gate")
@handle_errors
def gate(
    run: str = typer.Argument(..., metavar="RUN", help="Run id, tag, unique id prefix, or 'last'."),
    targets: Path = typer.Option(Path("targets.yaml"), "--targets", "-t", help="Inventory holding the gates."),
    select: Optional[list[str]] = typer.Option(None, "--select", help="Gate only these targets or groups."),
    baseline: str = typer.Option("last", "--baseline", help="last | RUN_ID | TAG | none"),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML (one testcase per device x check)."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the HTML report into this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
    record: bool = typer.Option(False, "--record", help="Store this verdict beside the run's own (default: a what-if, "
                                "nothing stored)."),
    db: Optional[str] = DB_OPT,
) -> None:
    """Gate a stored run and print the verdict; the history changes only with --record, which stores it beside
    the run's own (never replacing it). Exit 0 passed, 1 a gate failed, 2 bad input, 3 no device measured."""
    from pipeline import api

    inv = _inventory(targets, required=True)
    names = [t.name for t in inv.select(select)] if select else None
    rel = api.gate(run, targets=inv, db=db, baseline=baseline, select=names or (), junit=junit, summary=summary,
                   report_dir=report, record=record)
    verdict = rel.verdict
    if rel.report_path is not None:
        err_console.print(f"report: {rel.report_path}", markup=False)
    if as_json:
        emit_json(json.dumps({**verdict.to_dict(), "recorded": rel.recorded}))
    else:
        console = out_console()
        for c in verdict.failures:
            console.print(f"[red]✗[/] {escape(c.message())}")
        print_verdict_notes(console, verdict)
        console.print(("[green]" if verdict.passed else "[red]") + escape(verdict.headline()) + "[/]")
        console.print(f"recorded beside run {escape(verdict.run_id)}'s own verdict in {rel.db_path}" if rel.recorded
                      else "not recorded: the history still shows the run's own verdict (--record stores this one "
                           "beside it)", style="dim", soft_wrap=True)
    raise typer.Exit(verdict.exit_code)


@app.command("report")
@handle_errors
def report_cmd(
    run: str = typer.Argument(..., metavar="RUN", help="Run id, tag, unique id prefix, or 'last'."),
    out: Path = typer.Option(..., "--out", help="Directory for report.html."),
    targets: Optional[Path] = typer.Option(None, "--targets", "-t",
                                           help="Re-gate with this inventory (default: the run's own stored verdict)."),
    baseline: str = typer.Option("last", "--baseline", help="With --targets: last | RUN_ID | TAG | none"),
    db: Optional[str] = DB_OPT,
) -> None:
    """Write one self-contained HTML report (no network, inline SVG plots) for a stored run."""
    from pipeline import api

    path = api.report(run, out_dir=out, db=db, targets=_inventory(targets, required=False),
                      baseline=baseline, regate=targets is not None)
    typer.echo(str(path))
