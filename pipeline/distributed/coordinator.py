"""`edgepipe run --distributed`: the executor whose devices are reached by per-site workers.

The run driver (pipeline.run.driver) owns the run; this executor plugs in its steps: probe jobs first (so each
artifact still fits the runtime the device really has), then the plan here (float reference, one conversion per
format, eval files), the artifacts into the artifact store, one measure job per device on its site's queue, and
a wait that relays each device's progress. Workers commit raw device results to the shared history as they
finish; the coordinator fetches each device's outputs and scores them here, as a local run does. A device whose
worker died is handed to another worker of its site, or reported `worker_lost`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any, Callable

from pipeline.devices.fleet import DeviceJob
from pipeline.devices.probe import ProbeResult
from pipeline.distributed import queue as q
from pipeline.distributed.artifacts import ArtifactStore
from pipeline.errors import ConfigError, EdgepipeError
from pipeline.results import DeviceResult, ErrorInfo
from pipeline.run.driver import RunContext
from pipeline.run.plan import JobPlan, plan_jobs

POLL_S = 0.5
STALL_CHECK_S = 2.0
Jobs = dict[str, tuple[int, Any]]   # target name -> (job id, target)


@dataclass(frozen=True)
class DistributedOptions:
    """How a distributed run waits for its sites' workers (the `run --distributed` flags)."""

    worker_timeout: float = q.WORKER_TIMEOUT_S   # silence after which a worker's devices go to another worker
    worker_retries: int = 1                      # how often a lost worker's device is queued again
    queue_timeout: float | None = q.QUEUE_TIMEOUT_S   # how long a job may wait for a worker (None: for ever)
    lease_timeout: float | None = None           # how long a worker waits for a device another run holds


def preflight(inventory: Any, targets: list[Any], store: Any) -> None:
    """Bad input for a distributed run, as one line (exit 2) before anything is recorded: every target needs a
    site (which workers reach it), and the history must be PostgreSQL (the queue lives there)."""
    for t in targets:
        if not t.site:
            raise ConfigError("required for --distributed: the site whose workers reach this device", file=inventory.path,
                              field=f"{t.field_path}.site", hint="add site: NAME to the target, its group or defaults")
    q.require_postgres(store.db, what="run --distributed", file=inventory.path)


def _probe_from(doc: dict[str, Any]) -> ProbeResult:
    known = {f.name for f in fields(ProbeResult)} - {"transport"}
    d = {k: v for k, v in doc.items() if k in known}
    d["error"] = ErrorInfo(d["error"]["code"], d["error"]["message"]) if d.get("error") else None
    return ProbeResult(**d)


