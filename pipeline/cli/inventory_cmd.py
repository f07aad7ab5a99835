"""`edgepipe fleet validate`: load targets.yaml and print the resolved fleet."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from pipeline.inventory import load_inventory
from pipeline.cli.app import emit_json, fleet_app, handle_errors, out_console
from pipeline.cli.tables import Col, fitted_table

VALIDATE_COLUMNS = (Col("name"), Col("host", 2), Col("kind"), Col("mode"), Col("runtime", 1), Col("delegate", 3, wrap=True),
                    Col("groups", 4, wrap=True))


@fleet_app.command("validate")
@handle_errors
def validate(
    targets: Path = typer.Option(Path("targets.yaml"), "--targets", "-t", help="Inventory file."),
    as_json: bool = typer.Option(False, "--json", help="Print the resolved fleet as JSON."),
) -> None:
    """Validate the inventory and show each target with its kind and the mode it will get."""
    inv = load_inventory(targets)
    rows = [
        {"name": t.name, "host": t.host, "port": t.port, "user": t.user, "kind": t.kind, "mode": t.mode,
         "runtime": t.runtime + (f"=={t.runtime_version}" if t.runtime_version else ""), "delegate": t.delegate,
         "transport": t.transport, "groups": t.groups, "emulated": t.emulated, "allow_fallback": t.allow_fallback}
        for t in inv.targets
    ]
    if as_json:
        # "devices" is the key every command uses for this list (fleet check, run, show); "targets" stays (a contract)
        emit_json(json.dumps({"inventory": str(inv.path), "sha256": inv.sha256, "devices": rows, "targets": rows}))
        return
    cells = [[escape(r["name"]), escape(f"{r['host']}:{r['port']}" if r["transport"] == "ssh" else "local"), r["kind"],
              r["mode"], escape(r["runtime"]), escape(str(r["delegate"])), escape(",".join(r["groups"]))] for r in rows]
    console = out_console()
    console.print(fitted_table(f"{escape(str(inv.path))} · {len(rows)} targets", VALIDATE_COLUMNS, cells,
                               console.width))
