"""The job queue of distributed runs: procrastinate on the same PostgreSQL database as the results history.

The only module that imports procrastinate (an import-linter contract), and it uses only procrastinate's public
API: `App`, `JobManager` and `SchemaManager`, never its SQL. One queue per site (`edgepipe-site-NAME`) and three
tasks, each for one device: `edgepipe.probe` and `edgepipe.measure` of a run, `edgepipe.deploy` of a deployment. Workers pull from their site's
queue and heartbeat (procrastinate's `procrastinate_workers`); the coordinator defers, reads which of its jobs
are still waiting or running, and when a worker stops heartbeating hands its jobs back to the queue for another
worker of the site (procrastinate's stalled-job lookup and retry), or fails them as worker_lost.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import threading
from dataclasses import dataclass
from typing import Any, Awaitable, Iterable, TypeVar

from pipeline.errors import ConfigError
from pipeline.release.database import connect_kwargs

PROBE_TASK = "edgepipe.probe"
MEASURE_TASK = "edgepipe.measure"
DEPLOY_TASK = "edgepipe.deploy"   # one board's action in a deployment (deploy --distributed)
HEARTBEAT_S = 10.0       # how often a worker says it is alive (procrastinate's update_heartbeat_interval)
WORKER_TIMEOUT_S = 30.0  # silence after which its running jobs count as stalled (procrastinate's default)
QUEUE_TIMEOUT_S = 600.0  # how long a job waits for a worker of its site before its device is no_worker
WAITING, RUNNING, ENDED = "todo", "doing", "ended"   # a job no longer waiting or running has ended, one way or another
SCHEMA_LOCK = "edgepipe.queue-schema"
T = TypeVar("T")


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
    """Install procrastinate's tables and functions once per database (pipeline.release.database serialises it)."""
    from procrastinate.schema import SchemaManager

    db.install_once(SCHEMA_LOCK, "procrastinate_jobs", SchemaManager.get_schema())


@dataclass(frozen=True)
class StalledJob:
    id: int
    attempts: int


class JobQueue:
    """The coordinator's side of the queue. procrastinate's JobManager is asynchronous and the coordinator is not:
    the App runs on an event loop of its own thread, and each method waits for its one call there."""

    def __init__(self, url: str, password_env: str | None = None, *, file: Any = None) -> None:
        self.app = make_app(url, password_env, file=file)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgepipe-queue", daemon=True)

    def _call(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def open(self) -> "JobQueue":
        self._thread.start()

        async def opened() -> None:
            await self.app.open_async()

        self._call(opened())
        return self

    def close(self) -> None:
        try:
            self._call(self.app.connector.close_async())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def defer(self, task: str, site: str, kwargs: list[dict[str, Any]]) -> list[int]:
        """One job per kwargs on the site's queue; their ids, in order."""
        deferrer = self.app.configure_task(task, queue=queue_name(site))
        return [int(i) for i in self._call(deferrer.batch_defer_async(*kwargs))]

    def states(self, sites: Iterable[str], ids: Iterable[int]) -> dict[int, str]:
        """WAITING, RUNNING or ENDED for each of these job ids (waiting is read first, so a job a worker takes
        between the two reads is seen waiting, never ended)."""
        wanted = set(ids)

        async def read() -> dict[int, str]:
            seen: dict[int, str] = {}
            for status in (WAITING, RUNNING):
                for site in sorted(set(sites)):
                    for job in await self.app.job_manager.list_jobs_async(queue=queue_name(site), status=status):
                        if job.id in wanted:
                            seen.setdefault(int(job.id), status)
            return seen

        seen = self._call(read())
        return {i: seen.get(i, ENDED) for i in wanted}

    def stalled(self, sites: Iterable[str], ids: Iterable[int], seconds_since_heartbeat: float) -> list[StalledJob]:
        """Our running jobs whose worker stopped heartbeating (procrastinate's stalled-job lookup, per site queue)."""
        wanted = set(ids)

        async def read() -> list[StalledJob]:
            out = []
            for site in sorted(set(sites)):
                jobs = await self.app.job_manager.get_stalled_jobs(queue=queue_name(site),
                                                                   seconds_since_heartbeat=seconds_since_heartbeat)
                out += [StalledJob(int(j.id), int(j.attempts)) for j in jobs if j.id in wanted]
            return out

        return self._call(read())

    def retry_now(self, job_id: int) -> None:
        """Back to the queue (attempts + 1): the next free worker of the same site takes it."""
        self._call(self.app.job_manager.retry_job_by_id_async(job_id, retry_at=dt.datetime.now(dt.timezone.utc)))

    def fail(self, job_id: int) -> None:
        """Finish a stalled job as failed (its device is reported worker_lost)."""
        from procrastinate.jobs import Status

        self._call(self.app.job_manager.finish_job_by_id_async(job_id, status=Status.FAILED, delete_job=False))

    def cancel(self, job_id: int) -> bool:
        """Withdraw a job no worker took yet (a waiting one only)."""
        return bool(self._call(self.app.job_manager.cancel_job_by_id_async(job_id)))