class Coordinator:
    """Defers jobs for one run, watches them, recovers from lost workers, relays progress."""

    def __init__(self, store: Any, ctx: RunContext, options: DistributedOptions) -> None:
        self.exchange, self.ctx, self.options = store.exchange, ctx, options
        self.queue = q.JobQueue(str(store.db.location), ctx.inventory.db_password_env, file=ctx.inventory.path)
        self._seen: dict[str, int] = {}
        self._since = 0.0  # progress rows updated after this (database clock) are read again
        self._pending_ids: set[int] = set()

    def __enter__(self) -> "Coordinator":
        self.queue.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        for job_id in list(self._pending_ids):  # interrupted: withdraw what no worker took yet
            try:
                self.queue.cancel(job_id)
            except Exception:
                pass
        self.queue.close()

    def defer(self, task: str, targets: list[Any], kwargs: Callable[[Any], dict[str, Any]]) -> Jobs:
        jobs = {}
        for site in sorted({t.site for t in targets}):
            mine = [t for t in targets if t.site == site]
            for t, job_id in zip(mine, self.queue.defer(task, site, [kwargs(t) for t in mine])):
                jobs[t.name] = (job_id, t)
                self._pending_ids.add(job_id)
                self.ctx.on_event(t.name, "queue", f"waiting for a worker of site {site}")
        return jobs

    def wait(self, jobs: Jobs, arrived: Callable[[set[str]], dict[str, Any]]) -> dict[str, Any]:
        """Each target's result (what `arrived(pending names)` returns once workers stored them) or an ErrorInfo.
        A set cancel token raises Interrupted (jobs no worker took yet are withdrawn on exit)."""
        out: dict[str, Any] = {}
        pending = dict(jobs)
        queued_at = last_stall = time.monotonic()
        while pending:
            self.ctx.cancel.check(f"stopped while {len(pending)} device(s) were with their sites' workers")
            states = self.queue.states({t.site for _, t in pending.values()}, [i for i, _ in pending.values()])
            ready = arrived(set(pending))  # after the states: a job seen ended has its result stored already
            for name, (job_id, t) in list(pending.items()):
                got = ready.get(name) or self._unanswered(name, job_id, t, states.get(job_id), queued_at, arrived)
                if got is not None:
                    out[name] = got
                    del pending[name]
                    self._pending_ids.discard(job_id)
            self._relay_progress()
            if pending and time.monotonic() - last_stall >= STALL_CHECK_S:
                last_stall = time.monotonic()
                self._recover(pending, out)
            if pending:
                time.sleep(POLL_S)
        return out

    def _unanswered(self, name: str, job_id: int, t: Any, state: str | None, queued_at: float,
                    arrived: Callable[[set[str]], dict[str, Any]]) -> Any:
        """An ErrorInfo for a job that ended without a result or waited too long for a worker; else None."""
        if state == q.ENDED:
            return arrived({name}).get(name) or ErrorInfo(
                "worker_error", f"job {job_id} ended on queue {q.queue_name(t.site)} without a result (see that "
                                "worker's log)")
        timeout = self.options.queue_timeout
        if state == q.WAITING and timeout is not None and time.monotonic() - queued_at > timeout \
                and self.queue.cancel(job_id):
            return ErrorInfo("no_worker", f"no worker of site {t.site} took the job within {timeout:g}s (is "
                                          f"`edgepipe worker --site {t.site}` running?)")
        return None

    def _recover(self, pending: Jobs, out: dict[str, Any]) -> None:
        """Jobs of workers that stopped heartbeating: back to their site's queue, or worker_lost after the retries."""
        by_id = {job_id: (name, t) for name, (job_id, t) in pending.items()}
        wait_s = self.options.worker_timeout
        for job in self.queue.stalled({t.site for _, t in by_id.values()}, set(by_id), wait_s):
            name, t = by_id[job.id]
            if job.attempts < self.options.worker_retries:
                self.queue.retry_now(job.id)
                self.ctx.on_event(name, "queue", f"its worker stopped answering (no heartbeat for {wait_s:g}s): "
                                                 f"back in the queue of site {t.site}")
                continue
            self.queue.fail(job.id)
            out[name] = ErrorInfo("worker_lost", f"the worker of site {t.site} measuring it stopped answering "
                                                 f"(no heartbeat for {wait_s:g}s) after {job.attempts + 1} attempt(s)")
            del pending[name]
            self._pending_ids.discard(job.id)

    def _relay_progress(self) -> None:
        rows = self.exchange.progress_since(self.ctx.run_id, self._since)
        if rows:  # a margin for writes that commit out of order
            self._since = max(r.updated for r in rows) - 5.0
        for r in rows:
            if self._seen.get(r.target, 0) < r.seq:
                self._seen[r.target] = r.seq
                if r.stage != "done":  # "done" is announced once, by the run driver, when the result is scored
                    self.ctx.on_event(r.target, r.stage, f"{r.detail} [{r.worker}]")


