"""`edgepipe fleet check` and `edgepipe fleet enroll` (thin over pipeline.api.fleet_check and fleet_enroll)."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from pipeline.cli.app import emit_json, err_console, fleet_app, handle_errors, out_console
from pipeline.cli.tables import Col, fitted_table

STAGE_STYLE = {"probe": "cyan", "convert": "magenta", "artifact": "magenta", "connect": "cyan", "push": "blue", "run": "yellow",
               "collect": "blue", "done": "bold", "lease": "red", "queue": "cyan", "cooldown": "yellow"}


class DeviceBoard:
    """A live per-device table on stderr (stage + latest detail), fed by the library's on_event callback."""

    def __init__(self, names: list[str], title: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.rows: dict[str, tuple[str, str]] = {n: ("waiting", "") for n in names}
        self.title = title
        self.lock = threading.Lock()
        self.live = Live(get_renderable=self.render, console=err_console, refresh_per_second=8, transient=True) \
            if enabled and err_console.is_terminal else None

    def render(self) -> Table:
        t = Table(title=self.title, title_justify="left", show_edge=False)
        width = max([6] + [len(n) for n in self.rows])
        t.add_column("device", no_wrap=True, min_width=min(width, 24))
        t.add_column("stage", no_wrap=True, min_width=7)
        t.add_column("detail", overflow="ellipsis", no_wrap=True, max_width=80)
        with self.lock:
            rows = list(self.rows.items())
        for name, (stage, detail) in rows:
            style = STAGE_STYLE.get(stage, "")
            if stage == "done":
                style = "green" if detail in ("ok", "healthy") else "red"
            t.add_row(name, f"[{style}]{stage}[/]" if style else stage, detail)
        return t

    def __call__(self, name: str, stage: str, detail: str) -> None:
        with self.lock:
            changed = self.rows.get(name, ("", ""))[0] != stage
            self.rows[name] = (stage, str(detail))
        if self.live is None and self.enabled and changed:
            # Not a terminal (CI logs, pipes): one plain line each time a device enters a stage.
            err_console.print(f"{self.title}: {name}: {stage}: {detail}", markup=False, highlight=False, soft_wrap=True)

    def __enter__(self) -> "DeviceBoard":
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.live.stop()


CHECK_COLUMNS = (Col("device"), Col("host", 3), Col("ok"), Col("connect", 4, justify="right"), Col("python", 2),
                 Col("runtimes", 1, wrap=True), Col("edge tpu", 5, wrap=True), Col("gpu", 5, wrap=True),
                 Col("disk free", 3, justify="right"), Col("MHz", 4, wrap=True), Col("°C", 4, wrap=True),
                 Col("throttling", 2, wrap=True))


def _gib(n: Any) -> str:
    return f"{n / 2**30:.1f} GiB" if isinstance(n, (int, float)) else "?"


def _conditions(s: dict[str, Any]) -> list[str]:
    """Frequency (cur/max MHz, with the governor), temperatures and vcgencmd throttling flags of one probe."""
    freq = s.get("freq_mhz") or {}
    cur = sorted({v.get("cur") for v in freq.values() if v.get("cur") is not None})
    top = sorted({v.get("max") for v in freq.values() if v.get("max") is not None})
    mhz = (f"{'/'.join(f'{c:.0f}' for c in cur) or '?'} of {'/'.join(f'{m:.0f}' for m in top) or '?'}"
           + (f" {', '.join(sorted(set(s['governor'].values())))}" if s.get("governor") else "")) if freq else "-"
    temps = ", ".join(f"{k.replace('thermal_zone', 'zone')} {v:.0f}" for k, v in (s.get("temps_c") or {}).items())
    now, boot = s.get("throttled_now"), s.get("throttled_since_boot")
    if now is None:
        flags = "-"
    else:
        flags = ", ".join([f"[red]{escape(f)} now[/]" for f in now]
                          + [f"[yellow]{escape(f)} since boot[/]" for f in boot or []]) or "[green]none[/]"
    return [escape(mhz), escape(temps or "-"), flags]


def _check_row(r: Any) -> list[str]:
    """One device's row: what it has, and whether it can run the agent (rich markup; device text escaped)."""
    ok = "[green]yes[/]" if r.ok else f"[red]no: {escape(r.error.code if r.error else '?')}[/]"
    if not r.probe:   # it never answered: nothing to show but why
        return [escape(r.name), escape(r.host), ok] + [""] * 9
    s = r.summary()
    runtimes = ", ".join(escape(f"{k} {v}") for k, v in s["runtimes"].items()) or "[red]none[/]"
    tpu = [x for x in (s["libedgetpu"] and "libedgetpu", s["coral_usb"] and "usb " + ",".join(s["coral_usb"]),
                       s["coral_pcie"] and "pcie") if x]
    return [escape(r.name), escape(r.host), ok, f"{r.connect_ms:.0f} ms" if r.connect_ms is not None else "",
            escape(s["python"] or "?"), runtimes, escape(", ".join(tpu) or "-"), escape(s["gpu_delegate"] or "-"),
            _gib(s["disk_free_bytes"])] + _conditions(s)


@fleet_app.command("check")
@handle_errors
def check(
    targets: Path = typer.Option(Path("targets.yaml"), "--targets", "-t", help="Inventory file."),
    select: List[str] = typer.Option([], "--select", "-s", help="Target or group name (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Connect to every target and report reachability, latency, Python, runtimes, Coral/GPU, free disk, CPU
    frequencies, temperatures and throttling flags, and whether it can run the agent (ok: no names why:
    unreachable, no_python, no_runtime, disk_full...).

    Exit codes: 0 every device can run the agent, 2 bad input, 3 a device cannot (none can, or some cannot).
    """
    from pipeline import api
    from pipeline.inventory import load_inventory

    inv = load_inventory(targets)
    chosen = inv.select(select)
    with DeviceBoard([t.name for t in chosen], "fleet check", enabled=not as_json) as board:
        results = api.fleet_check(inv, select, on_event=board)
    if as_json:
        emit_json(json.dumps({"devices": [r.to_dict() for r in results]}))
    else:
        console = out_console()
        console.print(fitted_table(f"fleet check · {sum(r.ok for r in results)}/{len(results)} can run the agent",
                                   CHECK_COLUMNS, [_check_row(r) for r in results], console.width))
        for r in results:
            if not r.ok:
                console.print(f"[red]{escape(r.name)}[/]: {r.error.code}: {escape(r.error.message)}", soft_wrap=True)
    if not all(r.ok for r in results):
        raise typer.Exit(3)


@fleet_app.command("enroll")
@handle_errors
def enroll(
    targets: Path = typer.Option(Path("targets.yaml"), "--targets", "-t", help="Inventory file."),
    select: List[str] = typer.Option([], "--select", "-s", help="Target or group name (repeatable)."),
    known_hosts: Optional[Path] = typer.Option(None, "--known-hosts", help="Record here instead of each target's known_hosts."),
) -> None:
    """Record the host key of every target not yet known (accept-new, explicitly); never replace a changed key."""
    from pipeline import api

    out = out_console()

    def show(r: Any) -> None:
        colour = {"added": "green", "known": "dim", "changed": "bold red", "error": "red"}[r.status]
        fp = f"{r.keytype} {r.fingerprint}" if r.fingerprint else ""
        out.print(f"[{colour}]{r.status:7}[/] {r.name} {r.host} {fp} — {r.message}", soft_wrap=True)

    results = api.fleet_enroll(targets, select, known_hosts, on_result=show)
    if any(r.status in ("changed", "error") for r in results):
        raise typer.Exit(3)
