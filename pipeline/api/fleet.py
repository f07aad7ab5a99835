"""The fleet side of the API: `fleet_check` (what each device really has), `fleet_enroll` (record host keys,
accept-new, explicitly) and `serve_worker` (`edgepipe worker --site`: a site's devices for distributed runs)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.api.inputs import inventory_of
from pipeline.inventory import Inventory


def fleet_check(targets: str | Path | Inventory, select: Iterable[str] = (), *,
                on_event: Callable[[str, str, str], None] | None = None) -> list[Any]:
    """Probe the selected targets (reachability, latency, Python, runtimes, Coral/GPU, free disk): one
    pipeline.devices.probe.ProbeResult per target, never an exception for a device's problem."""
    from pipeline.devices.probe import check_fleet

    return check_fleet(inventory_of(targets), list(select), on_event=on_event)


def fleet_enroll(targets: str | Path | Inventory, select: Iterable[str] = (), known_hosts: str | Path | None = None,
                 *, on_result: Callable[[Any], None] | None = None) -> list[Any]:
    """Record the host key of every selected target not yet known (in `known_hosts`, else each target's own
    file); a changed key is reported, never replaced. One pipeline.devices.knownhosts.EnrollResult per target."""
    from pipeline.devices.knownhosts import enroll
    from pipeline.devices.transport.ssh import fetch_host_key

    return enroll(inventory_of(targets).select(list(select)), known_hosts, on_result=on_result, fetch=fetch_host_key)


def serve_worker(targets: str | Path | Inventory, site: str, *, db: str | None = None, concurrency: int | None = None,
                 cache_dir: str | Path | None = None, heartbeat: float | None = None,
                 on_line: Callable[[str], None] | None = None) -> int | None:
    """Take probe and measure jobs of distributed runs for the site's devices until SIGINT/SIGTERM (running jobs
    finish first); returns the signal that stopped it. Bad input (no target of the site, a SQLite history) is a
    ConfigError before any job is taken."""
    from pipeline.distributed.queue import HEARTBEAT_S
    from pipeline.distributed.worker import Worker

    return Worker(inventory_of(targets), site, db=db, concurrency=concurrency, cache_dir=cache_dir,
                  heartbeat=heartbeat or HEARTBEAT_S, on_line=on_line).serve()