class DistributedExecutor:
    """Plugs site workers into the run driver: probe through them, plan here, place the artifacts, measure through
    them, score here. `store` is the run's PostgreSQL history (the run already begun in it)."""

    remeasures_baseline = False   # a worker measures the job it is given; no interleaved baseline

    def __init__(self, store: Any, options: DistributedOptions | None = None) -> None:
        self.store, self.options = store, options or DistributedOptions()

    def execute(self, ctx: RunContext, targets: list[Any]) -> None:
        q.ensure_schema(self.store.db)
        store = ctx.inventory.artifact_store
        blobs = ArtifactStore(self.store.exchange, inline_max_bytes=store.inline_max_bytes, file=ctx.inventory.path,
                              shared_dir=store.shared_dir, cache_dir=ctx.out_dir / "outputs" / ctx.run_id / "fetched")
        with Coordinator(self.store, ctx, self.options) as co:
            plan = plan_jobs(ctx, targets, self._probe(co, ctx, targets))
            placed, locations = self._place(ctx, plan, blobs)
            spec = {j.target.name: j for j in placed}
            jobs = co.defer(q.MEASURE_TASK, [j.target for j in placed],
                            lambda t: self._measure_job(ctx, spec[t.name], locations))
            self._collect(co, ctx, plan, jobs, spec, blobs)

    def _probe(self, co: Coordinator, ctx: RunContext, targets: list[Any]) -> dict[str, ProbeResult]:
        """Each target probed by a worker of its site (a lost or missing worker is that device's probe error)."""
        jobs = co.defer(q.PROBE_TASK, targets, lambda t: {"run_id": ctx.run_id, "target": t.name})

        def arrived(names: set[str]) -> dict[str, ProbeResult]:
            return {n: _probe_from(doc) for n, doc in self.store.exchange.probes(ctx.run_id, names).items()}

        probes = {}
        for name, got in co.wait(jobs, arrived).items():
            t = ctx.inventory.target(name)
            probes[name] = got if isinstance(got, ProbeResult) else ProbeResult(
                name, t.address, t.kind, False, error=got, emulated=bool(t.emulated))
        return probes

    def _place(self, ctx: RunContext, plan: JobPlan, blobs: ArtifactStore) -> tuple[list[DeviceJob], dict[str, Any]]:
        """Each job's files where workers read them; a job whose file cannot be placed is finished here."""
        locations: dict[str, Any] = {}
        placed = []
        for j in plan.jobs:
            files = [p for p in (j.artifact, j.eval_file, j.fallback_artifact) if p is not None]
            for path in files:
                if str(path) not in locations:
                    try:
                        locations[str(path)] = blobs.put(path)
                    except ConfigError as exc:  # too big for the database and no shared directory
                        locations[str(path)] = exc
            bad = next((locations[str(p)] for p in files if isinstance(locations[str(p)], ConfigError)), None)
            if bad is None:
                placed.append(j)
            else:
                ctx.finish(DeviceResult.failed_for(j.target, "artifact_unavailable", bad.one_line(),
                                                   artifact=j.artifact_info))
        return placed, locations

    def _measure_job(self, ctx: RunContext, job: DeviceJob, locations: dict[str, Any]) -> dict[str, Any]:
        """The measure task's arguments for one device (JSON: locations in the artifact store, not paths)."""
        return {"run_id": ctx.run_id, "target": job.target.name, "artifact": locations[str(job.artifact)],
                "eval": locations[str(job.eval_file)], "artifact_info": job.artifact_info,
                "lease_timeout": self.options.lease_timeout, "reduce": dict(job.reduce),
                "fallback": locations[str(job.fallback_artifact)] if job.fallback_artifact is not None else None}

    def _collect(self, co: Coordinator, ctx: RunContext, plan: JobPlan, jobs: Jobs, spec: dict[str, DeviceJob],
                 blobs: ArtifactStore) -> None:
        """Wait for the workers; each raw result is scored here (its outputs fetched from the artifact store)."""

        def arrived(names: set[str]) -> dict[str, DeviceResult]:
            return self.store.device_results(ctx.run_id, sorted(names))

        for name, got in co.wait(jobs, arrived).items():
            if isinstance(got, DeviceResult):
                ctx.finish(plan.scored(_with_outputs(got, blobs)))
            else:
                ctx.finish(DeviceResult.failed_for(spec[name].target, got.code, got.message,
                                                   artifact=spec[name].artifact_info))


def _with_outputs(res: DeviceResult, blobs: ArtifactStore) -> DeviceResult:
    """The device's outputs .npz, fetched from where its worker put it (checked by sha256) for host scoring.

    Outputs are content-addressed like artifacts, so two runs (or two devices) whose outputs are identical share
    one blob: it is never removed here, another coordinator may still need it (retention: docs/scaling.md)."""
    stored = (res.measured.outputs or {}).get("stored") if res.ok else None
    if not stored:
        return res
    try:
        res.outputs_path = str(blobs.fetch(stored))
    except EdgepipeError as exc:
        res.ok, res.error = False, ErrorInfo("bad_outputs", f"outputs of this device are not readable: {exc.one_line()}")
    return res
