"""The job queue of distributed runs: procrastinate on the same PostgreSQL database as the results history.

One queue per site (`edgepipe-site-NAME`) and two tasks, each for one device of one run: `edgepipe.probe` and
`edgepipe.measure`. Workers pull from their site's queue and heartbeat (procrastinate's `procrastinate_workers`);
the coordinator defers, reads job states, and when a worker stops heartbeating hands its jobs back to the queue
for another worker of the site (procrastinate's own stalled-job query and retry), or fails them as worker_lost.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError
from pipeline.release.database import connect_kwargs

PROBE_TASK = "edgepipe.probe"
MEASURE_TASK = "edgepipe.measure"
HEARTBEAT_S = 10.0       # how often a worker says it is alive (procrastinate's update_heartbeat_interval)
WORKER_TIMEOUT_S = 30.0  # silence after which its running jobs count as stalled (procrastinate's default)
TERMINAL = ("succeeded", "failed", "cancelled", "aborted")


def queue_name(site: str) -> str:
    return f"edgepipe-site-{site}"


def require_postgres(db: Any, *, what: str, file: Any = None) -> None:
    """Distributed mode shares jobs through PostgreSQL: a SQLite history is a configuration error (exit 2)."""
    if not getattr(db, "is_postgres", False):
        raise ConfigError(f"{what} needs a PostgreSQL results database (got {db.display})", file=file, field="db",
                          hint="set db: postgresql://USER@HOST/DB in targets.yaml, or pass --db postgresql://...")


def make_app(url: str, password_env: str | None = None, *, file: Any = None) -> Any:
    """A procrastinate App on the history's database (tasks are registered by the worker that runs them)."""
    import procrastinate

    return procrastinate.App(connector=procrastinate.PsycopgConnector(**connect_kwargs(url, password_env, file=file)))


def ensure_schema(db: Any) -> None:
    """Install procrastinate's tables and functions once per database (serialised by an advisory lock)."""
    from procrastinate.schema import SchemaManager

    with db.write():
        db.execute("SELECT pg_advisory_xact_lock(hashtext('edgepipe.queue-schema'))")
        if db.one("SELECT to_regclass('procrastinate_jobs')")[0] is None:
            db.execute(SchemaManager.get_schema())


@dataclass
class JobState:
    id: int
    status: str
    attempts: int
    worker_id: int | None


def job_states(db: Any, ids: list[int]) -> dict[int, JobState]:
    if not ids:
        return {}
    rows = db.all("SELECT id, status, attempts, worker_id FROM procrastinate_jobs WHERE id = ANY(?)", (list(ids),))
    return {int(r["id"]): JobState(int(r["id"]), str(r["status"]), int(r["attempts"]), r["worker_id"]) for r in rows}


def stalled_jobs(app: Any, queues: set[str], ids: set[int], seconds_since_heartbeat: float) -> list[dict[str, Any]]:
    """Our running jobs whose worker stopped heartbeating: procrastinate's own stalled-job query, per site queue."""
    from procrastinate import sql

    conn = app.connector.get_sync_connector()
    out = []
    for q in sorted(queues):
        rows = conn.execute_query_all(query=sql.queries["select_stalled_jobs_by_heartbeat"], queue=q, task_name=None,
                                      seconds_since_heartbeat=seconds_since_heartbeat)
        out.extend(dict(r) for r in rows if int(r["id"]) in ids)
    return out


def retry_now(app: Any, job_id: int) -> None:
    """Back to `todo` (attempts + 1): the next free worker of the same site queue takes it."""
    app.job_manager.retry_job_by_id(job_id, retry_at=dt.datetime.now(dt.timezone.utc))


def fail(app: Any, job_id: int) -> None:
    """Finish a stalled job as failed (its device is reported worker_lost)."""
    from procrastinate import sql

    app.connector.get_sync_connector().execute_query(query=sql.queries["finish_job"], job_id=job_id, status="failed",
                                                     delete_job=False)


def cancel(app: Any, job_id: int) -> bool:
    """Withdraw a job no worker took (`todo` only)."""
    return bool(app.job_manager.cancel_job_by_id(job_id))
