"""`edgepipe deploy`, `edgepipe rollback` and `edgepipe fleet status` (thin over pipeline.api: deploy, rollback,
fleet_status)."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from pipeline.api.inputs import DEFAULT_CACHE_DIR
from pipeline.cli.app import (app, emit_json, err_console, fleet_app, handle_errors, interrupted_exit, out_console,
                              stop_on_signals)
from pipeline.cli.fleet_cmd import DeviceBoard
from pipeline.cli.tables import Col, fitted_table

STAGE_COLUMNS = (Col("device"), Col("state"), Col("from", 2), Col("to", 1), Col("p50 ms (gated)", 3, justify="right"),
                 Col("error", 4, wrap=True))
STATUS_COLUMNS = (Col("device"), Col("model", 2), Col("release"), Col("tag", 4), Col("sha256", 1), Col("since", 3),
                  Col("health"), Col("drift"))
STATE_STYLE = {"healthy": "green", "rolled_back": "magenta", "failed": "red", "installed": "yellow", "pending": "dim"}
TARGETS_OPT = typer.Option(Path("targets.yaml"), "--targets", "-t", help="Inventory file.")
SELECT_OPT = typer.Option([], "--select", "-s", help="Target or group name (repeatable).")
GROUP_OPT = typer.Option([], "--group", "-g", help="Group name (repeatable).")
DB_OPT = typer.Option(None, "--db", help="Results database (default: targets.yaml db:, else .edgepipe/results.db "
                      "next to it).")


def _selection(targets: Path, select: List[str], groups: List[str]) -> tuple[Any, list[str], list[str]]:
    """The inventory, --select and --group as one selection, and the names of the targets it picks; a --group
    that names no group is bad input."""
    from pipeline.errors import ConfigError
    from pipeline.inventory import load_inventory

    inv = load_inventory(targets)
    known = inv.group_names
    for g in groups:
        if g not in known:
            raise ConfigError(f"--group {g!r} is not a group", file=inv.path,
                              hint=f"known groups: {', '.join(sorted(known)) or 'none'}")
    chosen = list(select) + list(groups)
    return inv, chosen, [t.name for t in inv.select(chosen)]


def _short(sha: Any) -> str:
    return f"{sha[:12]}…" if sha else "-"


def stage_rows(devices: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for d in devices:
        h, err = d.get("health") or {}, d.get("error") or {}
        style = STATE_STYLE.get(d["state"], "")
        p50 = f"{h['p50_ms']:.3f} ({h['gated_p50_ms']:.3f})" if h.get("p50_ms") and h.get("gated_p50_ms") else "-"
        rows.append([escape(d["name"]), f"[{style}]{d['state']}[/]", _short(d["from"]), _short(d["to"]), p50,
                     escape(f"{err.get('code')}: {err.get('message')}") if err else ""])
    return rows


def print_stages(doc: dict[str, Any], title: str) -> None:
    console = out_console()
    for k, stage in enumerate(doc["stages"]):
        console.print(fitted_table(f"{title} · stage {k + 1} of {len(doc['stages'])}", STAGE_COLUMNS,
                                   stage_rows(stage["devices"]), console.width))


def _print_plan(dep: Any) -> None:
    console = out_console()
    plan = dep.plan
    rel = plan.release
    console.print(f"plan: release {rel.run_id} of {escape(rel.model_name)} ({escape(rel.headline)})"
                  + (f" · FORCED: {escape(rel.forced)}" if rel.forced else ""), soft_wrap=True)
    for k, stage in enumerate(plan.stages):
        console.print(f"stage {k + 1}: " + ", ".join(f"{escape(d.name)} <- {d.sha256[:12]} ({escape(d.cls.label)})"
                                                     for d in stage), soft_wrap=True)
    for r in plan.refused:
        console.print(f"[red]refused[/] {escape(r.name)}: {r.error.code}: {escape(r.error.message)}", soft_wrap=True)
    if plan.unstaged:
        console.print(f"not in any stage of {plan.spec!r}: {escape(', '.join(plan.unstaged))}", soft_wrap=True)


def _finish(dep: Any, as_json: bool, title: str) -> None:
    doc = dep.to_dict()
    if as_json:
        emit_json(json.dumps(doc, default=str))
    else:
        print_stages(doc, title)
        res = dep.result
        if res.aborted:
            out_console().print(f"[bold red]ABORTED[/] {escape(res.abort_reason or '')}", soft_wrap=True)
        if res.forced:
            out_console().print(f"[yellow]forced[/]: {escape(res.forced)}", soft_wrap=True)
        out_console().print(f"deployment {res.deployment_id} · db {dep.db_path}"
                            + (f" · resumed" if res.resumed else "")
                            + (f" · report {dep.report_path}" if dep.report_path else ""))
    if dep.result.interrupted:
        err_console.print(f"interrupted by {dep.result.interrupted}: boards that had switched finished; run the same "
                          "command again to resume", markup=False, highlight=False, soft_wrap=True)
        raise interrupted_exit(dep.result.interrupted_exit)
    raise typer.Exit(dep.exit_code)


@app.command("deploy")
@handle_errors
def deploy_command(
    run: str = typer.Argument("last", help="The gated run: a run id, a tag, a unique prefix or `last`."),
    targets: Path = TARGETS_OPT,
    select: List[str] = SELECT_OPT,
    group: List[str] = GROUP_OPT,
    stages: str = typer.Option("canary,100%", "--stages", help="Cumulative stages: canary (the canary group, else "
                               "one device), counts and percentages, e.g. 1,10%,50%,100%."),
    max_fail_percent: float = typer.Option(0.0, "--max-fail-percent", min=0, max=100, help="Stop the rollout when "
                                           "more than this share of a stage fails; that stage rolls back."),
    rollback_all: bool = typer.Option(False, "--rollback-all", help="On abort, roll back every device this rollout "
                                      "changed, not only the failing stage."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (who gets which sha256 in which stage, "
                                 "what is refused and why); change nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Which model `last` means, and the name "
                                             "the boards keep releases under (default: the run's)."),
    force: Optional[str] = typer.Option(None, "--force", metavar="REASON", help="Ship a run that did not pass its "
                                        "gate; the reason is recorded."),
    db: Optional[str] = DB_OPT,
    out: Path = typer.Option(Path(".edgepipe/artifacts"), "--out", help="Where the run wrote its artifacts."),
    cache_dir: Optional[Path] = typer.Option(DEFAULT_CACHE_DIR, "--cache-dir", help="Conversion cache to find "
                                             "the artifacts in."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write deploy.html (stage timeline) here."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML (a testcase per device)."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Write a Markdown summary."),
    lease_timeout: Optional[float] = typer.Option(None, "--lease-timeout", min=0, help="Seconds to wait for a "
                                                  "device another run holds."),
    distributed: bool = typer.Option(False, "--distributed", help="Deploy through `edgepipe worker --site` "
                                     "processes (targets need site:, db: must be PostgreSQL)."),
) -> None:
    """Ship a gated run to the fleet in stages: upload, switch `current` atomically, activate, check health on
    each board against the gated figures; a board that fails rolls back by itself.

    Exit codes: 0 all healthy, 1 stopped by --max-fail-percent or a failed health check, 2 bad input (nothing
    touched), 3 nothing reachable, 130/143 interrupted (boards that switched finish; rerun to resume).
    """
    from pipeline import api

    inv, chosen, names = _selection(targets, select, group)
    with stop_on_signals() as cancel, DeviceBoard(names, "edgepipe deploy", enabled=not as_json) as board:
        dep = api.deploy(inv, run, select=chosen, stages=stages, max_fail_percent=max_fail_percent,
                         rollback_all=rollback_all, dry_run=dry_run, model_name=model_name, force=force, db=db,
                         out_dir=out, cache_dir=cache_dir, report_dir=report, junit=junit, summary=summary,
                         on_event=board, cancel=cancel, lease_timeout=lease_timeout, distributed=distributed)
    if dry_run:
        if as_json:
            emit_json(json.dumps(dep.to_dict(), default=str))
        else:
            _print_plan(dep)
        raise typer.Exit(dep.exit_code)
    _finish(dep, as_json, f"deploy {dep.result.release}")


@app.command("rollback")
@handle_errors
def rollback_command(
    targets: Path = TARGETS_OPT,
    select: List[str] = SELECT_OPT,
    group: List[str] = GROUP_OPT,
    to: Optional[str] = typer.Option(None, "--to", metavar="RUN", help="Go to this run's release (kept on the "
                                     "board) instead of the previous one."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Which model's releases (default: the one "
                                             "the history records for these devices)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    db: Optional[str] = DB_OPT,
    report: Optional[Path] = typer.Option(None, "--report", help="Write deploy.html here."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Write a Markdown summary."),
    lease_timeout: Optional[float] = typer.Option(None, "--lease-timeout", min=0),
) -> None:
    """Switch boards back to their previous release (or --to RUN), activate and check it.

    Exit codes: 0 every board rolled back and healthy, 1 a board failed, 2 bad input, 3 nothing reachable.
    """
    from pipeline import api

    inv, chosen, names = _selection(targets, select, group)
    with stop_on_signals() as cancel, DeviceBoard(names, "edgepipe rollback", enabled=not as_json) as board:
        dep = api.rollback(inv, select=chosen, to=to, model_name=model_name, db=db, report_dir=report, junit=junit,
                           summary=summary, on_event=board, cancel=cancel, lease_timeout=lease_timeout)
    _finish(dep, as_json, "rollback" + (f" to {dep.result.release}" if dep.result.release else ""))


def _since(ts: Any) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@fleet_app.command("status")
@handle_errors
def status_command(
    targets: Path = TARGETS_OPT,
    select: List[str] = SELECT_OPT,
    group: List[str] = GROUP_OPT,
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Only this model (default: every model the "
                                             "history records for these devices)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    db: Optional[str] = DB_OPT,
) -> None:
    """What each board runs (read on the board: release.json and the sha256 of the file `current` points to),
    since when, its health, and drift from the history.

    Exit codes: 0 no drift, 1 a board drifted, 2 bad input, 3 no board reachable.
    """
    from pipeline import api

    inv, chosen, names = _selection(targets, select, group)
    with DeviceBoard(names, "fleet status", enabled=not as_json) as board:
        rows = api.fleet_status(inv, select=chosen, model_name=model_name, db=db, on_event=board)
    if as_json:
        emit_json(json.dumps({"devices": [r.to_dict() for r in rows]}, default=str))
    else:
        console = out_console()
        table = [[escape(r.name), escape(r.model_name), escape(r.release or "-"), escape(r.tag or "-"),
                  _short(r.sha256), _since(r.since), escape(r.health or "-"),
                  "[bold red]DRIFT[/]" if r.drift else ("?" if r.drift is None else "no")] for r in rows]
        console.print(fitted_table(f"fleet status · {len(rows)} device release(s)", STATUS_COLUMNS, table,
                                   console.width))
        for r in rows:
            if r.reason:
                console.print(f"[red]{escape(r.name)}[/] ({escape(r.model_name)}): {escape(r.reason)}", soft_wrap=True)
    if rows and all(r.drift is None for r in rows):
        raise typer.Exit(3)
    raise typer.Exit(1 if any(r.drift for r in rows) else 0)
