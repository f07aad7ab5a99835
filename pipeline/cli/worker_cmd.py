"""`edgepipe worker --site NAME`: serve a site's devices to distributed runs (thin over pipeline.api.serve_worker)."""
from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.app import app, err_console, handle_errors, interrupted_exit


@app.command("worker")
@handle_errors
def worker_command(
    site: str = typer.Option(..., "--site", help="Serve the targets whose site: is NAME (one queue per site)."),
    targets: Path = typer.Option(Path("targets.yaml"), "--targets", "-t", help="This site's inventory (its keys, known_hosts)."),
    db: Optional[str] = typer.Option(None, "--db", help="The shared PostgreSQL history and queue (default: targets.yaml db:)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="Devices measured at once (default: max_parallel)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where fetched artifacts are kept (default: ~/.cache/edgepipe/worker/SITE)."),
    heartbeat: float = typer.Option(10.0, "--heartbeat", min=0.5, help="Seconds between this worker's heartbeats."),
) -> None:
    """Take probe and measure jobs of `edgepipe run --distributed` for this site's devices until stopped (Ctrl-C or
    SIGTERM: the running jobs finish first, a second signal stops at once).

    Exit codes: 2 usage or configuration error, 130 / 143 stopped by SIGINT / SIGTERM (one line says so).
    """
    from pipeline import api
    from pipeline.inventory import load_inventory

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def line(text: str) -> None:
        err_console.print(text, markup=False, highlight=False, soft_wrap=True)

    stopped = api.serve_worker(load_inventory(targets), site, db=db, concurrency=concurrency, cache_dir=cache_dir,
                               heartbeat=heartbeat, on_line=line)
    if stopped:
        name = signal.Signals(stopped).name
        line(f"worker of site {site}: stopped by {name}; its running jobs finished and were stored")
        raise interrupted_exit(128 + stopped)
